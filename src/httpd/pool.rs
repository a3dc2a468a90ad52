//! Rust values owned by an APR pool: the pool frees them (through a registered cleanup that
//! drops the Box) when it is cleared or destroyed. Wrappers here never free httpd memory.

use std::ffi::{c_char, c_void, CString};

use super::ffi;

unsafe extern "C" fn drop_boxed<T>(data: *mut c_void) -> ffi::apr_status_t {
    // SAFETY: `data` came from Box::into_raw::<T> in `pool_box` and the pool runs each cleanup once.
    drop(unsafe { Box::from_raw(data.cast::<T>()) });
    0
}

/// Moves `value` into `pool`'s lifetime and returns a pointer valid until the pool is cleared.
///
/// # Safety
/// `pool` must be a live APR pool.
pub unsafe fn pool_box<T>(pool: *mut ffi::apr_pool_t, value: T) -> *mut T {
    let raw = Box::into_raw(Box::new(value));
    // SAFETY: the pool is live (caller's contract); the cleanup matches the allocation above.
    // The child cleanup is a no-op: a process that execs must not run Rust destructors.
    unsafe {
        ffi::apr_pool_cleanup_register(
            pool,
            raw.cast::<c_void>(),
            Some(drop_boxed::<T>),
            Some(ffi::apr_pool_cleanup_null),
        );
    }
    raw
}

/// Runs `f` when `pool` is cleared or destroyed (in the process that owns the pool).
///
/// # Safety
/// `pool` must be a live APR pool.
pub unsafe fn on_cleanup(pool: *mut ffi::apr_pool_t, f: Box<dyn FnOnce()>) {
    struct Pending(Option<Box<dyn FnOnce()>>);
    impl Drop for Pending {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                // A panic here would cross the C boundary of the cleanup.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            }
        }
    }
    // SAFETY: forwarded caller contract.
    unsafe { pool_box(pool, Pending(Some(f))) };
}

/// Copies `text` into `pool` as a NUL-terminated C string (interior NULs are cut off there).
///
/// # Safety
/// `pool` must be a live APR pool.
pub unsafe fn pstrdup(pool: *mut ffi::apr_pool_t, text: &[u8]) -> *mut c_char {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    // SAFETY: apr_pstrmemdup copies `end` bytes and appends a NUL; the pool is live.
    unsafe { ffi::apr_pstrmemdup(pool, text.as_ptr().cast::<c_char>(), end) }
}

/// A C string for passing to httpd, built from Rust text without interior NULs.
pub fn cstring(text: &str) -> CString {
    CString::new(text.replace('\0', "\\0")).unwrap_or_default()
}

/// Borrows a C string as bytes (empty for NULL).
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string that outlives the returned slice.
pub unsafe fn cstr_bytes<'a>(ptr: *const c_char) -> &'a [u8] {
    if ptr.is_null() {
        return b"";
    }
    // SAFETY: caller guarantees a live NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ptr) }.to_bytes()
}

/// Borrows a C string as text, replacing invalid UTF-8 (for names and paths in messages).
///
/// # Safety
/// As `cstr_bytes`.
pub unsafe fn cstr_lossy(ptr: *const c_char) -> String {
    // SAFETY: forwarded caller contract.
    String::from_utf8_lossy(unsafe { cstr_bytes(ptr) }).into_owned()
}
