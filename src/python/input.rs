//! `wsgi.input`: a streaming, read-only file over the request body. Every read releases the
//! GIL while it waits for the Apache worker.

#![forbid(unsafe_code)]

use std::io;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::daemon::connection::Connection;
use crate::wire::WireError;

/// The request's connection as the Python objects of one request share it. The daemon takes
/// it back when the response is over, so an object the app keeps (`wsgi.input`, the `write`
/// callable) cannot reach whatever request the connection carries next.
#[derive(Clone)]
pub struct SharedConnection(Arc<Mutex<Option<Connection>>>);

impl SharedConnection {
    pub fn new(conn: Connection) -> SharedConnection {
        SharedConnection(Arc::new(Mutex::new(Some(conn))))
    }

    /// Runs `f` on the connection; fails once the request is over.
    pub fn with<T>(&self, f: impl FnOnce(&mut Connection) -> io::Result<T>) -> io::Result<T> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(conn) => f(conn),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the request is over: its input and output can no longer be used",
            )),
        }
    }

    /// Ends the request: takes the connection back from every object that shares it.
    pub fn take(&self) -> Option<Connection> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[pyclass(module = "mod_wsgi")]
pub struct Input {
    conn: SharedConnection,
}

impl Input {
    pub fn new(conn: SharedConnection) -> Input {
        Input { conn }
    }

    fn with_conn<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Connection) -> Result<T, WireError> + Send,
    ) -> PyResult<T> {
        let conn = self.conn.clone();
        py.detach(move || conn.with(|c| f(c).map_err(io::Error::other)))
            .map_err(body_error)
    }

    /// Buffers the bytes `prepare` counts (waiting without the GIL), then copies them once,
    /// straight into the bytes object returned.
    fn read_with<'py>(
        &self,
        py: Python<'py>,
        prepare: impl FnOnce(&mut Connection) -> Result<usize, WireError> + Send,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let ready = self.with_conn(py, prepare)?;
        self.conn
            .with(|c| Ok(c.take_ready(ready, |data| PyBytes::new(py, data))))
            .map_err(body_error)
    }
}

fn body_error(err: io::Error) -> PyErr {
    PyOSError::new_err(format!("request body could not be read: {err}"))
}

/// Python's size convention: None or a negative number means "no limit".
fn limit(size: Option<isize>) -> Option<usize> {
    size.and_then(|n| usize::try_from(n).ok())
}

#[pymethods]
impl Input {
    #[pyo3(signature = (size=None))]
    fn read<'py>(&self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        self.read_with(py, |c| c.prepare_read(limit(size)))
    }

    #[pyo3(signature = (size=None))]
    fn readline<'py>(&self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        self.read_with(py, |c| c.prepare_readline(limit(size)))
    }

    #[pyo3(signature = (hint=None))]
    fn readlines<'py>(&self, py: Python<'py>, hint: Option<isize>) -> PyResult<Bound<'py, PyList>> {
        let lines = PyList::empty(py);
        let hint = limit(hint).filter(|&h| h > 0);
        let mut total = 0;
        loop {
            let line = self.read_with(py, |c| c.prepare_readline(None))?;
            let len = line.as_bytes().len();
            if len == 0 {
                break;
            }
            total += len;
            lines.append(line)?;
            if hint.is_some_and(|h| total >= h) {
                break;
            }
        }
        Ok(lines)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.read_with(py, |c| c.prepare_readline(None))?;
        Ok((!line.as_bytes().is_empty()).then_some(line))
    }

    fn close(&self) {}
}
