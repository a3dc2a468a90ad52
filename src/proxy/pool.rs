//! Idle connections to one daemon group, kept by an Apache child between requests, so a
//! request usually costs no connect, accept or close. A connection is handed out only when the
//! daemon process at its other end has a free thread (the load board says so) and it is still
//! open with nothing unread (a daemon that stopped said Goodbye on it, or died); otherwise the
//! request opens a fresh connection, which any process of the group with a free thread takes.

#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::load::{LoadBoard, LoadSlot};

use super::connect;
use super::region::WorkerRegion;

/// An open connection to a daemon process and its slot on the group's load board (known
/// once the process has answered a request on it).
#[derive(Debug)]
pub(super) struct Idle {
    pub(super) stream: UnixStream,
    pub(super) slot: Option<usize>,
    /// The memory shared with the daemon process over this connection, if any.
    pub(super) region: Option<Arc<WorkerRegion>>,
    /// When the pool last got it back (None until then).
    pub(super) parked_at: Option<Instant>,
}

/// What a worker holds on the process at the other end of the connection it took: a thread
/// (or, `queued`, a place in its queue), to give back if the request is not sent after all.
/// No slot: the process has not reported one (it counts as free, with nothing to give back).
#[derive(Debug, Clone, Copy)]
pub(super) struct Claim {
    pub(super) slot: Option<&'static LoadSlot>,
    pub(super) queued: bool,
}

/// The position of the newest idle connection to the process with the fewest requests being
/// served or queued, with a place taken in that process's queue.
fn shortest_queue(idle: &[Idle], load: &LoadBoard) -> Option<(usize, Claim)> {
    let mut best: Option<(usize, u32)> = None;
    for (i, conn) in idle.iter().enumerate().rev() {
        let Some(current) = conn
            .region
            .as_ref()
            .filter(|region| region.mapped_by_daemon())
            .and(conn.slot)
            .and_then(|index| load.slot(index))
            .and_then(|slot| slot.load())
        else {
            continue;
        };
        if best.is_none_or(|(_, fewest)| current < fewest) {
            best = Some((i, current));
        }
    }
    let (position, _) = best?;
    let slot = load.queue(idle[position].slot)?;
    Some((
        position,
        Claim {
            slot: Some(slot),
            queued: true,
        },
    ))
}

#[derive(Debug)]
pub struct Pool {
    socket_path: PathBuf,
    capacity: usize,
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    /// A pool for the group listening on `socket_path`, holding at most `capacity` idle
    /// connections (Apache's ThreadsPerChild: more could never be in use at once).
    pub fn new(socket_path: &Path, capacity: usize) -> Pool {
        Pool {
            socket_path: socket_path.to_owned(),
            capacity: capacity.max(1),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// True if this pool holds connections to the socket at `path`.
    pub fn serves(&self, path: &Path) -> bool {
        self.socket_path == path
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently returned usable connection whose process has a thread free, with
    /// the claim made on that thread (to give back if the request is not sent after all).
    /// When no process has one and `may_queue`, a connection to the process with the shortest
    /// queue (see `crate::load`), if that queue has room and the daemon mapped the region the
    /// connection shares (a queued request must stay withdrawable). Connections found closed
    /// are dropped.
    pub(super) fn take(&self, load: &LoadBoard, may_queue: bool) -> Option<(Idle, Claim)> {
        loop {
            let (candidate, claim) = {
                let mut idle = self.idle();
                let free = idle.iter().enumerate().rev().find_map(|(i, c)| {
                    load.claim(c.slot).map(|slot| {
                        let claim = Claim {
                            slot,
                            queued: false,
                        };
                        (i, claim)
                    })
                });
                let (position, claim) = match free {
                    Some(found) => found,
                    None if may_queue => shortest_queue(&idle, load)?,
                    None => return None,
                };
                (idle.remove(position), claim)
            };
            // Anything readable on an idle connection is a Goodbye or an EOF: it is done.
            if !connect::readable(&candidate.stream) {
                return Some((candidate, claim));
            }
            if let Some(slot) = claim.slot {
                slot.release_claim();
            }
        }
    }

    /// The most recently returned usable idle connection to the process in `index` (for a
    /// request that already holds a claim on one of its threads).
    pub(super) fn take_to(&self, index: usize) -> Option<Idle> {
        loop {
            let candidate = {
                let mut idle = self.idle();
                let position = idle.iter().rposition(|c| c.slot == Some(index))?;
                idle.remove(position)
            };
            if !connect::readable(&candidate.stream) {
                return Some(candidate);
            }
        }
    }

    /// Keeps a connection whose last response ended cleanly. When full, the oldest goes (it
    /// may be a dead one whose process looked busy when it died).
    pub(super) fn put(&self, mut conn: Idle) {
        conn.parked_at = Some(Instant::now());
        let mut idle = self.idle();
        if idle.len() >= self.capacity {
            idle.remove(0);
        }
        idle.push(conn);
    }

    /// Frees the slot pages of the regions of the idle connections parked at or before
    /// `parked_by` that were used since the last time (see `WorkerRegion::release_pages`);
    /// returns how many regions. Under the pool's lock, so no request takes one of them
    /// meanwhile.
    pub fn release_idle_pages(&self, parked_by: Instant) -> usize {
        let idle = self.idle();
        let regions = idle
            .iter()
            .filter(|conn| conn.parked_at.is_none_or(|at| at <= parked_by))
            .filter_map(|conn| conn.region.as_ref());
        regions.filter(|region| region.release_pages()).count()
    }

    /// How many idle connections are kept (for tests).
    pub fn len(&self) -> usize {
        self.idle().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{IoSlice, Write};

    fn board(busy: &[bool]) -> LoadBoard {
        let slots: Vec<LoadSlot> = busy
            .iter()
            .map(|&b| {
                let slot = LoadSlot::default();
                slot.open(1);
                if b {
                    slot.enter();
                }
                slot
            })
            .collect();
        LoadBoard::new(Box::leak(slots.into_boxed_slice()))
    }

    fn conn(slot: Option<usize>) -> (Idle, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (
            Idle {
                stream: ours,
                slot,
                region: None,
                parked_at: None,
            },
            theirs,
        )
    }

    #[test]
    fn newest_free_connection_first_and_busy_processes_skipped() {
        let pool = Pool::new(Path::new("/x.sock"), 8);
        let load = board(&[false, true]);
        let (a, _pa) = conn(Some(0));
        let (b, _pb) = conn(Some(1));
        pool.put(a);
        pool.put(b);
        let (got, claim) = pool.take(&load, false).unwrap();
        assert_eq!(got.slot, Some(0), "slot 1 is busy: skipped");
        assert!(
            !claim.queued && claim.slot.is_some_and(|slot| !slot.has_free_thread()),
            "slot 0 is claimed"
        );
        assert!(
            pool.take(&load, false).is_none(),
            "slot 0 has no thread left to promise"
        );
        assert_eq!(pool.len(), 1);
    }

    /// A connection sharing a region, which its daemon has mapped (and served a request
    /// with) if `mapped`.
    fn conn_with_region(slot: usize, mapped: bool) -> (Idle, UnixStream) {
        let (mut idle, peer) = conn(Some(slot));
        let region = WorkerRegion::create().unwrap();
        if mapped {
            let daemon_side = crate::httpd::shm::Region::map(region.descriptor()).unwrap();
            assert!(daemon_side.pick_up());
        }
        idle.region = Some(region);
        (idle, peer)
    }

    /// Uses the connection's region as a request with a body does (it then has pages to free).
    fn write_a_body_slot(conn: &Idle) {
        let region = conn.region.as_ref().unwrap();
        region
            .body_slot(0)
            .write_at(0, &[IoSlice::new(b"x")])
            .unwrap();
    }

    #[test]
    fn only_idle_connections_that_used_their_region_are_released() {
        let pool = Pool::new(Path::new("/x.sock"), 8);
        let load = board(&[false, false, false]);
        let (used, _p0) = conn_with_region(0, true);
        let (unused, _p1) = conn_with_region(1, true);
        let (taken, _p2) = conn_with_region(2, true);
        for conn in [&used, &taken] {
            write_a_body_slot(conn);
        }
        pool.put(used);
        pool.put(unused);
        pool.put(taken);
        // A request takes the newest connection: it is not idle any more.
        let (in_use, _) = pool.take(&load, false).unwrap();
        assert_eq!(in_use.slot, Some(2));
        assert_eq!(
            pool.release_idle_pages(Instant::now()),
            1,
            "only the idle one that was used"
        );
        assert_eq!(
            pool.release_idle_pages(Instant::now()),
            0,
            "nothing used since"
        );
        assert!(
            in_use.region.as_ref().unwrap().release_pages(),
            "the one in use was left alone"
        );
    }

    #[test]
    fn only_connections_parked_by_the_cutoff_are_released() {
        let pool = Pool::new(Path::new("/x.sock"), 8);
        let (earlier, _p0) = conn_with_region(0, true);
        let (later, _p1) = conn_with_region(1, true);
        for conn in [&earlier, &later] {
            write_a_body_slot(conn);
        }
        pool.put(earlier);
        let cutoff = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        pool.put(later);
        assert_eq!(
            pool.release_idle_pages(cutoff),
            1,
            "only the one parked by the cutoff"
        );
        assert_eq!(
            pool.release_idle_pages(Instant::now()),
            1,
            "the later one once the cutoff passes it"
        );
        assert_eq!(
            pool.release_idle_pages(Instant::now()),
            0,
            "nothing used since"
        );
    }

    #[test]
    fn a_saturated_group_queues_at_the_shortest_queue() {
        let pool = Pool::new(Path::new("/x.sock"), 8);
        let load = board(&[true, true, true, true]);
        // Slot 1 has a request queued already; slot 2's connection shares no region, and
        // slot 3's daemon never mapped the one it was offered.
        assert!(load.queue(Some(1)).is_some());
        let (a, _pa) = conn_with_region(0, true);
        let (b, _pb) = conn_with_region(1, true);
        let (c, _pc) = conn(Some(2));
        let (d, _pd) = conn_with_region(3, false);
        pool.put(a);
        pool.put(b);
        pool.put(c);
        pool.put(d);
        assert!(
            pool.take(&load, false).is_none(),
            "no thread free, and queueing not allowed"
        );
        let (got, claim) = pool.take(&load, true).unwrap();
        assert_eq!(got.slot, Some(0), "slot 0's queue is the shortest");
        assert!(claim.queued);
        assert_eq!(load.slot(0).unwrap().load(), Some(2));
        assert!(
            pool.take(&load, true).is_none(),
            "both queues are full (one beyond one thread), and neither slot 2's nor slot 3's \
             connection could be withdrawn"
        );
        assert_eq!(pool.len(), 3);
        assert_eq!(
            load.slot(1).unwrap().load(),
            Some(2),
            "a failed try takes nothing"
        );
    }

    #[test]
    fn a_connection_to_a_given_process() {
        let pool = Pool::new(Path::new("/x.sock"), 8);
        let (a, _pa) = conn(Some(0));
        let (b, pb) = conn(Some(1));
        let (c, _pc) = conn(Some(1));
        pool.put(a);
        pool.put(c);
        pool.put(b);
        drop(pb);
        let got = pool.take_to(1).unwrap();
        assert_eq!(
            got.slot,
            Some(1),
            "the closed one is skipped for the live one"
        );
        assert!(pool.take_to(1).is_none());
        assert!(pool.take_to(2).is_none());
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn closed_or_goodbye_connections_are_dropped() {
        let pool = Pool::new(Path::new("/x.sock"), 8);
        let load = LoadBoard::default();
        let (alive, _keep) = conn(None);
        let (closed, peer) = conn(None);
        let (said_goodbye, mut daemon) = conn(None);
        drop(peer);
        daemon.write_all(&[9, 0, 0, 0, 0]).unwrap();
        pool.put(alive);
        pool.put(closed);
        pool.put(said_goodbye);
        assert!(
            pool.take(&load, true).is_some(),
            "the live one is found under the dead ones"
        );
        assert!(pool.is_empty());
    }

    #[test]
    fn a_full_pool_drops_its_oldest() {
        let pool = Pool::new(Path::new("/x.sock"), 2);
        let peers: Vec<UnixStream> = (0..3)
            .map(|i| {
                let (c, p) = conn(Some(i));
                pool.put(c);
                p
            })
            .collect();
        assert_eq!(pool.len(), 2);
        let load = LoadBoard::default();
        assert_eq!(pool.take(&load, true).unwrap().0.slot, Some(2));
        assert_eq!(pool.take(&load, true).unwrap().0.slot, Some(1));
        drop(peers);
    }
}
