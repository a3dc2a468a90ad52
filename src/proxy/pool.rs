//! Idle connections to one daemon group, kept by an Apache child between requests, so a
//! request usually costs no connect, accept or close. A connection is handed out only when the
//! daemon process at its other end has a free thread (the load board says so) and it is still
//! open with nothing unread (a daemon that stopped said Goodbye on it, or died); otherwise the
//! request opens a fresh connection, which any process of the group with a free thread takes.

#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

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

    /// The most recently returned usable connection, if any, with the claim made on its
    /// process's thread (to give back if the request is not sent after all). Connections
    /// found closed on the way are dropped.
    pub(super) fn take(&self, load: &LoadBoard) -> Option<(Idle, Option<&'static LoadSlot>)> {
        loop {
            let (candidate, claim) = {
                let mut idle = self.idle();
                let (position, claim) = idle
                    .iter()
                    .enumerate()
                    .rev()
                    .find_map(|(i, c)| load.claim(c.slot).map(|claim| (i, claim)))?;
                (idle.remove(position), claim)
            };
            // Anything readable on an idle connection is a Goodbye or an EOF: it is done.
            if !connect::readable(&candidate.stream) {
                return Some((candidate, claim));
            }
            if let Some(slot) = claim {
                slot.release_claim();
            }
        }
    }

    /// Keeps a connection whose last response ended cleanly. When full, the oldest goes (it
    /// may be a dead one whose process looked busy when it died).
    pub(super) fn put(&self, conn: Idle) {
        let mut idle = self.idle();
        if idle.len() >= self.capacity {
            idle.remove(0);
        }
        idle.push(conn);
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
    use std::io::Write;

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
        let (got, claim) = pool.take(&load).unwrap();
        assert_eq!(got.slot, Some(0), "slot 1 is busy: skipped");
        assert!(
            claim.is_some_and(|slot| !slot.has_free_thread()),
            "slot 0 is claimed"
        );
        assert!(
            pool.take(&load).is_none(),
            "slot 0 has no thread left to promise"
        );
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
            pool.take(&load).is_some(),
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
        assert_eq!(pool.take(&load).unwrap().0.slot, Some(2));
        assert_eq!(pool.take(&load).unwrap().0.slot, Some(1));
        drop(peers);
    }
}
