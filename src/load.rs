//! The load board: one slot per daemon process of the current generation, in memory shared by
//! Apache's children and the daemons (the httpd layer maps it before anything forks). A daemon
//! counts the threads it has serving a request; a worker reads the count before it reuses an
//! idle connection to that process, and opens a fresh connection instead when the process is
//! busy. A fresh connection is accepted by whichever process of the group has a thread free,
//! so one slow request never holds up the next while another process of its group idles.
//!
//! The board only steers the choice among a group's own connections: a daemon that scribbles
//! on its slot can slow its own group down, never reach another group (each request still
//! goes over its group's own socket and passes the origin check).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// One daemon process's counters. Zeroed memory is a valid, empty slot.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct LoadSlot {
    /// Threads serving a request right now.
    busy: AtomicU32,
    /// The process's threads= (zero until it has started).
    threads: AtomicU32,
}

impl LoadSlot {
    /// Called by a daemon process when it starts serving: it owns this slot from now on.
    pub fn open(&self, threads: u32) {
        self.busy.store(0, Ordering::Relaxed);
        self.threads.store(threads, Ordering::Release);
    }

    /// A thread took a request.
    pub fn enter(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
    }

    /// A thread finished a request.
    pub fn leave(&self) {
        // Saturating: a slot reopened by a replacement process must not wrap.
        let _ = self
            .busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// True when the process has a thread that is not serving a request.
    pub fn has_free_thread(&self) -> bool {
        self.busy.load(Ordering::Acquire) < self.threads.load(Ordering::Acquire)
    }
}

/// The whole board, or an empty one where it could not be mapped (then every idle connection
/// counts as usable, and the daemons keep no counts).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadBoard {
    slots: &'static [LoadSlot],
}

impl LoadBoard {
    pub fn new(slots: &'static [LoadSlot]) -> LoadBoard {
        LoadBoard { slots }
    }

    pub fn slot(&self, index: usize) -> Option<&'static LoadSlot> {
        self.slots.get(index)
    }

    /// Whether the process in `slot` can take a request now; an unknown slot (never reported,
    /// or out of range) counts as free.
    pub fn is_free(&self, slot: Option<usize>) -> bool {
        slot.and_then(|index| self.slot(index))
            .is_none_or(LoadSlot::has_free_thread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(n: usize) -> LoadBoard {
        let slots: Vec<LoadSlot> = (0..n).map(|_| LoadSlot::default()).collect();
        LoadBoard::new(Box::leak(slots.into_boxed_slice()))
    }

    #[test]
    fn a_process_is_free_until_all_its_threads_are_busy() {
        let board = board(2);
        let slot = board.slot(1).expect("slot 1");
        assert!(!slot.has_free_thread(), "not started yet: no threads");
        slot.open(2);
        assert!(board.is_free(Some(1)));
        slot.enter();
        assert!(board.is_free(Some(1)));
        slot.enter();
        assert!(!board.is_free(Some(1)));
        slot.leave();
        assert!(board.is_free(Some(1)));
    }

    #[test]
    fn unknown_slots_count_as_free_and_leave_never_wraps() {
        let board = board(1);
        assert!(board.is_free(None));
        assert!(board.is_free(Some(7)));
        let slot = board.slot(0).expect("slot 0");
        slot.leave();
        slot.open(1);
        assert!(slot.has_free_thread());
        assert!(LoadBoard::default().is_free(Some(0)));
    }
}
