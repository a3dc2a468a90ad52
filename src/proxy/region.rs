//! The worker's side of the region it shares with a daemon process over one connection (the
//! protocol is in `crate::wire`, the mapping in `crate::httpd::shm`): which data slots Apache
//! still sends from, and the leases that keep a slot, and the region, alive until Apache is
//! done with it, which may be after the request and even the connection are gone.

#![forbid(unsafe_code)]

use std::io::{self, IoSlice};
use std::os::fd::OwnedFd;

use nix::sys::uio::pwritev;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::httpd::shm::Region;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::wire::region::{
    body_slot_offset, data_slot_offset, BODY_SLOTS, BODY_SLOT_LEN, DATA_SLOTS, DATA_SLOT_LEN,
};

#[derive(Debug)]
pub struct WorkerRegion {
    region: Region,
    /// The memfd, kept for writing body slots: Apache writes them with pwritev and never
    /// through its mapping, so their pages stay out of the Apache child's memory (only the
    /// daemon, which reads them, maps them in).
    fd: OwnedFd,
    /// One bit per data slot Apache holds. Kept here, not in the shared state words, which the
    /// daemon can write: a daemon naming a slot Apache still sends from is caught.
    held: AtomicU32,
    /// A slot was used since the pages were last released (`release_pages`).
    used: AtomicBool,
}

const _: () = assert!(DATA_SLOTS <= 32 && BODY_SLOTS == 2);

impl WorkerRegion {
    /// A new region; its `descriptor` goes to the daemon with the connection's first request.
    pub fn create() -> io::Result<Arc<WorkerRegion>> {
        let (region, fd) = Region::create()?;
        Ok(Arc::new(WorkerRegion {
            region,
            fd,
            held: AtomicU32::new(0),
            used: AtomicBool::new(false),
        }))
    }

    /// The region's memfd, for the daemon.
    pub fn descriptor(&self) -> &OwnedFd {
        &self.fd
    }

    /// Takes data slot `slot`, which the daemon just filled, until the lease is dropped; None
    /// when Apache still holds it (the daemon broke the protocol).
    pub fn lease(self: &Arc<Self>, slot: usize) -> Option<SlotLease> {
        self.used.store(true, Ordering::Release);
        let bit = 1u32 << slot;
        if slot >= DATA_SLOTS || self.held.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return None;
        }
        Some(SlotLease {
            region: Arc::clone(self),
            slot,
        })
    }

    /// True once the daemon has mapped the region: only then may a request wait in its queue
    /// (see `wire::region::PICKUP_OFFSET`).
    pub fn mapped_by_daemon(&self) -> bool {
        self.region.mapped_by_daemon()
    }

    /// The pickup word (see `wire::region::PICKUP_OFFSET`): the request about to be sent
    /// waits in its process's queue and may be withdrawn.
    pub fn mark_queued(&self) {
        self.region.mark_queued();
    }

    /// True while the queued request has not been picked up by a daemon thread.
    pub fn still_queued(&self) -> bool {
        self.region.still_queued()
    }

    /// Withdraws the queued request; false if a daemon thread picked it up first.
    pub fn withdraw(&self) -> bool {
        self.region.withdraw()
    }

    /// Frees the pages of the body slots and of the data slots Apache does not hold (real
    /// memory: the memfd's, which both processes map), for a connection no request uses: the
    /// daemon writes a data slot, and Apache a body slot, only during a request. The next big
    /// body maps fresh pages. False if no slot was used since the last time (nothing to free).
    /// The control page, with the slots' state words, is never touched.
    pub fn release_pages(&self) -> bool {
        if !self.used.swap(false, Ordering::AcqRel) {
            return false;
        }
        let held = self.held.load(Ordering::Acquire);
        if held != 0 {
            // Freed the next time, once Apache has sent them.
            self.used.store(true, Ordering::Release);
        }
        let slots = (0..BODY_SLOTS)
            .map(|slot| (body_slot_offset(slot), BODY_SLOT_LEN))
            .chain(
                (0..DATA_SLOTS)
                    .filter(|slot| held & (1u32 << slot) == 0)
                    .map(|slot| (data_slot_offset(slot), DATA_SLOT_LEN)),
            );
        for (offset, len) in slots {
            let _ = fallocate(
                &self.fd,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            );
        }
        true
    }

    /// Body slot `slot` (0 or 1), for the client's body bytes.
    pub fn body_slot(&self, slot: usize) -> BodySlot<'_> {
        self.used.store(true, Ordering::Release);
        BodySlot {
            fd: &self.fd,
            slot: slot.min(BODY_SLOTS - 1),
        }
    }
}

/// A body slot of a region, for `Client::read_body_into`.
#[derive(Debug, Clone, Copy)]
pub struct BodySlot<'a> {
    fd: &'a OwnedFd,
    slot: usize,
}

impl BodySlot<'_> {
    pub const LEN: usize = BODY_SLOT_LEN;

    /// Writes `parts`, in order, into the slot from `offset` on, cut at the slot's end; returns
    /// how many bytes it wrote (all that fit, unless the write fails).
    pub fn write_at(&self, offset: usize, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut room = Self::LEN.saturating_sub(offset);
        let mut fitting: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
        for part in parts.iter().filter(|part| !part.is_empty()) {
            if room == 0 {
                break;
            }
            let take = part.len().min(room);
            fitting.push(IoSlice::new(&part[..take]));
            room -= take;
        }
        let mut at = body_slot_offset(self.slot) + offset.min(Self::LEN);
        let mut written = 0;
        let mut rest: &mut [IoSlice<'_>] = &mut fitting;
        while !rest.is_empty() {
            let n = loop {
                match pwritev(self.fd, rest, at as libc::off_t) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other?,
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            written += n;
            at += n;
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(written)
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
    fn body_slot_writes_land_in_the_daemons_view_cut_at_the_slot_end() {
        let region = WorkerRegion::create().unwrap();
        let daemon = Region::map(region.descriptor()).unwrap();
        let slot = region.body_slot(1);
        let parts = [IoSlice::new(b"ab"), IoSlice::new(b""), IoSlice::new(b"cde")];
        assert_eq!(slot.write_at(10, &parts).unwrap(), 5);
        assert_eq!(&daemon.body_slot(1)[10..15], b"abcde");
        assert_eq!(
            &daemon.body_slot(0)[10..15],
            &[0; 5],
            "the other slot is untouched"
        );
        // Only what fits before the slot's end is written.
        let tail = vec![7u8; 100];
        let written = slot
            .write_at(BODY_SLOT_LEN - 40, &[IoSlice::new(&tail)])
            .unwrap();
        assert_eq!(written, 40);
        assert_eq!(&daemon.body_slot(1)[BODY_SLOT_LEN - 40..], &[7u8; 40]);
        assert_eq!(slot.write_at(BODY_SLOT_LEN, &parts).unwrap(), 0);
        assert_eq!(slot.write_at(3, &[IoSlice::new(b"")]).unwrap(), 0);
    }

    #[test]
    fn released_pages_read_as_zero_except_the_slots_apache_still_sends_from() {
        let region = WorkerRegion::create().unwrap();
        let daemon = Region::map(region.descriptor()).unwrap();
        let sent = daemon.claim_data_slot(DATA_SLOTS).unwrap();
        daemon.fill_data_slot(sent, b"held");
        let lease = region.lease(sent).unwrap();
        let done = daemon.claim_data_slot(DATA_SLOTS).unwrap();
        daemon.fill_data_slot(done, b"done");
        region
            .body_slot(0)
            .write_at(0, &[IoSlice::new(b"body")])
            .unwrap();
        let done_lease = region.lease(done).unwrap();
        drop(done_lease);
        assert!(region.release_pages());
        assert_eq!(lease.copy(4), b"held", "a held slot keeps its bytes");
        assert_eq!(region.region.copy_from_data_slot(done, 4), [0; 4]);
        assert_eq!(&daemon.body_slot(0)[..4], &[0; 4]);
        // The state words survive: the held slot stays claimed, the released one is free.
        assert_eq!(daemon.claim_data_slot(DATA_SLOTS), Some(done));
        daemon.fill_data_slot(done, b"next");
        assert_eq!(region.region.copy_from_data_slot(done, 4), b"next");
        // The held slot is freed the next time, once Apache has sent it.
        drop(lease);
        assert!(region.release_pages());
        assert_eq!(region.region.copy_from_data_slot(sent, 4), [0; 4]);
        assert!(!region.release_pages(), "nothing used since");
    }

    #[test]
    fn a_slot_is_leased_once_until_its_lease_is_dropped() {
        let region = WorkerRegion::create().unwrap();
        let daemon = Region::map(region.descriptor()).unwrap();
        let slot = daemon.claim_data_slot(DATA_SLOTS).unwrap();
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
        assert_eq!(daemon.claim_data_slot(DATA_SLOTS), Some(slot));
    }
}
