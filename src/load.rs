//! The load board: one slot per daemon process of a group, in memory shared by Apache's
//! children and the daemons (the httpd layer maps it before anything forks). A daemon counts
//! the threads it has serving a request; a worker that wants to reuse an idle connection to
//! that process first claims a place in its queue, which succeeds only while the requests
//! being served plus those sent but not yet picked up leave a thread free. The daemon gives the
//! claim back when it picks the request up. So one slow request never holds up the next while
//! another process idles.
//!
//! When no process has a thread free, the group is saturated and the request has to wait
//! somewhere. It waits in the queue of the process with the fewest requests served or queued
//! (at most `threads` beyond its threads), over a kept connection: each process takes its
//! queue first come, first served, and a kept connection costs no connect or accept. Such a
//! request stays withdrawable until a thread picks it up (`wire::region::PICKUP_OFFSET`): its
//! worker withdraws it and sends it again as soon as another process has a thread free, so a
//! queue stuck behind long requests does not hold it. Only when no queue has room (or the
//! worker keeps no connection to a process) does the request open a fresh connection, which
//! waits in the group's listen backlog for whichever process frees a thread first.
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
    /// Requests sent over kept connections that no thread has picked up yet.
    queued: AtomicU32,
    /// The process's threads= (zero until it has started).
    threads: AtomicU32,
    /// In a group's first slot only: which process (its index + 1; 0: none) holds the turn to
    /// restart for a limit all of them reach together (see `LoadBoard::take_restart_turn`).
    restart_turn: AtomicU32,
}

impl LoadSlot {
    /// Called by a daemon process when it starts serving: it owns this slot from now on.
    pub fn open(&self, threads: u32) {
        self.busy.store(0, Ordering::Relaxed);
        self.queued.store(0, Ordering::Relaxed);
        self.threads.store(threads, Ordering::Release);
    }

    /// Called by a daemon process when it begins to stop: from now on no worker reuses a
    /// connection to it (a fresh connection reaches the group's other processes or its
    /// replacement).
    pub fn close(&self) {
        self.threads.store(0, Ordering::Release);
    }

    /// A thread took a request.
    pub fn enter(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
    }

    /// A thread finished a request.
    pub fn leave(&self) {
        decrement(&self.busy);
    }

    /// A worker's claim on a thread of this process, for a request it is about to send over
    /// a kept connection: true (and counted) only if a thread will be free for it.
    pub fn try_claim(&self) -> bool {
        let threads = self.threads.load(Ordering::Acquire);
        let busy = self.busy.load(Ordering::Acquire);
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (busy.saturating_add(queued) < threads).then_some(queued + 1)
            })
            .is_ok()
    }

    /// A worker's place in this process's queue when no thread is free: true (and counted
    /// like a claim) while at most `threads` requests wait there beyond those being served.
    pub fn try_queue(&self) -> bool {
        let threads = self.threads.load(Ordering::Acquire);
        let busy = self.busy.load(Ordering::Acquire);
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (busy.saturating_add(queued) < threads.saturating_mul(2)).then_some(queued + 1)
            })
            .is_ok()
    }

    /// Requests being served or promised, or None for a process that is not serving (not
    /// started yet, or stopping).
    pub fn load(&self) -> Option<u32> {
        let threads = self.threads.load(Ordering::Acquire);
        let load = self
            .busy
            .load(Ordering::Acquire)
            .saturating_add(self.queued.load(Ordering::Acquire));
        (threads > 0).then_some(load)
    }

    /// A claimed request was picked up by a thread (daemon), or never sent (worker).
    pub fn release_claim(&self) {
        decrement(&self.queued);
    }

    /// True when the process has a thread that is neither serving nor promised a request.
    pub fn has_free_thread(&self) -> bool {
        let load = self
            .busy
            .load(Ordering::Acquire)
            .saturating_add(self.queued.load(Ordering::Acquire));
        load < self.threads.load(Ordering::Acquire)
    }
}

/// Saturating: a slot reopened by a replacement process (or a claim whose request was lost)
/// must not wrap.
fn decrement(counter: &AtomicU32) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
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

    /// Claims a thread of the process in `slot` for a request. `Some(None)`: the slot is
    /// unknown (never reported, or out of range) and counts as free, with nothing to give
    /// back; `None`: the process has no thread to spare.
    pub fn claim(&self, slot: Option<usize>) -> Option<Option<&'static LoadSlot>> {
        match slot.and_then(|index| self.slot(index)) {
            None => Some(None),
            Some(slot) => slot.try_claim().then_some(Some(slot)),
        }
    }

    /// A place in the queue of the process in `slot`, when it has no thread free (see
    /// `LoadSlot::try_queue`); None for an unknown slot or a full queue.
    pub fn queue(&self, slot: Option<usize>) -> Option<&'static LoadSlot> {
        let slot = self.slot(slot?)?;
        slot.try_queue().then_some(slot)
    }

    /// The process in `mine` starts serving; if it replaces the process that held the restart
    /// turn, the turn is free again.
    pub fn open(&self, mine: usize, threads: u32) {
        let Some(slot) = self.slot(mine) else {
            return;
        };
        slot.open(threads);
        if let (Some(first), Ok(holder)) = (self.slots.first(), u32::try_from(mine + 1)) {
            let _ =
                first
                    .restart_turn
                    .compare_exchange(holder, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// The process in `mine` asks for the turn to restart: granted (and held until its
    /// replacement opens the slot) only while every other process of the group serves and
    /// none holds the turn. So the processes of a group restart one at a time, and the group
    /// never stops serving all at once. Without a board, always granted.
    pub fn take_restart_turn(&self, mine: usize) -> bool {
        let Some(first) = self.slots.first() else {
            return true;
        };
        let Ok(me) = u32::try_from(mine + 1) else {
            return true;
        };
        let others_serve = self
            .slots
            .iter()
            .enumerate()
            .all(|(index, slot)| index == mine || slot.load().is_some());
        if !others_serve {
            return false;
        }
        match first
            .restart_turn
            .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(holder) => holder == me,
        }
    }

    /// Claims a free thread of a process other than the one in `except`: that process's
    /// index and slot (to give the claim back to), or None when no other process has one.
    pub fn claim_elsewhere(&self, except: Option<usize>) -> Option<(usize, &'static LoadSlot)> {
        self.slots
            .iter()
            .enumerate()
            .find(|&(index, slot)| Some(index) != except && slot.try_claim())
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
    fn a_process_is_free_until_its_threads_are_busy_or_promised() {
        let board = board(2);
        let slot = board.slot(1).expect("slot 1");
        assert!(!slot.has_free_thread(), "not started yet: no threads");
        assert!(board.claim(Some(1)).is_none());
        slot.open(3);
        slot.enter();
        assert!(board.claim(Some(1)).is_some(), "busy 1 of 3");
        assert!(board.claim(Some(1)).is_some(), "busy 1, queued 1 of 3");
        assert!(board.claim(Some(1)).is_none(), "busy 1, queued 2: full");
        assert!(!slot.has_free_thread());
        slot.release_claim();
        assert!(slot.has_free_thread());
        slot.leave();
        slot.release_claim();
        assert!(board.claim(Some(1)).is_some());
        slot.close();
        assert!(
            board.claim(Some(1)).is_none(),
            "a stopping process takes nothing new"
        );
    }

    #[test]
    fn a_saturated_process_queues_at_most_its_threads_more() {
        let board = board(2);
        let slot = board.slot(0).expect("slot 0");
        assert!(board.queue(Some(0)).is_none(), "not started yet");
        assert_eq!(slot.load(), None);
        slot.open(2);
        slot.enter();
        slot.enter();
        assert!(board.claim(Some(0)).is_none(), "both threads busy");
        assert!(board.queue(Some(0)).is_some(), "queued 1 beyond 2 busy");
        assert!(board.queue(Some(0)).is_some(), "queued 2 beyond 2 busy");
        assert!(board.queue(Some(0)).is_none(), "the queue is full");
        assert_eq!(slot.load(), Some(4));
        assert!(
            board.queue(None).is_none(),
            "an unknown process has no queue"
        );
        assert!(board.queue(Some(5)).is_none());
        slot.close();
        assert_eq!(slot.load(), None, "a stopping process takes nothing new");
        assert!(board.queue(Some(0)).is_none());
    }

    #[test]
    fn a_free_thread_elsewhere_is_claimed() {
        let board = board(3);
        let (a, b) = (
            board.slot(0).expect("slot 0"),
            board.slot(1).expect("slot 1"),
        );
        a.open(1);
        b.open(1);
        a.enter();
        b.enter();
        assert!(
            board.claim_elsewhere(Some(0)).is_none(),
            "slot 2 never started"
        );
        a.leave();
        assert!(
            board.claim_elsewhere(Some(0)).is_none(),
            "only the excluded process is free"
        );
        let (index, claimed) = board.claim_elsewhere(Some(1)).expect("slot 0 is free");
        assert_eq!(index, 0);
        assert!(!claimed.has_free_thread(), "its one thread is promised now");
        assert!(
            board.claim_elsewhere(None).is_none(),
            "a second worker finds nothing left to claim"
        );
    }

    #[test]
    fn processes_take_turns_to_restart() {
        let board = board(3);
        for index in 0..3 {
            board.open(index, 2);
        }
        assert!(board.take_restart_turn(1));
        assert!(board.take_restart_turn(1), "asking again keeps it");
        assert!(!board.take_restart_turn(0), "1 holds the turn");
        board.slot(1).expect("slot 1").close();
        assert!(!board.take_restart_turn(2), "1 is down");
        board.open(1, 2);
        assert!(
            board.take_restart_turn(2),
            "1's replacement serves: the turn is free"
        );
        board.open(0, 2);
        assert!(
            !board.take_restart_turn(0),
            "reopening 0 does not free 2's turn"
        );
        board.slot(2).expect("slot 2").close();
        board.open(2, 2);
        assert!(board.take_restart_turn(0));
        assert!(
            LoadBoard::default().take_restart_turn(0),
            "no board: no one to wait for"
        );
    }

    #[test]
    fn unknown_slots_count_as_free_and_counters_never_wrap() {
        let board = board(1);
        assert!(matches!(board.claim(None), Some(None)));
        assert!(matches!(board.claim(Some(7)), Some(None)));
        let slot = board.slot(0).expect("slot 0");
        slot.leave();
        slot.release_claim();
        slot.open(1);
        assert!(slot.has_free_thread());
        assert!(matches!(LoadBoard::default().claim(Some(0)), Some(None)));
    }
}
