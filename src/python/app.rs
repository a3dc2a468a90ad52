//! Loading WSGI scripts and running one request through the application: environ,
//! start_response, the write() callable, iterating the result, close().

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyModule, PyTuple};

use super::environ::{self, DaemonFacts};
use super::errors::{log_exception, LogStream};
use super::input::{Input, SharedConnection};
use crate::daemon::connection::Connection;
use crate::daemon::GroupRuntime;
use crate::logging::Level;
use crate::wire::{self, Kind};
use crate::wsgi_log;

static FACTS: OnceLock<DaemonFacts> = OnceLock::new();

/// A loaded script: its module and the file's mtime when it was read.
struct LoadedScript {
    module: Py<PyModule>,
    mtime: Option<SystemTime>,
}

/// Loaded scripts by path. Each script is its own module in the one interpreter.
static SCRIPTS: Mutex<Option<HashMap<String, LoadedScript>>> = Mutex::new(None);

/// `wsgi.file_wrapper`, defined in bootstrap.py.
static FILE_WRAPPER: OnceLock<Py<PyAny>> = OnceLock::new();

pub fn set_file_wrapper(wrapper: Py<PyAny>) {
    let _ = FILE_WRAPPER.set(wrapper);
}

fn modified(script: &str) -> Option<SystemTime> {
    std::fs::metadata(script).and_then(|m| m.modified()).ok()
}

pub fn set_group(group: &GroupRuntime) {
    let _ = FACTS.set(DaemonFacts {
        multithread: group.spec.threads != 1,
        multiprocess: group.spec.multiprocess,
    });
}

/// The request metadata the worker put in the environ for us.
struct RequestInfo {
    script: String,
    callable: String,
    content_length: Option<u64>,
    /// WSGIScriptReloading: a changed script is reloaded and the process restarted.
    reloading: bool,
}

fn request_info(pairs: &[(&[u8], &[u8])]) -> RequestInfo {
    let mut info = RequestInfo {
        script: String::new(),
        callable: "application".to_string(),
        content_length: None,
        reloading: true,
    };
    for (key, value) in pairs {
        match *key {
            b"SCRIPT_FILENAME" => info.script = String::from_utf8_lossy(value).into_owned(),
            b"mod_wsgi.callable_object" => {
                info.callable = String::from_utf8_lossy(value).into_owned()
            }
            b"mod_wsgi.script_reloading" => info.reloading = *value != b"0",
            b"CONTENT_LENGTH" => {
                info.content_length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
            }
            _ => {}
        }
    }
    info
}

fn module_name(script: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    script.hash(&mut hasher);
    format!("_mod_wsgi_rs_{:016x}", hasher.finish())
}

#[derive(Debug)]
enum LoadError {
    Read(String),
    Exec(PyErr),
    NoCallable,
}

fn load_script<'py>(
    py: Python<'py>,
    script: &str,
    reloading: bool,
    group: &str,
) -> Result<Bound<'py, PyModule>, LoadError> {
    {
        let cache = SCRIPTS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(loaded) = cache.as_ref().and_then(|c| c.get(script)) {
            if !reloading || modified(script) == loaded.mtime {
                return Ok(loaded.module.bind(py).clone());
            }
            // The script changed: serve this request with the new code, and restart the
            // process gracefully so every module the app imported is fresh too.
            crate::daemon::worker::request_restart(&format!(
                "WSGIRS0508: [{group}] Script '{script}' has changed; reloading it and \
                 restarting this daemon process gracefully."
            ));
        }
    }
    // Read and run the script without holding the cache lock: its import may release the GIL.
    let mtime = modified(script);
    let source = std::fs::read(script).map_err(|e| LoadError::Read(e.to_string()))?;
    let code =
        CString::new(source).map_err(|_| LoadError::Read("the file contains a NUL byte".into()))?;
    let file = CString::new(script).map_err(|_| LoadError::Read("bad path".into()))?;
    let name = CString::new(module_name(script)).map_err(|_| LoadError::Read("bad path".into()))?;
    let loaded = PyModule::from_code(py, &code, &file, &name);
    if let Some(activity) = crate::daemon::lifecycle::activity() {
        activity.script_loaded(loaded.is_ok());
    }
    let module = loaded.map_err(LoadError::Exec)?;
    let mut cache = SCRIPTS.lock().unwrap_or_else(|p| p.into_inner());
    cache.get_or_insert_with(HashMap::new).insert(
        script.to_string(),
        LoadedScript {
            module: module.clone().unbind(),
            mtime,
        },
    );
    Ok(module)
}

/// WSGIImportScript: loads `script` at daemon start, before any request.
pub fn preload(script: &str, group: &str) {
    Python::attach(|py| match load_script(py, script, false, group) {
        Ok(_) => wsgi_log!(
            Level::Info,
            "WSGIRS0509: [{group}] Imported script '{script}'."
        ),
        Err(LoadError::Exec(err)) => log_exception(
            py,
            group,
            &format!("WSGIRS0505: Failed to exec Python script file '{script}'."),
            &err,
        ),
        Err(err) => wsgi_log!(
            Level::Error,
            "WSGIRS0504: [{group}] Failed to import WSGI script '{script}': {err:?}"
        ),
    });
}

fn load_app<'py>(
    py: Python<'py>,
    info: &RequestInfo,
    group: &str,
) -> Result<Bound<'py, PyAny>, LoadError> {
    let module = load_script(py, &info.script, info.reloading, group)?;
    module
        .getattr(info.callable.as_str())
        .map_err(|_| LoadError::NoCallable)
}

/// Takes the GIL, then the request `pick` hands over (the worker layer gives the one that has
/// waited longest, whichever thread read it), and runs it; every failure is logged here and
/// turned into a Fail frame or a dropped connection, so nothing escapes to the accept loop.
/// Gives the connection back when the response ended cleanly and nothing else (a
/// `wsgi.input` the app kept) still holds it. `pick` gets the request's environ payload, as
/// read and checked (its first pair is the origin secret).
pub fn serve_next(
    pick: impl FnOnce() -> Option<(Connection, Vec<u8>)>,
    group: &GroupRuntime,
) -> Option<Connection> {
    let (shared, finish, script) = Python::attach(|py| {
        let (mut conn, payload) = pick()?;
        let pairs: Vec<(&[u8], &[u8])> = wire::pairs(Kind::Request, &payload)
            .collect::<Result<_, _>>()
            .ok()?;
        let pairs = pairs.get(1..).unwrap_or_default();
        let info = request_info(pairs);
        conn.set_content_length(info.content_length);
        let shared = SharedConnection::new(conn);
        let finish = run(py, &shared, pairs, &info, &group.spec.name);
        Some((shared, finish, info.script))
    })?;
    let mut conn = shared.take()?;
    // The last write happens after the GIL is given up: taking it back just to return would
    // make every request queue for it once more behind the other threads.
    let sent = match finish {
        Finish::End => conn.flush_headers().and_then(|_| conn.send_end()),
        Finish::Fail(status) => conn.send_fail(status),
        Finish::Cut => return None,
    };
    if let Err(err) = sent {
        if conn.peer_gone() {
            wsgi_log!(
                Level::Info,
                "WSGIRS0507: [{}] The client closed the connection before the response from \
                 '{}' was complete; the application's close() was called.",
                group.spec.name,
                script
            );
        } else {
            wsgi_log!(
                Level::Error,
                "WSGIRS0506: [{}] The response from '{}' could not be sent to Apache: {err}",
                group.spec.name,
                script
            );
        }
    }
    conn.reusable().then_some(conn)
}

/// How a request ends once Python is done with it.
enum Finish {
    /// Send what is queued, then End.
    End,
    /// Ask the worker for its own error page (nothing was sent yet).
    Fail(u16),
    /// Drop the connection: the response was cut (or the worker is gone).
    Cut,
}

fn run(
    py: Python<'_>,
    conn: &SharedConnection,
    pairs: &[(&[u8], &[u8])],
    info: &RequestInfo,
    group: &str,
) -> Finish {
    let app = match load_app(py, info, group) {
        Ok(app) => app,
        Err(LoadError::NoCallable) => {
            wsgi_log!(
                Level::Error,
                "WSGIRS0503: [{group}] Target WSGI script '{}' does not contain WSGI application '{}'.",
                info.script,
                info.callable
            );
            return Finish::Fail(500);
        }
        Err(LoadError::Read(cause)) => {
            wsgi_log!(
                Level::Error,
                "WSGIRS0504: [{group}] Failed to read WSGI script '{}' as uid {}: {cause}",
                info.script,
                nix::unistd::getuid()
            );
            return Finish::Fail(500);
        }
        Err(LoadError::Exec(err)) => {
            log_exception(
                py,
                group,
                &format!(
                    "WSGIRS0505: Failed to exec Python script file '{}'.",
                    info.script
                ),
                &err,
            );
            return Finish::Fail(500);
        }
    };
    let outcome = call_app(py, conn, pairs, &app, group);
    let peer_gone = conn.with(|c| Ok(c.peer_gone())).unwrap_or(true);
    match outcome {
        Ok(()) => Finish::End,
        Err(_) if peer_gone => {
            // Not the application's fault: the client went away and Apache hung up.
            wsgi_log!(
                Level::Info,
                "WSGIRS0507: [{group}] The client closed the connection before the response \
                 from '{}' was complete; the application's close() was called.",
                info.script
            );
            Finish::Cut
        }
        Err(err) => {
            log_exception(
                py,
                group,
                &format!(
                    "WSGIRS0506: Exception occurred processing WSGI script '{}'.",
                    info.script
                ),
                &err,
            );
            // After headers, dropping the connection without End tells the worker to cut the
            // client's response short rather than make it look complete.
            if conn.with(|c| Ok(c.headers_sent())).unwrap_or(true) {
                Finish::Cut
            } else {
                Finish::Fail(500)
            }
        }
    }
}

fn call_app(
    py: Python<'_>,
    conn: &SharedConnection,
    pairs: &[(&[u8], &[u8])],
    app: &Bound<'_, PyAny>,
    group: &str,
) -> PyResult<()> {
    let facts = FACTS.get().cloned().unwrap_or(DaemonFacts {
        multithread: true,
        multiprocess: false,
    });
    let input = Bound::new(py, Input::new(conn.clone()))?.into_any();
    let errors = Bound::new(py, LogStream::new(group, "wsgi.errors", Level::Error))?.into_any();
    let environ = environ::build(py, pairs, &facts, input, errors)?;
    if let Some(wrapper) = FILE_WRAPPER.get() {
        environ.set_item("wsgi.file_wrapper", wrapper.bind(py))?;
    }
    let start_response = Bound::new(py, StartResponse { conn: conn.clone() })?;
    let result = app.call1((environ, start_response))?;
    let iterated = send_iterable(py, conn, &result);
    // PEP 3333: close() is called whatever happened while iterating.
    let closed = match result.getattr_opt("close") {
        Ok(Some(close)) => close.call0().map(|_| ()),
        Ok(None) => Ok(()),
        Err(err) => Err(err),
    };
    iterated?;
    closed?;
    let started = conn
        .with(|c| Ok(c.headers_sent() || c.has_pending_headers()))
        .unwrap_or(false);
    if !started {
        return Err(PyRuntimeError::new_err(
            "the application returned without calling start_response()",
        ));
    }
    Ok(())
}

fn io_to_py(err: std::io::Error) -> PyErr {
    if err.kind() == std::io::ErrorKind::Other {
        PyRuntimeError::new_err(err.to_string())
    } else {
        pyo3::exceptions::PyOSError::new_err(format!("response could not be sent to Apache: {err}"))
    }
}

fn send_iterable(
    py: Python<'_>,
    conn: &SharedConnection,
    result: &Bound<'_, PyAny>,
) -> PyResult<()> {
    // A list or tuple is complete already: its chunks can leave together with the End frame.
    // A generator's chunks leave as they are produced (a streamed response must not wait).
    let batched =
        result.is_exact_instance_of::<PyList>() || result.is_exact_instance_of::<PyTuple>();
    if batched {
        let items = result
            .try_iter()?
            .map(|item| as_bytes(item?))
            .collect::<PyResult<Vec<_>>>()?;
        return send_all(py, conn, &items);
    }
    for item in result.try_iter()? {
        let bytes = as_bytes(item?)?;
        send_now(py, conn, bytes.as_bytes())?;
    }
    Ok(())
}

fn as_bytes(item: Bound<'_, PyAny>) -> PyResult<Bound<'_, PyBytes>> {
    item.cast_into::<PyBytes>().map_err(|err| {
        PyTypeError::new_err(format!(
            "sequence of byte string values expected, value of type {} found",
            err.into_inner()
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

/// A complete body (a list or tuple): small chunks are queued without I/O and leave with the
/// End frame; the rest leave together in one write with the GIL released once, rather than
/// once per chunk.
fn send_all(py: Python<'_>, conn: &SharedConnection, items: &[Bound<'_, PyBytes>]) -> PyResult<()> {
    let mut queued = 0;
    for item in items {
        if !queue_bytes(conn, item.as_bytes())? {
            break;
        }
        queued += 1;
    }
    let rest: Vec<&[u8]> = items[queued..].iter().map(|b| b.as_bytes()).collect();
    if rest.is_empty() {
        return Ok(());
    }
    let conn = conn.clone();
    py.detach(move || {
        conn.with(|c| {
            if !c.flush_headers()? {
                return Err(std::io::Error::other(
                    "response body was produced before start_response() was called",
                ));
            }
            c.send_data_all(&rest)
        })
    })
    .map_err(io_to_py)
}

/// Queues body bytes (and the headers before them) if they fit, without any I/O.
fn queue_bytes(conn: &SharedConnection, data: &[u8]) -> PyResult<bool> {
    conn.with(|c| {
        if !c.headers_sent() {
            c.queue_headers();
        }
        Ok(c.headers_sent() && (data.is_empty() || c.try_queue_data(data)))
    })
    .map_err(io_to_py)
}

/// Sends body bytes now (a generator's chunk, a `write()` call): a streamed response must not
/// wait for the End frame.
fn send_now(py: Python<'_>, conn: &SharedConnection, data: &[u8]) -> PyResult<()> {
    let conn = conn.clone();
    py.detach(move || {
        conn.with(|c| {
            if !c.flush_headers()? {
                return Err(std::io::Error::other(
                    "response body was produced before start_response() was called",
                ));
            }
            if data.is_empty() {
                return Ok(());
            }
            c.send_data(data, true)
        })
    })
    .map_err(io_to_py)
}

/// Checks a status line or header text: latin-1 only, no control characters that could split
/// the response.
fn latin1_field(what: &str, text: &str) -> PyResult<Vec<u8>> {
    text.chars()
        .map(|c| match u8::try_from(u32::from(c)) {
            Ok(b'\r' | b'\n' | 0) => Err(PyValueError::new_err(format!(
                "{what} contains a control character (CR, LF or NUL): {text:?}"
            ))),
            Ok(byte) => Ok(byte),
            Err(_) => Err(PyValueError::new_err(format!(
                "{what} is not latin-1 encodable: {text:?}"
            ))),
        })
        .collect()
}

#[pyclass(module = "mod_wsgi")]
struct StartResponse {
    conn: SharedConnection,
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info=None))]
    fn __call__(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<Write>> {
        let exc_info = exc_info.filter(|e| !e.is_none());
        let (sent, pending) = self
            .conn
            .with(|c| Ok((c.headers_sent(), c.has_pending_headers())))
            .map_err(io_to_py)?;
        if let Some(exc_info) = exc_info {
            if sent {
                // PEP 3333: too late to change the response; re-raise the original error.
                let tuple = exc_info.cast::<PyTuple>()?;
                return Err(PyErr::from_value(tuple.get_item(1)?));
            }
        } else if pending || sent {
            return Err(PyRuntimeError::new_err("headers have already been set"));
        }
        let status: String = status
            .extract()
            .map_err(|_| PyTypeError::new_err("expected str object for status"))?;
        let status_bytes = latin1_field("status line", &status)?;
        let valid_status = status_bytes.len() >= 3
            && status_bytes[..3].iter().all(u8::is_ascii_digit)
            && (status_bytes.len() == 3 || status_bytes[3] == b' ');
        if !valid_status {
            return Err(PyValueError::new_err(format!(
                "invalid status line: {status:?}"
            )));
        }
        let mut encoded: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for item in headers.try_iter()? {
            let item = item?;
            let (name, value): (String, String) = item.extract().map_err(|_| {
                PyTypeError::new_err("expected a list of (str, str) tuples for headers")
            })?;
            let name_bytes = latin1_field("header name", &name)?;
            if name_bytes.is_empty()
                || name_bytes
                    .iter()
                    .any(|b| b.is_ascii_whitespace() || *b == b':')
            {
                return Err(PyValueError::new_err(format!(
                    "invalid header name: {name:?}"
                )));
            }
            encoded.push((name_bytes, latin1_field("header value", &value)?));
        }
        let mut payload = Vec::new();
        wire::encode_headers(
            &mut payload,
            &status_bytes,
            encoded.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        self.conn
            .with(|c| {
                c.set_pending_headers(payload);
                Ok(())
            })
            .map_err(io_to_py)?;
        Py::new(
            py,
            Write {
                conn: self.conn.clone(),
            },
        )
    }
}

/// The legacy `write()` callable returned by start_response.
#[pyclass(module = "mod_wsgi")]
struct Write {
    conn: SharedConnection,
}

#[pymethods]
impl Write {
    fn __call__(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = data
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("write() expects a byte string"))?;
        send_now(py, &self.conn, bytes.as_bytes())
    }
}
