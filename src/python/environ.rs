//! The WSGI environ dict: every variable the worker sent, as native str decoded from latin-1
//! (PEP 3333), plus the `wsgi.*` keys.

#![forbid(unsafe_code)]

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

/// PEP 3333 "native strings": each byte becomes the code point of the same value.
pub fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
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
        environ.set_item(
            PyString::new(py, &latin1(key)),
            PyString::new(py, &latin1(value)),
        )?;
    }
    // Apache leaves PATH_INFO out when it is empty; WSGI apps (and mod_wsgi) expect ''.
    if !path_info {
        environ.set_item("PATH_INFO", "")?;
    }
    environ.set_item("wsgi.version", PyTuple::new(py, [1, 0])?)?;
    environ.set_item("wsgi.url_scheme", if https { "https" } else { "http" })?;
    environ.set_item("wsgi.input", input)?;
    environ.set_item("wsgi.input_terminated", true)?;
    environ.set_item("wsgi.errors", errors)?;
    environ.set_item("wsgi.multithread", facts.multithread)?;
    environ.set_item("wsgi.multiprocess", facts.multiprocess)?;
    environ.set_item("wsgi.run_once", false)?;
    environ.set_item("mod_wsgi.version", PyTuple::new(py, [5, 0, 0])?)?;
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
