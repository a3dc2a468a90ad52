//! A small logging facade so that code outside `httpd/` (the daemon, the Python glue) can
//! write to Apache's error log without touching ffi. The httpd layer installs the real sink at
//! post_config; until then (and in unit tests) messages go to stderr, which in an Apache
//! process is the main error log anyway.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

/// Apache's levels, in Apache's order (lower is more severe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Emerg = 0,
    Alert = 1,
    Crit = 2,
    Error = 3,
    Warn = 4,
    Notice = 5,
    Info = 6,
    Debug = 7,
}

/// Where log lines go: a level check and a writer.
#[derive(Clone, Copy)]
pub struct Sink {
    pub enabled: fn(Level) -> bool,
    pub write: fn(Level, &str),
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Installs the sink once per process; later calls keep the first (the module is loaded once).
pub fn install(sink: Sink) {
    let _ = SINK.set(sink);
}

pub fn enabled(level: Level) -> bool {
    match SINK.get() {
        Some(sink) => (sink.enabled)(level),
        None => level <= Level::Notice,
    }
}

pub fn write(level: Level, message: &str) {
    match SINK.get() {
        Some(sink) => (sink.write)(level, message),
        None => eprintln!("[wsgi:{level:?}] [pid {}] {message}", std::process::id()),
    }
}

/// `wsgi_log!(Level::Error, "WSGIRS0401: …", args)`: checks the level before formatting.
#[macro_export]
macro_rules! wsgi_log {
    ($level:expr, $($arg:tt)+) => {{
        let level = $level;
        if $crate::logging::enabled(level) {
            $crate::logging::write(level, &format!($($arg)+));
        }
    }};
}
