//! An Apache child's requests to daemons, and the watch that gives memory back once the child
//! has gone quiet (`quiet::trim_due`): the spare response pieces, the pages big bodies left
//! in the regions of its idle kept connections (real memory, which the daemons at the other
//! end also count), and what malloc keeps free. A child that never goes quiet still frees
//! the region pages of each kept connection that has been idle for a second.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};

use super::pieces;
use super::pool::Pool;
use crate::httpd::heap;
use crate::logging::{self, Level};
use crate::quiet::{self, Quiet, Trimmed};
use crate::wsgi_log;

static STARTED: OnceLock<Instant> = OnceLock::new();
static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
static FINISHED: AtomicU64 = AtomicU64::new(0);
static LAST_FINISHED: AtomicU64 = AtomicU64::new(0);

/// Milliseconds on this child's clock, never 0.
fn now_ms() -> u64 {
    let started = STARTED.get_or_init(Instant::now);
    u64::try_from(started.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A request to a daemon, from `forward`'s start to its end.
pub(super) struct InFlight(());

impl InFlight {
    pub(super) fn begin() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        LAST_FINISHED.store(now_ms(), Ordering::Release);
        FINISHED.fetch_add(1, Ordering::AcqRel);
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

fn state() -> Quiet {
    Quiet {
        now: now_ms(),
        finished: FINISHED.load(Ordering::Acquire),
        running: IN_FLIGHT.load(Ordering::Acquire) != 0,
        last_finished: LAST_FINISHED.load(Ordering::Acquire),
    }
}

/// Starts this child's watch (once, when the child makes its connection pools): `pools`
/// gives them.
pub fn watch(pools: fn() -> &'static [Pool]) {
    now_ms();
    // Apache's signals are for its own threads: the watch starts with all of them blocked.
    let mut previous = SigSet::empty();
    let blocked = pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut previous),
    );
    let spawned = std::thread::Builder::new()
        .name("wsgi-quiet".into())
        .spawn(move || {
            let mut trimmed = Trimmed::default();
            loop {
                std::thread::sleep(Duration::from_millis(250));
                if let Some(now) = quiet::trim_due(trimmed, state()) {
                    trimmed = now;
                    give_back(pools());
                } else {
                    release_idle_connections(pools());
                }
            }
        });
    if blocked.is_ok() {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
    }
    if let Err(err) = spawned {
        wsgi_log!(
            Level::Warn,
            "WSGIRS0323: Apache child could not start the thread that gives memory back when it \
             is quiet: {err}"
        );
    }
}

/// How long a kept connection stays idle before its region's pages are freed even while
/// other requests keep the child busy: as long as the child as a whole must be quiet.
const IDLE_CONNECTION: Duration = Duration::from_millis(quiet::TRIM_IDLE_MS);

/// Frees the region pages of the kept connections idle for IDLE_CONNECTION. Under steady
/// load the pools hand out their newest connections, so the ones a past burst of parallel
/// big bodies opened would otherwise keep those pages until the child has a quiet second,
/// which a busy child may never have.
fn release_idle_connections(pools: &[Pool]) {
    let Some(parked_by) = Instant::now().checked_sub(IDLE_CONNECTION) else {
        return;
    };
    let connections: usize = pools
        .iter()
        .map(|pool| pool.release_idle_pages(parked_by))
        .sum();
    if connections > 0 {
        wsgi_log!(
            Level::Debug,
            "WSGIRS0325: Apache child freed the pages big bodies left in the memory it shares \
             with daemons over kept connections idle for a second ({connections} of them)."
        );
    }
}

fn give_back(pools: &[Pool]) {
    let change = heap::ResidentChange::start(logging::enabled(Level::Debug));
    let pieces = pieces::release_spares();
    let now = Instant::now();
    let connections: usize = pools.iter().map(|pool| pool.release_idle_pages(now)).sum();
    heap::give_back_free_memory();
    if let Some(change) = change.finish() {
        wsgi_log!(
            Level::Debug,
            "WSGIRS0324: Apache child gave memory back after going quiet: {pieces} spare \
             buffers, the pages big bodies left in the memory it shares with daemons over \
             {connections} idle connections, and what malloc kept: {change}."
        );
    }
}
