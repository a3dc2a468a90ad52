//! The unsafe boundary: the only code that touches httpd/APR types. Everything here converts
//! pointers, calls safe code in the rest of the crate, and maps results back to C.

pub mod children;
pub mod directives;
pub mod ffi;
pub mod log;
pub mod module;
pub mod pool;
pub mod request;
