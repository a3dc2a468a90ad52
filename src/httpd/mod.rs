//! The unsafe boundary: the only code that touches httpd/APR types. Everything here converts
//! pointers, calls safe code in the rest of the crate, and maps results back to C. `shm`, the
//! memory a worker shares with a daemon, is here for the same reason: raw memory access;
//! and so is `heap`, which gives malloc's free memory back to the system.

// Everything but `heap` and `shm` needs httpd's symbols, which `cargo test` does not link.
#[cfg(not(test))]
pub mod children;
#[cfg(not(test))]
pub mod directives;
#[cfg(not(test))]
pub mod ffi;
pub mod heap;
#[cfg(not(test))]
pub mod log;
#[cfg(not(test))]
pub mod module;
#[cfg(not(test))]
pub mod pool;
#[cfg(not(test))]
pub mod request;
pub mod shm;
