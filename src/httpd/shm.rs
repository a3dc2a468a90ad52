//! The memory an Apache worker shares with a daemon process over one connection: the region
//! laid out in `wire::region`, created and sealed by the worker, mapped by both. It sits in the
//! unsafe boundary because mapping memory and touching bytes that another process also
//! touches cannot be written in safe Rust; the daemon side uses it too. No httpd types here.
//!
//! Who may touch what is the wire protocol's business (see `crate::wire`): the worker writes a
//! body slot only when a ReadBody names it, the daemon writes a data slot only while its state
//! word says it is free. The worker never forms a Rust reference to region bytes (it hands
//! raw pointers to Apache, or copies), so a daemon that breaks the protocol can garble only
//! its own request's bytes. It cannot shrink the region either: the memfd is sealed, so no
//! access can fault.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::wire::region::{
    body_slot_offset, data_slot_offset, state_offset, waiting_parts, waiting_word, BODY_SLOTS,
    BODY_SLOT_LEN, DATA_SLOTS, DATA_SLOT_LEN, PICKUP_IDLE, PICKUP_OFFSET, PICKUP_QUEUED,
    PICKUP_UNMAPPED, PICKUP_WITHDRAWN, REGION_LEN, WAITING_OFFSET,
};

/// How long a daemon waiting for a data slot waits for several to be free at once, before
/// it takes the first one released. Each wake is a cross-CPU interrupt that the sending
/// Apache thread pays for; asking for all but one slot made downloads at c=1 faster (1 MiB
/// ones by 30-50%, 64 MiB ones by 3-22%). Bounded so that a filter holding on to some slots
/// costs the daemon at most this much per slot, and a slow client no wait at all (Apache
/// still has slots to send).
const BATCH_WAIT: Duration = Duration::from_millis(2);

/// One mapping of a region.
#[derive(Debug)]
pub struct Region {
    base: NonNull<u8>,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics or through
// the protocol's slot ownership, which the callers keep (see the module docs).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

fn last_error(what: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

impl Region {
    /// Worker side: a new region (zeroed: every data slot free), and the descriptor to send to
    /// the daemon. The memfd is sealed against shrinking and growing, so neither side can
    /// make the other's mapping fault.
    pub fn create() -> io::Result<(Region, OwnedFd)> {
        // SAFETY: a constant, NUL-terminated name; flags are valid.
        let raw = unsafe {
            libc::memfd_create(
                c"mod_wsgi_rs".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(last_error("memfd_create"));
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fd is an open memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), REGION_LEN as libc::off_t) } != 0 {
            return Err(last_error("ftruncate on the shared region"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fd is an open memfd created with MFD_ALLOW_SEALING.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(last_error("sealing the shared region"));
        }
        let region = Region::map_fd(&fd)?;
        Ok((region, fd))
    }

    /// Daemon side: maps a region a worker sent, once it is known to be what the protocol
    /// says: exactly REGION_LEN bytes, sealed so it cannot shrink under the mapping.
    pub fn map(fd: &OwnedFd) -> io::Result<Region> {
        // SAFETY: fd is open; F_GET_SEALS takes no argument.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the shared region is not a memfd sealed against shrinking",
            ));
        }
        // SAFETY: an all-zero stat is a valid out-parameter.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open and stat is writable.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
            return Err(last_error("fstat on the shared region"));
        }
        if usize::try_from(stat.st_size).ok() != Some(REGION_LEN) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the shared region has {} bytes, not {REGION_LEN}",
                    stat.st_size
                ),
            ));
        }
        Region::map_fd(fd)
    }

    fn map_fd(fd: &OwnedFd) -> io::Result<Region> {
        // SAFETY: a fresh shared mapping of an open file of at least REGION_LEN bytes; nothing
        // else in this process uses the address range it returns.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_error("mmap of the shared region"));
        }
        NonNull::new(base.cast::<u8>())
            .map(|base| Region { base })
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset + 4 <= REGION_LEN && offset % 4 == 0);
        // SAFETY: offset is inside the mapping and 4-byte aligned (the mapping is page
        // aligned); the word is only ever accessed atomically, by both processes.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn state(&self, slot: usize) -> &AtomicU32 {
        self.word(state_offset(slot.min(DATA_SLOTS - 1)))
    }

    /// Daemon side: takes a free data slot among the first `slots` (marking it used), if
    /// there is one.
    pub fn claim_data_slot(&self, slots: usize) -> Option<usize> {
        (0..slots.clamp(1, DATA_SLOTS)).find(|&slot| {
            self.state(slot)
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// Daemon side: like `claim_data_slot`, but sleeps up to `timeout` for the worker to
    /// release one. For the first BATCH_WAIT it asks to be woken only once all but one of
    /// its slots are free (see `wire::region::waiting_word`), then by any release.
    pub fn wait_for_data_slot(&self, slots: usize, timeout: Duration) -> Option<usize> {
        if let Some(slot) = self.claim_data_slot(slots) {
            return Some(slot);
        }
        let waiting = self.word(WAITING_OFFSET);
        let start = Instant::now();
        let deadline = start + timeout;
        let batch_until = (start + BATCH_WAIT).min(deadline);
        loop {
            let now = Instant::now();
            let (word, until) = if now < batch_until {
                (waiting_word(slots, slots.saturating_sub(1)), batch_until)
            } else {
                (waiting_word(slots, 1), deadline)
            };
            // Announce the wait, then look again: a release between the two either shows up
            // in the second look or finds the announcement and wakes us.
            waiting.store(word, Ordering::SeqCst);
            if let Some(slot) = self.claim_data_slot(slots) {
                return Some(slot);
            }
            if now >= deadline {
                return None;
            }
            let left = until.saturating_duration_since(now);
            let wait = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: the waiting word lives in this mapping for as long as self; FUTEX_WAIT
            // (not _PRIVATE: the word is shared with another process) returns at once if the
            // word is no longer the one announced.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    waiting.as_ptr(),
                    libc::FUTEX_WAIT,
                    word,
                    &wait as *const libc::timespec,
                    std::ptr::null::<u32>(),
                    0u32,
                );
            }
        }
    }

    /// Daemon side: copies `data` (at most DATA_SLOT_LEN bytes; the rest is not copied) into
    /// a slot it claimed. Returns how many bytes it copied.
    pub fn fill_data_slot(&self, slot: usize, data: &[u8]) -> usize {
        let len = data.len().min(DATA_SLOT_LEN);
        let slot = slot.min(DATA_SLOTS - 1);
        // SAFETY: the destination is inside the mapping (slot and len are clamped to the
        // layout) and cannot overlap `data`, which is process-private memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(data_slot_offset(slot)),
                len,
            );
        }
        len
    }

    /// Daemon side: body slot `slot`, which the worker filled and does not touch again until
    /// a ReadBody names the slot, which the daemon sends only once it is done with these bytes.
    pub fn body_slot(&self, slot: usize) -> &[u8] {
        // SAFETY: the slot is inside the mapping (clamped to the layout), and by the protocol
        // above nobody writes it while the daemon holds this borrow.
        unsafe { std::slice::from_raw_parts(self.body_slot_ptr(slot), BODY_SLOT_LEN) }
    }

    /// Where body slot `slot` starts (BODY_SLOT_LEN bytes). The worker writes body slots with
    /// pwritev on the memfd (proxy::region), never through this pointer.
    fn body_slot_ptr(&self, slot: usize) -> *mut u8 {
        // SAFETY: the offset is inside the mapping (the slot is clamped to the layout).
        unsafe {
            self.base
                .as_ptr()
                .add(body_slot_offset(slot.min(BODY_SLOTS - 1)))
        }
    }

    /// Worker side: where data slot `slot` starts (DATA_SLOT_LEN bytes), for Apache to send.
    pub fn data_slot_ptr(&self, slot: usize) -> *mut u8 {
        // SAFETY: the offset is inside the mapping (the slot is clamped to the layout).
        unsafe {
            self.base
                .as_ptr()
                .add(data_slot_offset(slot.min(DATA_SLOTS - 1)))
        }
    }

    /// Tests' stand-in for a worker: copies `data` into body slot `slot` at `offset` (clamped
    /// to the slot). Returns how many bytes it copied.
    #[cfg(test)]
    pub fn copy_into_body_slot(&self, slot: usize, offset: usize, data: &[u8]) -> usize {
        let offset = offset.min(BODY_SLOT_LEN);
        let len = data.len().min(BODY_SLOT_LEN - offset);
        // SAFETY: the destination is inside the slot; `data` is private memory.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.body_slot_ptr(slot).add(offset), len);
        }
        len
    }

    /// Tests: true while a daemon's announcement that it waits for a data slot stands (set by
    /// `wait_for_data_slot`, cleared by the release that wakes it).
    #[cfg(test)]
    pub fn daemon_waits_for_a_slot(&self) -> bool {
        self.word(WAITING_OFFSET).load(Ordering::SeqCst) != 0
    }

    /// Worker side: a private copy of the first `len` bytes of data slot `slot`, for clients
    /// that cannot send from the slot itself.
    pub fn copy_from_data_slot(&self, slot: usize, len: usize) -> Vec<u8> {
        let len = len.min(DATA_SLOT_LEN);
        let mut out = vec![0u8; len];
        // SAFETY: the source is inside the slot; `out` is private memory of len bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data_slot_ptr(slot), out.as_mut_ptr(), len);
        }
        out
    }

    /// Worker side: true once the daemon has mapped the region (so it sees withdrawals).
    pub fn mapped_by_daemon(&self) -> bool {
        self.word(PICKUP_OFFSET).load(Ordering::SeqCst) != PICKUP_UNMAPPED
    }

    /// Worker side: the request about to be sent waits in the daemon process's queue (no
    /// thread is free there), so it may be withdrawn until a thread picks it up.
    pub fn mark_queued(&self) {
        self.word(PICKUP_OFFSET)
            .store(PICKUP_QUEUED, Ordering::SeqCst);
    }

    /// Worker side: true while the queued request has not been picked up.
    pub fn still_queued(&self) -> bool {
        self.word(PICKUP_OFFSET).load(Ordering::SeqCst) == PICKUP_QUEUED
    }

    /// Worker side: withdraws the queued request, unless a daemon thread picked it up first.
    pub fn withdraw(&self) -> bool {
        self.word(PICKUP_OFFSET)
            .compare_exchange(
                PICKUP_QUEUED,
                PICKUP_WITHDRAWN,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Daemon side: a thread picks up the request it just read; false if the worker withdrew
    /// it (it went to another process).
    pub fn pick_up(&self) -> bool {
        self.word(PICKUP_OFFSET).swap(PICKUP_IDLE, Ordering::SeqCst) != PICKUP_WITHDRAWN
    }

    /// Worker side: Apache is done with data slot `slot`; the daemon may fill it again (and is
    /// woken if it waits for a slot).
    pub fn release_data_slot(&self, slot: usize) {
        self.state(slot).store(0, Ordering::SeqCst);
        let waiting = self.word(WAITING_OFFSET);
        let word = waiting.load(Ordering::SeqCst);
        if word == 0 {
            return;
        }
        let (slots, wanted) = waiting_parts(word);
        let free = (0..slots)
            .filter(|&s| self.state(s).load(Ordering::SeqCst) == 0)
            .count();
        if free < wanted {
            return;
        }
        if waiting.swap(0, Ordering::SeqCst) != 0 {
            // SAFETY: the word lives in this mapping; waking has no other effect.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    waiting.as_ptr(),
                    libc::FUTEX_WAKE,
                    i32::MAX,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<u32>(),
                    0u32,
                );
            }
        }
    }
}

/// Receives bytes from `stream` into `buf`, keeping any descriptors that came with them
/// (SCM_RIGHTS, close-on-exec) in `fds`. Like `read`: Ok(0) at the end of the stream.
pub fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let bytes = msg.bytes;
    let cmsgs = msg.cmsgs().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer sent more descriptors than expected",
        )
    })?;
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed this descriptor for us; nothing else owns
                // it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(bytes)
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in map_fd, unmapped once; no borrow of it outlives self, and
        // slot pointers handed to Apache keep a share of the region alive (proxy::region).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), REGION_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    #[test]
    fn both_mappings_see_the_same_bytes_and_slot_states() {
        let (worker, fd) = Region::create().unwrap();
        let daemon = Region::map(&fd).unwrap();
        drop(fd);
        // Body: the worker writes, the daemon reads.
        assert_eq!(worker.copy_into_body_slot(1, 3, b"hello"), 5);
        assert_eq!(&daemon.body_slot(1)[3..8], b"hello");
        // Data: the daemon claims every slot, fills one, the worker reads and releases it.
        let claimed: Vec<usize> =
            std::iter::from_fn(|| daemon.claim_data_slot(DATA_SLOTS)).collect();
        assert_eq!(claimed, (0..DATA_SLOTS).collect::<Vec<_>>());
        assert_eq!(daemon.fill_data_slot(2, b"world"), 5);
        assert_eq!(worker.copy_from_data_slot(2, 5), b"world");
        assert_eq!(daemon.claim_data_slot(DATA_SLOTS), None);
        worker.release_data_slot(2);
        assert_eq!(daemon.claim_data_slot(DATA_SLOTS), Some(2));
    }

    #[test]
    fn a_daemon_limited_to_fewer_slots_waits_for_those_only() {
        let (worker, fd) = Region::create().unwrap();
        let daemon = Region::map(&fd).unwrap();
        assert_eq!(daemon.claim_data_slot(1), Some(0));
        assert_eq!(
            daemon.claim_data_slot(1),
            None,
            "slot 1 is beyond the limit"
        );
        assert_eq!(
            daemon.wait_for_data_slot(1, Duration::from_millis(20)),
            None
        );
        worker.release_data_slot(0);
        assert_eq!(
            daemon.claim_data_slot(0),
            Some(0),
            "a limit of 0 still means one slot"
        );
        assert_eq!(daemon.claim_data_slot(2), Some(1));
        assert_eq!(daemon.claim_data_slot(DATA_SLOTS + 9), Some(2));
    }

    #[test]
    fn a_release_wakes_a_waiting_daemon_only_once_enough_slots_are_free() {
        let (worker, fd) = Region::create().unwrap();
        let daemon = Region::map(&fd).unwrap();
        while daemon.claim_data_slot(DATA_SLOTS).is_some() {}
        let waiting = daemon.word(WAITING_OFFSET);
        // What a daemon waiting in its first BATCH_WAIT announces.
        waiting.store(waiting_word(DATA_SLOTS, DATA_SLOTS - 1), Ordering::SeqCst);
        for slot in 0..DATA_SLOTS - 2 {
            worker.release_data_slot(slot);
            assert_ne!(
                waiting.load(Ordering::SeqCst),
                0,
                "woken with {} free",
                slot + 1
            );
        }
        worker.release_data_slot(DATA_SLOTS - 2);
        assert_eq!(waiting.load(Ordering::SeqCst), 0, "all but one free: woken");
        // After BATCH_WAIT it asks for any slot.
        assert_eq!(daemon.claim_data_slot(DATA_SLOTS), Some(0));
        waiting.store(waiting_word(DATA_SLOTS, 1), Ordering::SeqCst);
        while daemon.claim_data_slot(DATA_SLOTS).is_some() {}
        worker.release_data_slot(3);
        assert_eq!(waiting.load(Ordering::SeqCst), 0);
    }

    /// A daemon thread waiting (up to 20 s) for one of its first `slots` data slots.
    fn wait_in_thread(
        daemon: &Arc<Region>,
        slots: usize,
    ) -> std::thread::JoinHandle<Option<usize>> {
        let daemon = Arc::clone(daemon);
        std::thread::spawn(move || daemon.wait_for_data_slot(slots, Duration::from_secs(20)))
    }

    #[test]
    fn a_waiting_daemon_gets_a_slot_released_alone_and_one_of_several() {
        let (worker, fd) = Region::create().unwrap();
        let daemon = Arc::new(Region::map(&fd).unwrap());
        while daemon.claim_data_slot(DATA_SLOTS).is_some() {}
        let started = Instant::now();
        assert_eq!(
            daemon.wait_for_data_slot(DATA_SLOTS, Duration::from_millis(30)),
            None
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
        // One slot released: taken once the batch wait is over.
        let waiter = wait_in_thread(&daemon, DATA_SLOTS);
        std::thread::sleep(Duration::from_millis(50));
        let released = Instant::now();
        worker.release_data_slot(1);
        assert_eq!(waiter.join().unwrap(), Some(1));
        assert!(released.elapsed() < Duration::from_secs(10));
        // Several released while it sleeps: it wakes and takes one.
        let waiter = wait_in_thread(&daemon, DATA_SLOTS);
        std::thread::sleep(Duration::from_millis(50));
        let released = Instant::now();
        for slot in [0, 2, 3] {
            worker.release_data_slot(slot);
        }
        assert!(waiter.join().unwrap().is_some());
        assert!(released.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_daemon_limited_to_one_slot_is_woken_by_its_release() {
        let (worker, fd) = Region::create().unwrap();
        let daemon = Arc::new(Region::map(&fd).unwrap());
        assert_eq!(daemon.claim_data_slot(1), Some(0));
        let waiter = wait_in_thread(&daemon, 1);
        std::thread::sleep(Duration::from_millis(50));
        let released = Instant::now();
        worker.release_data_slot(0);
        assert_eq!(waiter.join().unwrap(), Some(0));
        assert!(released.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn only_sealed_memfds_of_the_right_size_are_mapped() {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(Region::map(&OwnedFd::from(file)).is_err());
        // SAFETY: a constant name; valid flags.
        let raw = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(raw >= 0);
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fd is an open memfd.
        let resized = unsafe { libc::ftruncate(fd.as_raw_fd(), REGION_LEN as libc::off_t) };
        assert_eq!(resized, 0);
        let unsealed = Region::map(&fd).unwrap_err();
        assert!(unsealed.to_string().contains("sealed"), "{unsealed}");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        // SAFETY: fd is an open memfd created with MFD_ALLOW_SEALING.
        let sealed = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(sealed, 0);
        let small = Region::map(&fd).unwrap_err();
        assert!(small.to_string().contains("4096 bytes"), "{small}");
    }
}
