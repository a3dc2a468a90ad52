//! mod_wsgi_rs: an Apache httpd 2.4 module that runs Python WSGI applications in daemon
//! process groups, each a pool of processes running as its own Unix user.
//!
//! Layout (see ARCHITECTURE.md): `config` parses directives, `route` picks a group,
//! `wire` frames worker↔daemon traffic, `proxy` is the Apache-worker side, `daemon` the
//! supervised daemon processes, `python` the embedded CPython. Only `httpd` touches C types
//! (and raw memory: `httpd::shm`).

pub mod config;
pub mod daemon;
pub mod httpd;
pub mod load;
pub mod logging;
pub mod proxy;
pub mod python;
pub mod quiet;
pub mod route;
pub mod wire;

/// Randomised robustness tests of the parsers, the template expander and the wire decoder;
/// `make fuzz` runs them for a bounded time (ignored in `make test`).
#[cfg(test)]
mod fuzz_tests;
