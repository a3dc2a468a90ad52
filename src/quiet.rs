//! When a process that has gone quiet gives back the memory its last burst left behind: glibc
//! keeps freed memory for the next allocations, and the regions of kept connections keep the
//! pages their last big bodies touched, so after a burst a process would stay at its peak for
//! good. Daemons (`daemon::lifecycle`) and Apache children (`proxy::traffic`) both ask
//! `trim_due`. Pure logic.

#![forbid(unsafe_code)]

/// Memory is given back once no request has run for TRIM_IDLE_MS, or, while requests keep
/// coming, at a moment when none runs, at most every TRIM_EVERY_MS.
pub const TRIM_IDLE_MS: u64 = 1000;
pub const TRIM_EVERY_MS: u64 = 10_000;

/// When the process last gave memory back, and how many requests it had finished then.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    pub at_ms: u64,
    pub requests: u64,
}

/// What the process did, in milliseconds on its own clock.
#[derive(Debug, Clone, Copy)]
pub struct Quiet {
    pub now: u64,
    /// Requests finished so far.
    pub finished: u64,
    /// Whether any request is running right now.
    pub running: bool,
    /// When the last request finished.
    pub last_finished: u64,
}

/// The new record when memory is to be given back now (see TRIM_IDLE_MS). Never twice without
/// a request in between, never while one runs.
pub fn trim_due(last: Trimmed, state: Quiet) -> Option<Trimmed> {
    if state.finished == last.requests || state.running {
        return None;
    }
    let idle = state.now.saturating_sub(state.last_finished);
    let since_last = state.now.saturating_sub(last.at_ms);
    (idle >= TRIM_IDLE_MS || since_last >= TRIM_EVERY_MS).then_some(Trimmed {
        at_ms: state.now,
        requests: state.finished,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn quiet(now: u64, finished: u64, running: bool, last_finished: u64) -> Quiet {
        Quiet {
            now,
            finished,
            running,
            last_finished,
        }
    }

    #[test]
    fn memory_is_given_back_once_per_quiet_spell() {
        let none = Trimmed::default();
        assert_eq!(
            trim_due(none, quiet(5000, 0, false, 0)),
            None,
            "no request yet: nothing to give back"
        );
        // A moment without requests is not yet a quiet spell (the last trim was at start,
        // under TRIM_EVERY_MS ago).
        assert_eq!(trim_due(none, quiet(12, 1, false, 2)), None);
        let first = trim_due(none, quiet(2 + TRIM_IDLE_MS, 1, false, 2)).unwrap();
        assert_eq!(first.requests, 1);
        assert_eq!(
            trim_due(first, quiet(60_000, 1, false, 2)),
            None,
            "no request since"
        );
        // Requests keep coming (the last one ended just now): never while one runs, and at
        // most every TRIM_EVERY_MS.
        let later = first.at_ms + TRIM_EVERY_MS;
        assert_eq!(
            trim_due(first, quiet(later, 3, true, later - 5)),
            None,
            "a request is running"
        );
        assert_eq!(
            trim_due(first, quiet(later - 1, 3, false, later - 5)),
            None,
            "not TRIM_EVERY_MS yet"
        );
        let second = trim_due(first, quiet(later, 3, false, later - 5)).unwrap();
        assert_eq!(
            second,
            Trimmed {
                at_ms: later,
                requests: 3
            }
        );
    }
}
