//! Writing to Apache's error log: level check first, then one call with a fixed "%s" format so
//! user text is never a format string, tagged with our module index (shown as `[wsgi:…]`).

use std::ffi::c_int;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use super::ffi;
use super::module::module_index;
use super::pool::cstring;
use crate::logging::{self, Level, Sink};

/// The main server, for messages that belong to no request (supervisor, daemons).
static MAIN_SERVER: AtomicPtr<ffi::server_rec> = AtomicPtr::new(ptr::null_mut());

fn apache_level(level: Level) -> c_int {
    level as c_int
}

/// Makes `logging::write` reach the main server's error log from now on, in this process and
/// in every process forked from it.
pub fn install(main_server: *mut ffi::server_rec) {
    MAIN_SERVER.store(main_server, Ordering::Release);
    logging::install(Sink {
        enabled: main_enabled,
        write: main_write,
    });
}

fn main_enabled(level: Level) -> bool {
    let server = MAIN_SERVER.load(Ordering::Acquire);
    // SAFETY: the main server_rec lives in pconf for the whole generation (and, inherited, in
    // forked daemons for their lifetime).
    unsafe { server_enabled(server, level) }
}

fn main_write(level: Level, message: &str) {
    server_log(MAIN_SERVER.load(Ordering::Acquire), level, message);
}

/// # Safety
/// `server` is NULL or a live server_rec.
unsafe fn server_enabled(server: *const ffi::server_rec, level: Level) -> bool {
    if level <= Level::Notice || server.is_null() {
        return true;
    }
    // SAFETY: non-null live server_rec per the caller.
    let configured = unsafe { ffi::module_loglevel(&raw const (*server).log, module_index()) };
    configured >= apache_level(level)
}

/// Logs `message` against `server` (NULL: Apache's default server).
pub(crate) fn server_log(server: *const ffi::server_rec, level: Level, message: &str) {
    // SAFETY: server is NULL or live (all our callers pass the main server or cmd->server).
    if !unsafe { server_enabled(server, level) } {
        return;
    }
    let text = cstring(message);
    // SAFETY: fixed "%s" format with one NUL-terminated argument; server may be NULL.
    unsafe {
        ffi::ap_log_error_(
            c"mod_wsgi_rs".as_ptr(),
            0,
            module_index(),
            apache_level(level),
            0,
            server,
            c"%s".as_ptr(),
            text.as_ptr(),
        );
    }
}

/// Logs `message` for a request (Apache adds the client address and the request's log level).
///
/// # Safety
/// `r` must be a live request_rec.
pub unsafe fn request_log(r: *const ffi::request_rec, level: Level, message: &str) {
    // SAFETY: live request per the caller; its log config pointers follow Apache's rules.
    let configured = unsafe {
        let logconf = if !(*r).log.is_null() {
            (*r).log
        } else if !(*(*r).connection).log.is_null() {
            (*(*r).connection).log
        } else {
            &raw mut (*(*r).server).log
        };
        ffi::module_loglevel(logconf, module_index())
    };
    if level > Level::Notice && configured < apache_level(level) {
        return;
    }
    let text = cstring(message);
    // SAFETY: fixed "%s" format with one NUL-terminated argument; r is live.
    unsafe {
        ffi::ap_log_rerror_(
            c"mod_wsgi_rs".as_ptr(),
            0,
            module_index(),
            apache_level(level),
            0,
            r,
            c"%s".as_ptr(),
            text.as_ptr(),
        );
    }
}
