//! The worker's side of the region it shares with a daemon process over one connection (the
//! protocol is in `crate::wire`, the mapping in `crate::httpd::shm`): which data slots Apache
//! still sends from, and the leases that keep a slot, and the region, alive until Apache is
//! done with it, which may be after the request and even the connection are gone.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::httpd::shm::Region;
use crate::wire::region::{BODY_SLOTS, BODY_SLOT_LEN, DATA_SLOTS, DATA_SLOT_LEN};

#[derive(Debug)]
pub struct WorkerRegion {
    region: Region,
    /// One bit per data slot Apache holds. Kept here, not in the shared state words, which the
    /// daemon can write: a daemon naming a slot Apache still sends from is caught.
    held: AtomicU32,
}

const _: () = assert!(DATA_SLOTS <= 32 && BODY_SLOTS == 2);

impl WorkerRegion {
    /// A new region and the memfd to send to the daemon with the connection's first request.
    pub fn create() -> io::Result<(Arc<WorkerRegion>, OwnedFd)> {
        let (region, fd) = Region::create()?;
        let region = WorkerRegion {
            region,
            held: AtomicU32::new(0),
        };
        Ok((Arc::new(region), fd))
    }

    /// Takes data slot `slot`, which the daemon just filled, until the lease is dropped; None
    /// when Apache still holds it (the daemon broke the protocol).
    pub fn lease(self: &Arc<Self>, slot: usize) -> Option<SlotLease> {
        let bit = 1u32 << slot;
        if slot >= DATA_SLOTS || self.held.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return None;
        }
        Some(SlotLease {
            region: Arc::clone(self),
            slot,
        })
    }

    /// Body slot `slot` (0 or 1), for the client's body bytes.
    pub fn body_slot(&self, slot: usize) -> BodySlot<'_> {
        BodySlot {
            region: &self.region,
            slot: slot.min(BODY_SLOTS - 1),
        }
    }
}

/// A body slot of a region, for `Client::read_body_into`.
#[derive(Debug, Clone, Copy)]
pub struct BodySlot<'a> {
    region: &'a Region,
    slot: usize,
}

impl BodySlot<'_> {
    /// The slot's BODY_SLOT_LEN bytes start here.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.region.body_slot_ptr(self.slot)
    }

    pub const LEN: usize = BODY_SLOT_LEN;

    /// Copies `data` in at `offset` (clamped to the slot); returns how many bytes fit.
    pub fn copy_in(&self, offset: usize, data: &[u8]) -> usize {
        self.region.copy_into_body_slot(self.slot, offset, data)
    }
}

/// Apache's hold on a data slot: while it lives, the daemon does not refill the slot and the
/// region stays mapped. Dropping it hands the slot back (and wakes a daemon waiting for one).
#[derive(Debug)]
pub struct SlotLease {
    region: Arc<WorkerRegion>,
    slot: usize,
}

impl SlotLease {
    /// The slot's DATA_SLOT_LEN bytes start here.
    pub fn as_ptr(&self) -> *const u8 {
        self.region.region.data_slot_ptr(self.slot)
    }

    pub const LEN: usize = DATA_SLOT_LEN;

    /// A private copy of the first `len` bytes.
    pub fn copy(&self, len: usize) -> Vec<u8> {
        self.region.region.copy_from_data_slot(self.slot, len)
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        // Our bit first: once the slot is free the daemon may fill it and name it again.
        self.region
            .held
            .fetch_and(!(1u32 << self.slot), Ordering::AcqRel);
        self.region.region.release_data_slot(self.slot);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_slot_is_leased_once_until_its_lease_is_dropped() {
        let (region, fd) = WorkerRegion::create().unwrap();
        let daemon = Region::map(&fd).unwrap();
        let slot = daemon.claim_data_slot().unwrap();
        daemon.fill_data_slot(slot, b"abc");
        let lease = region.lease(slot).unwrap();
        assert_eq!(lease.copy(3), b"abc");
        assert!(
            region.lease(slot).is_none(),
            "a held slot must not be leased twice"
        );
        assert!(region.lease(DATA_SLOTS).is_none());
        // The lease keeps the mapping: the region itself may go first.
        drop(region);
        assert_eq!(lease.copy(3), b"abc");
        drop(lease);
        // Released: the daemon can claim it again (it is the lowest free slot).
        assert_eq!(daemon.claim_data_slot(), Some(slot));
    }
}
