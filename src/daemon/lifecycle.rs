//! When a daemon process should restart on its own (SPEC §7): maximum-requests,
//! inactivity-timeout, request-timeout, restart-interval, startup-timeout and
//! deadlock-timeout. The accept threads and the Python layer record what happens in
//! `Activity`; a monitor thread asks `Activity::verdict` once per tick. Pure logic, no ffi.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::daemon_process::ProcessGroupSpec;
use crate::quiet::{self, Quiet, Trimmed};

/// The limits that apply to one daemon process (None / 0 = off).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub maximum_requests: u64,
    pub inactivity_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub restart_interval: Option<Duration>,
    pub startup_timeout: Option<Duration>,
    pub deadlock_timeout: Option<Duration>,
}

impl Policy {
    pub fn from_spec(spec: &ProcessGroupSpec) -> Policy {
        Policy {
            maximum_requests: spec.maximum_requests,
            inactivity_timeout: spec.inactivity_timeout,
            request_timeout: spec.request_timeout,
            restart_interval: spec.restart_interval,
            startup_timeout: spec.startup_timeout,
            deadlock_timeout: Some(spec.deadlock_timeout).filter(|d| !d.is_zero()),
        }
    }
}

/// What the monitor should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stop accepting, let requests in flight finish (graceful-timeout), exit, be replaced.
    Graceful(String),
    /// Like Graceful, but for a limit every process of a group tends to reach at about the
    /// same time (maximum-requests under balanced load, restart-interval): the processes of a
    /// group take turns, so the group never stops serving all at once.
    InTurn(String),
    /// Exit now: the requests in flight are stuck and cannot finish.
    Immediate(String),
}

/// What happened in this process, in milliseconds since it started (0 = never / idle).
pub struct Activity {
    started: Instant,
    /// Start time of the request each accept thread is running (0 = idle).
    running: Vec<AtomicU64>,
    last_finished: AtomicU64,
    requests: AtomicU64,
    last_gil: AtomicU64,
    app_loaded: AtomicBool,
    load_failed: AtomicBool,
}

impl Activity {
    pub fn new(threads: usize) -> Activity {
        Activity {
            started: Instant::now(),
            running: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            last_finished: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            last_gil: AtomicU64::new(0),
            app_loaded: AtomicBool::new(false),
            load_failed: AtomicBool::new(false),
        }
    }

    /// Milliseconds since the process started, never 0 (0 means "not set").
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    pub fn request_started(&self, thread: usize) {
        if let Some(slot) = self.running.get(thread) {
            slot.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Returns how many requests this process has finished.
    pub fn request_finished(&self, thread: usize) -> u64 {
        if let Some(slot) = self.running.get(thread) {
            slot.store(0, Ordering::Relaxed);
        }
        self.last_finished.store(self.now_ms(), Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The monitor got the GIL just now.
    pub fn gil_acquired(&self) {
        self.last_gil.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn script_loaded(&self, ok: bool) {
        if ok {
            self.app_loaded.store(true, Ordering::Relaxed);
        } else {
            self.load_failed.store(true, Ordering::Relaxed);
        }
    }

    /// maximum-requests is checked where a request finishes.
    pub fn reached_maximum(&self, policy: &Policy, finished: u64) -> Option<Verdict> {
        (policy.maximum_requests > 0 && finished >= policy.maximum_requests).then(|| {
            Verdict::InTurn(format!(
                "maximum-requests reached ({finished} requests served)"
            ))
        })
    }

    /// The periodic checks, at `now` milliseconds since start.
    pub fn verdict(&self, policy: &Policy, now: u64) -> Option<Verdict> {
        let secs = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if let Some(limit) = policy.deadlock_timeout {
            let last = self.last_gil.load(Ordering::Relaxed).max(1);
            if now.saturating_sub(last) >= secs(limit) {
                return Some(Verdict::Immediate(format!(
                    "deadlock-timeout: no thread could acquire the Python GIL for {}s",
                    limit.as_secs()
                )));
            }
        }
        if let Some(limit) = policy.request_timeout {
            let oldest = self
                .running
                .iter()
                .map(|slot| slot.load(Ordering::Relaxed))
                .filter(|&start| start != 0)
                .min();
            if let Some(start) = oldest {
                if now.saturating_sub(start) >= secs(limit) {
                    return Some(Verdict::Immediate(format!(
                        "request-timeout: a request has been running for more than {}s",
                        limit.as_secs()
                    )));
                }
            }
        }
        if let Some(limit) = policy.restart_interval {
            if now >= secs(limit) {
                return Some(Verdict::InTurn(format!(
                    "restart-interval of {}s reached",
                    limit.as_secs()
                )));
            }
        }
        if let Some(limit) = policy.inactivity_timeout {
            let idle = self
                .running
                .iter()
                .all(|slot| slot.load(Ordering::Relaxed) == 0);
            let last = self.last_finished.load(Ordering::Relaxed);
            if idle && now.saturating_sub(last) >= secs(limit) {
                return Some(Verdict::Graceful(format!(
                    "inactivity-timeout: no request for {}s",
                    limit.as_secs()
                )));
            }
        }
        if let Some(limit) = policy.startup_timeout {
            let loaded = self.app_loaded.load(Ordering::Relaxed);
            let failed = self.load_failed.load(Ordering::Relaxed);
            if !loaded && failed && now >= secs(limit) {
                return Some(Verdict::Graceful(format!(
                    "startup-timeout: the WSGI application could not be loaded within {}s",
                    limit.as_secs()
                )));
            }
        }
        None
    }
}

impl Activity {
    /// The memory check at `now` (see `quiet::trim_due`).
    pub fn trim_due(&self, last: Trimmed, now: u64) -> Option<Trimmed> {
        quiet::trim_due(
            last,
            Quiet {
                now,
                finished: self.requests.load(Ordering::Relaxed),
                running: self.running.iter().any(|t| t.load(Ordering::Relaxed) != 0),
                last_finished: self.last_finished.load(Ordering::Relaxed),
            },
        )
    }
}

/// The process's activity record, created when the daemon starts serving.
static ACTIVITY: OnceLock<Activity> = OnceLock::new();

pub fn install(activity: Activity) -> &'static Activity {
    ACTIVITY.get_or_init(|| activity)
}

pub fn activity() -> Option<&'static Activity> {
    ACTIVITY.get()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy() -> Policy {
        Policy::default()
    }

    #[test]
    fn nothing_configured_never_restarts() {
        let a = Activity::new(2);
        a.request_started(0);
        assert_eq!(a.verdict(&policy(), 10_000_000), None);
        assert_eq!(a.reached_maximum(&policy(), 1_000_000), None);
    }

    #[test]
    fn the_memory_check_sees_running_and_finished_requests() {
        let a = Activity::new(2);
        let none = Trimmed::default();
        assert_eq!(a.trim_due(none, 60_000), None, "no request yet");
        a.request_started(0);
        assert_eq!(a.trim_due(none, 60_000), None, "one is running");
        a.request_finished(0);
        assert_eq!(
            a.trim_due(none, 60_000),
            Some(Trimmed {
                at_ms: 60_000,
                requests: 1
            })
        );
    }

    #[test]
    fn maximum_requests() {
        let a = Activity::new(1);
        let p = Policy {
            maximum_requests: 3,
            ..policy()
        };
        a.request_started(0);
        let n = a.request_finished(0);
        assert_eq!(a.reached_maximum(&p, n), None);
        a.request_finished(0);
        let n = a.request_finished(0);
        assert!(matches!(a.reached_maximum(&p, n), Some(Verdict::InTurn(_))));
    }

    #[test]
    fn inactivity_counts_only_idle_time() {
        let a = Activity::new(2);
        let p = Policy {
            inactivity_timeout: Some(Duration::from_secs(5)),
            ..policy()
        };
        assert_eq!(a.verdict(&p, 4_000), None);
        assert!(matches!(a.verdict(&p, 5_000), Some(Verdict::Graceful(_))));
        // A running request is activity, however long it takes.
        a.request_started(1);
        assert_eq!(a.verdict(&p, 60_000), None);
    }

    #[test]
    fn request_timeout_is_immediate() {
        let a = Activity::new(2);
        let p = Policy {
            request_timeout: Some(Duration::from_secs(2)),
            ..policy()
        };
        a.running[0].store(1_000, Ordering::Relaxed);
        assert_eq!(a.verdict(&p, 2_500), None);
        let v = a.verdict(&p, 3_000);
        assert!(matches!(v, Some(Verdict::Immediate(ref why)) if why.contains("request-timeout")));
        a.request_finished(0);
        assert_eq!(a.verdict(&p, 9_000), None);
    }

    #[test]
    fn restart_interval_and_deadlock() {
        let a = Activity::new(1);
        let p = Policy {
            restart_interval: Some(Duration::from_secs(10)),
            ..policy()
        };
        assert_eq!(a.verdict(&p, 9_999), None);
        assert!(matches!(a.verdict(&p, 10_000), Some(Verdict::InTurn(_))));

        let p = Policy {
            deadlock_timeout: Some(Duration::from_secs(3)),
            ..policy()
        };
        a.last_gil.store(5_000, Ordering::Relaxed);
        assert_eq!(a.verdict(&p, 7_000), None);
        assert!(
            matches!(a.verdict(&p, 8_000), Some(Verdict::Immediate(ref w)) if w.contains("deadlock"))
        );
    }

    #[test]
    fn startup_timeout_needs_a_failed_load() {
        let a = Activity::new(1);
        let p = Policy {
            startup_timeout: Some(Duration::from_secs(2)),
            ..policy()
        };
        assert_eq!(a.verdict(&p, 5_000), None);
        a.script_loaded(false);
        assert!(matches!(a.verdict(&p, 5_000), Some(Verdict::Graceful(_))));
        a.script_loaded(true);
        assert_eq!(a.verdict(&p, 5_000), None);
    }
}
