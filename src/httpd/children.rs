//! Daemon processes as APR "other children": the MPM's main loop reaps them and tells us when
//! one died (so the supervisor can replace it) or when Apache is restarting.

use std::ffi::{c_int, c_void};

use super::ffi;
use super::module::{guarded, pconf};
use crate::daemon::supervisor;

/// The registration data is the slot number plus one (so it is never NULL).
fn data_for(slot: usize) -> *mut c_void {
    (slot + 1) as *mut c_void
}

unsafe extern "C" fn maintenance(reason: c_int, data: *mut c_void, status: c_int) {
    guarded((), || {
        let slot = (data as usize).wrapping_sub(1);
        match reason as u32 {
            ffi::APR_OC_REASON_DEATH | ffi::APR_OC_REASON_LOST => {
                // SAFETY: removes our registration for this slot; APR stops iterating after
                // delivering DEATH, so unlinking here is safe (mod_wsgi does the same).
                unsafe { ffi::apr_proc_other_child_unregister(data) };
                let status = (reason as u32 == ffi::APR_OC_REASON_DEATH).then_some(status);
                supervisor::child_died(slot, status);
            }
            ffi::APR_OC_REASON_RESTART => supervisor::apache_stopping(),
            _ => {}
        }
    });
}

/// Registers `pid` with the MPM's child reaping for the current generation.
pub fn watch(pid: i32, slot: usize) {
    let pool = pconf();
    if pool.is_null() {
        return;
    }
    // SAFETY: pconf is live for this generation; the apr_proc_t is allocated from it and so
    // outlives the registration, which APR removes when pconf is cleared.
    unsafe {
        let proc_ =
            ffi::apr_palloc(pool, std::mem::size_of::<ffi::apr_proc_t>()).cast::<ffi::apr_proc_t>();
        if proc_.is_null() {
            return;
        }
        proc_.write(ffi::apr_proc_t {
            pid,
            ..Default::default()
        });
        ffi::apr_proc_other_child_register(
            proc_,
            Some(maintenance),
            data_for(slot),
            std::ptr::null_mut(),
            pool,
        );
    }
}
