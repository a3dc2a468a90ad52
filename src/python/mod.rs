//! CPython, daemon side only: started after the daemon dropped root, never in Apache's
//! parent or workers. `serve` runs one request through the WSGI application.

#![forbid(unsafe_code)]

pub mod app;
pub mod environ;
pub mod errors;
pub mod input;

use crate::daemon::connection::Connection;

use pyo3::prelude::*;
use pyo3::types::{PyList, PyModule};

/// Python-side helpers (virtualenv activation, wsgi.file_wrapper).
const BOOTSTRAP: &std::ffi::CStr = {
    match std::ffi::CStr::from_bytes_with_nul(
        concat!(include_str!("bootstrap.py"), "\0").as_bytes(),
    ) {
        Ok(code) => code,
        Err(_) => panic!("bootstrap.py contains a NUL byte"),
    }
};

use crate::daemon::GroupRuntime;

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("{0}")]
    Init(String),
}

/// Starts the interpreter for this daemon: sys.path additions, sys.stdout/sys.stderr to
/// Apache's error log.
pub fn initialize(group: &GroupRuntime) -> Result<(), PythonError> {
    Python::initialize();
    Python::attach(|py| -> PyResult<()> {
        let sys = py.import("sys")?;
        let path = sys.getattr("path")?.cast_into::<PyList>()?;
        for (index, entry) in group.spec.python_path.iter().enumerate() {
            path.insert(index, entry.display().to_string())?;
        }
        sys.setattr("argv", PyList::new(py, ["mod_wsgi"])?)?;
        let bootstrap = PyModule::from_code(
            py,
            BOOTSTRAP,
            c"mod_wsgi_rs/bootstrap.py",
            c"mod_wsgi_rs_bootstrap",
        )?;
        if let Some(home) = &group.spec.python_home {
            bootstrap.call_method1("activate_home", (home.display().to_string(),))?;
        }
        app::set_file_wrapper(bootstrap.getattr("FileWrapper")?.unbind());
        let name = group.spec.name.as_str();
        sys.setattr(
            "stdout",
            errors::LogStream::new(name, "stdout", crate::logging::Level::Error),
        )?;
        sys.setattr(
            "stderr",
            errors::LogStream::new(name, "stderr", crate::logging::Level::Error),
        )?;
        app::set_group(group);
        Ok(())
    })
    .map_err(|err| PythonError::Init(err.to_string()))
}

/// Runs `f` (a daemon thread's whole life) with a Python thread state that lasts as long, but
/// without holding the GIL: each request then takes the GIL with its thread state ready,
/// instead of creating and destroying one per request.
pub fn with_thread_state<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    Python::attach(|py| py.detach(f))
}

/// Acquires and releases the GIL (the deadlock-timeout probe).
pub fn ping_gil() {
    Python::attach(|_| ());
}

/// Loads a script at start-up (WSGIImportScript).
pub fn preload(script: &str, group: &str) {
    app::preload(script, group);
}

/// Takes the GIL, then runs the request `pick` hands over (a validated request's connection
/// and environ payload) to the end; returns the connection when it can carry another request.
pub fn serve_next(
    pick: impl FnOnce() -> Option<(Connection, Vec<u8>)>,
    group: &GroupRuntime,
) -> Option<Connection> {
    app::serve_next(pick, group)
}
