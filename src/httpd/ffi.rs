//! The generated httpd/APR bindings, and Rust copies of the few C macros we need.

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unused_imports,
    improper_ctypes,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/httpd_bindings.rs"));
}

pub use bindings::*;

/// `ap_get_module_loglevel(l, i)`: the per-module level if one is set, else the server's.
///
/// # Safety
/// `log` must point to a live `ap_logconf` whose `module_levels` (if non-null) has an entry for
/// every loaded module index.
pub unsafe fn module_loglevel(log: *const ap_logconf, index: i32) -> i32 {
    // SAFETY: the caller guarantees `log` is live; module_levels has one slot per module.
    unsafe {
        let levels = (*log).module_levels;
        if index < 0 || levels.is_null() {
            return (*log).level;
        }
        let level = *levels.offset(index as isize);
        if level < 0 {
            (*log).level
        } else {
            i32::from(level)
        }
    }
}

/// `APR_BRIGADE_INSERT_TAIL(bb, e)`: links bucket `e` in as the last of brigade `bb`.
///
/// # Safety
/// `bb` must be a live brigade and `e` a live bucket that is in no brigade.
pub unsafe fn brigade_insert_tail(bb: *mut apr_bucket_brigade, e: *mut apr_bucket) {
    // SAFETY: the caller guarantees both are live. The brigade's list head poses as a bucket
    // (APR_RING_SENTINEL): `link` is apr_bucket's first field, so the head's address is the
    // sentinel's, and its next/prev are the sentinel's link.
    unsafe {
        let sentinel = std::ptr::addr_of_mut!((*bb).list).cast::<apr_bucket>();
        let last = (*bb).list.prev;
        (*e).link.next = sentinel;
        (*e).link.prev = last;
        (*last).link.next = e;
        (*bb).list.prev = e;
    }
}

/// `APR_BRIGADE_SENTINEL(bb)`: the brigade's list head posing as a bucket, where a walk
/// over its buckets ends.
///
/// # Safety
/// `bb` must be a live brigade.
pub unsafe fn brigade_sentinel(bb: *mut apr_bucket_brigade) -> *mut apr_bucket {
    // SAFETY: as in brigade_insert_tail; only the address is taken.
    unsafe { std::ptr::addr_of_mut!((*bb).list).cast::<apr_bucket>() }
}

/// `APR_BUCKET_IS_EOS(e)`.
///
/// # Safety
/// `e` must be a live bucket.
pub unsafe fn bucket_is_eos(e: *const apr_bucket) -> bool {
    // SAFETY: the caller guarantees `e` is live; the EOS type is a static of libaprutil.
    unsafe { std::ptr::eq((*e).type_, std::ptr::addr_of!(apr_bucket_type_eos)) }
}

/// `APR_BUCKET_IS_METADATA(e)`.
///
/// # Safety
/// `e` must be a live bucket.
pub unsafe fn bucket_is_metadata(e: *const apr_bucket) -> bool {
    // SAFETY: the caller guarantees `e` is live, and a live bucket has a type.
    unsafe { (*(*e).type_).is_metadata == apr_bucket_type_t_APR_BUCKET_METADATA }
}

/// `apr_bucket_read(e, &str, &len, block)`: the bucket's bytes, which stay valid while the
/// bucket does (reading a bucket of unknown length may split it, leaving the rest after it).
///
/// # Safety
/// `e` must be a live data bucket.
pub unsafe fn bucket_read(
    e: *mut apr_bucket,
    block: apr_read_type_e,
) -> Result<(*const u8, usize), apr_status_t> {
    let mut data: *const std::ffi::c_char = std::ptr::null();
    let mut len: apr_size_t = 0;
    // SAFETY: the caller guarantees `e` is live; every bucket type has a read function.
    let status = unsafe {
        match (*(*e).type_).read {
            Some(read) => read(e, &mut data, &mut len, block),
            None => APR_ENOTIMPL as apr_status_t,
        }
    };
    if status != APR_SUCCESS as apr_status_t {
        return Err(status);
    }
    Ok((data.cast::<u8>(), len))
}

const _: () = assert!(std::mem::offset_of!(apr_bucket, link) == 0);
