//! The WSGI environ dict: every variable the worker sent, as native str decoded from latin-1
//! (PEP 3333), plus the `wsgi.*` keys.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

/// PEP 3333 "native strings": each byte becomes the code point of the same value.
pub fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// A Python str of latin-1 bytes, without the conversion when they are plain ASCII.
fn native_str<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
    match std::str::from_utf8(bytes) {
        Ok(text) if bytes.is_ascii() => PyString::new(py, text),
        _ => PyString::new(py, &latin1(bytes)),
    }
}

/// Environ keys repeat on every request: each is made (and interned) once. Bounded, since
/// clients choose HTTP_* names.
static KEYS: Mutex<Option<HashMap<Vec<u8>, Py<PyString>>>> = Mutex::new(None);
const MAX_CACHED_KEYS: usize = 512;

fn environ_key<'py>(py: Python<'py>, key: &[u8]) -> Bound<'py, PyString> {
    let mut cache = KEYS.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(cached) = cache.get(key) {
        return cached.bind(py).clone();
    }
    let made = native_str(py, key);
    if cache.len() < MAX_CACHED_KEYS {
        let interned = PyString::intern(py, &made.to_string_lossy());
        cache.insert(key.to_vec(), interned.clone().unbind());
        return interned;
    }
    made
}

/// `(1, 0)` and mod_wsgi's version tuple, made once.
fn version_tuples(py: Python<'_>) -> PyResult<(Bound<'_, PyTuple>, Bound<'_, PyTuple>)> {
    static TUPLES: OnceLock<(Py<PyTuple>, Py<PyTuple>)> = OnceLock::new();
    if let Some((wsgi, ours)) = TUPLES.get() {
        return Ok((wsgi.bind(py).clone(), ours.bind(py).clone()));
    }
    let made = (PyTuple::new(py, [1, 0])?, PyTuple::new(py, [5, 0, 0])?);
    let _ = TUPLES.set((made.0.clone().unbind(), made.1.clone().unbind()));
    Ok(made)
}

/// What the daemon knows about itself that goes into every environ.
#[derive(Debug, Clone)]
pub struct DaemonFacts {
    pub multithread: bool,
    pub multiprocess: bool,
}

pub fn build<'py>(
    py: Python<'py>,
    pairs: &[(&[u8], &[u8])],
    facts: &DaemonFacts,
    input: Bound<'py, PyAny>,
    errors: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let environ = PyDict::new(py);
    let mut https = false;
    let mut path_info = false;
    for (key, value) in pairs {
        match *key {
            b"HTTPS" => https = matches!(value.to_ascii_lowercase().as_slice(), b"on" | b"1"),
            b"PATH_INFO" => path_info = true,
            _ => {}
        }
        environ.set_item(environ_key(py, key), native_str(py, value))?;
    }
    // Apache leaves PATH_INFO out when it is empty; WSGI apps (and mod_wsgi) expect ''.
    if !path_info {
        environ.set_item(intern!(py, "PATH_INFO"), intern!(py, ""))?;
    }
    let (wsgi_version, our_version) = version_tuples(py)?;
    let scheme = if https {
        intern!(py, "https")
    } else {
        intern!(py, "http")
    };
    environ.set_item(intern!(py, "wsgi.version"), wsgi_version)?;
    environ.set_item(intern!(py, "wsgi.url_scheme"), scheme)?;
    environ.set_item(intern!(py, "wsgi.input"), input)?;
    environ.set_item(intern!(py, "wsgi.input_terminated"), true)?;
    environ.set_item(intern!(py, "wsgi.errors"), errors)?;
    environ.set_item(intern!(py, "wsgi.multithread"), facts.multithread)?;
    environ.set_item(intern!(py, "wsgi.multiprocess"), facts.multiprocess)?;
    environ.set_item(intern!(py, "wsgi.run_once"), false)?;
    environ.set_item(intern!(py, "mod_wsgi.version"), our_version)?;
    Ok(environ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_maps_bytes_to_code_points() {
        assert_eq!(latin1(b"abc"), "abc");
        assert_eq!(latin1(&[0xe9, 0xff]), "\u{e9}\u{ff}");
    }
}
