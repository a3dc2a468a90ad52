//! `wsgi.errors`, `sys.stdout` and `sys.stderr`: file-like objects whose complete lines go to
//! Apache's error log, tagged with the daemon group; and traceback logging.

#![forbid(unsafe_code)]

use std::sync::Mutex;

use pyo3::prelude::*;

use crate::logging::{self, Level};

#[pyclass(module = "mod_wsgi")]
pub struct LogStream {
    group: String,
    stream: &'static str,
    level: Level,
    pending: Mutex<String>,
}

impl LogStream {
    pub fn new(group: &str, stream: &'static str, level: Level) -> LogStream {
        LogStream {
            group: group.to_string(),
            stream,
            level,
            pending: Mutex::new(String::new()),
        }
    }

    fn emit(&self, line: &str) {
        if logging::enabled(self.level) {
            logging::write(self.level, &format!("[{}] {line}", self.group));
        }
    }
}

#[pymethods]
impl LogStream {
    fn write(&self, text: &str) -> usize {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.push_str(text);
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            self.emit(line.trim_end_matches(['\n', '\r']));
        }
        text.chars().count()
    }

    fn writelines(&self, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            let line = line?;
            self.write(line.extract::<&str>()?);
        }
        Ok(())
    }

    fn flush(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() {
            let line = std::mem::take(&mut *pending);
            self.emit(&line);
        }
    }

    fn isatty(&self) -> bool {
        false
    }

    fn writable(&self) -> bool {
        true
    }

    fn readable(&self) -> bool {
        false
    }

    fn seekable(&self) -> bool {
        false
    }

    #[getter]
    fn closed(&self) -> bool {
        false
    }

    #[getter]
    fn encoding(&self) -> &'static str {
        "utf-8"
    }

    #[getter]
    fn name(&self) -> String {
        format!("<wsgi {}>", self.stream)
    }
}

/// Logs `err` with its full traceback, one log line per traceback line.
pub fn log_exception(py: Python<'_>, group: &str, headline: &str, err: &PyErr) {
    logging::write(Level::Error, &format!("[{group}] {headline}"));
    let formatted = py
        .import("traceback")
        .and_then(|tb| {
            tb.call_method1(
                "format_exception",
                (err.get_type(py), err.value(py), err.traceback(py)),
            )
        })
        .and_then(|lines| lines.extract::<Vec<String>>());
    match formatted {
        Ok(lines) => {
            for line in lines.iter().flat_map(|chunk| chunk.lines()) {
                logging::write(Level::Error, &format!("[{group}] {line}"));
            }
        }
        Err(_) => logging::write(Level::Error, &format!("[{group}] {err}")),
    }
}
