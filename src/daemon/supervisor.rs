//! The Apache parent's side of daemon groups: create each group's socket and fork its
//! processes at the real post_config pass, replace the ones that die (with a back-off for crash
//! loops), and stop them all when Apache stops or restarts. Runs only in Apache's parent, whose
//! main loop is single-threaded; the httpd layer calls in from hooks and child callbacks.

#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::listener;
use super::spawn::{fork_daemon, Forked};
use super::worker::{self, DaemonContext};
use super::{DaemonError, Registry};
use crate::logging::Level;
use crate::wsgi_log;

/// What the httpd layer does for us: watch a pid for the MPM's child reaping, and close
/// Apache's own listeners in a freshly forked daemon.
#[derive(Clone, Copy)]
pub struct ParentHooks {
    pub watch: fn(pid: i32, slot: usize),
    /// Given the process title (display-name=), if any, and the daemon's group index; returns
    /// the inherited descriptors the daemon must keep (the error logs).
    pub in_child: fn(Option<&str>, usize) -> Vec<i32>,
    /// Hands a draining daemon of the old generation to the MPM to reap.
    pub adopt: fn(pid: i32),
}

struct Slot {
    group: usize,
    /// Which of the group's processes (its place on the group's load board).
    process: usize,
    pid: Option<i32>,
    started: Instant,
    backoff: Duration,
}

struct Supervisor {
    registry: Arc<Registry>,
    listeners: Vec<OwnedFd>,
    slots: Vec<Slot>,
    hooks: ParentHooks,
    parent_pid: u32,
    /// Set once Apache begins a restart or stop: a daemon dying now is not replaced.
    stopping: bool,
}

static SUPERVISOR: Mutex<Option<Supervisor>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<Supervisor>> {
    SUPERVISOR.lock().unwrap_or_else(|p| p.into_inner())
}

/// A process that lived shorter than this is counted as a crash loop and restarted later.
const QUICK_DEATH: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Exit code of a daemon whose setup failed (bad user, home, Python): restart slowly.
pub const EXIT_SETUP_FAILED: i32 = 78;

/// Creates every group's socket and forks every process. `socket_owner` is Apache's worker
/// uid/gid when Apache runs as root.
pub fn start(
    registry: Arc<Registry>,
    hooks: ParentHooks,
    socket_owner: Option<(u32, u32)>,
) -> Result<(), DaemonError> {
    let mut listeners = Vec::with_capacity(registry.groups.len());
    for group in &registry.groups {
        let path = &group.socket_path;
        let path_text = path.display().to_string();
        let owner = match (&group.spec.socket_user, socket_owner) {
            (Some(account), Some(_)) => Some((account.uid, account.gid)),
            (_, owner) => owner,
        };
        match listener::create(path, group.spec.listen_backlog, owner) {
            Ok(fd) => listeners.push(fd),
            Err(e) => {
                for created in &registry.groups[..listeners.len()] {
                    listener::remove(&created.socket_path);
                }
                return Err(DaemonError::Socket {
                    group: group.spec.name.clone(),
                    path: path_text,
                    cause: e.to_string(),
                });
            }
        }
    }
    let mut slots = Vec::new();
    for (index, group) in registry.groups.iter().enumerate() {
        for process in 0..group.spec.processes.max(1) as usize {
            slots.push(Slot {
                group: index,
                process,
                pid: None,
                started: Instant::now(),
                backoff: Duration::ZERO,
            });
        }
    }
    let mut guard = state();
    *guard = Some(Supervisor {
        registry,
        listeners,
        slots,
        hooks,
        parent_pid: std::process::id(),
        stopping: false,
    });
    let Some(supervisor) = guard.as_mut() else {
        return Ok(());
    };
    for slot in 0..supervisor.slots.len() {
        supervisor.spawn(slot)?;
    }
    Ok(())
}

impl Supervisor {
    fn spawn(&mut self, slot: usize) -> Result<(), DaemonError> {
        let group_index = self.slots[slot].group;
        let group = self.registry.groups[group_index].clone();
        let listen_fd = self.listeners[group_index].as_raw_fd();
        let delay = self.slots[slot].backoff;
        let in_child = self.hooks.in_child;
        let parent_pid = self.parent_pid;
        let process = self.slots[slot].process;
        let load = group.load.slot(process);
        let forked = fork_daemon(move || {
            let mut keep = in_child(group.spec.process_title().as_deref(), group_index);
            super::origin::forget_secrets_except(group_index);
            // A daemon must never accept another group's requests, nor hold anything else of
            // Apache's: keep stdio, the error logs and our own listener only.
            keep.extend([0, 1, 2, listen_fd]);
            super::spawn::close_inherited_except(&keep);
            worker::run(DaemonContext {
                group,
                listen_fd,
                start_delay: delay,
                parent_pid,
                load,
                slot: u32::try_from(process).unwrap_or(u32::MAX),
            })
        })
        .map_err(|e| DaemonError::Fork {
            group: self.registry.groups[group_index].spec.name.clone(),
            cause: e.to_string(),
        })?;
        let Forked::Parent { pid } = forked;
        self.slots[slot].pid = Some(pid);
        self.slots[slot].started = Instant::now();
        (self.hooks.watch)(pid, slot);
        Ok(())
    }
}

/// How a daemon ended, as far as Apache tells us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
    /// The MPM reports an exit code or a signal number without saying which (1..=64).
    ExitOrSignal(i32),
    Unknown,
}

impl ChildEnd {
    /// Apache's MPM hands over the exit code (or the signal number) it got from
    /// apr_proc_wait_all_procs; APR's own refresh path hands over a raw waitpid status.
    pub fn from_reported(status: Option<i32>) -> ChildEnd {
        match status {
            None => ChildEnd::Unknown,
            Some(raw) if raw > 255 && raw & 0x7f == 0 => ChildEnd::Exited(raw >> 8),
            Some(raw) if raw > 255 => ChildEnd::Signaled(raw & 0x7f),
            Some(code @ 1..=64) => ChildEnd::ExitOrSignal(code),
            Some(code) => ChildEnd::Exited(code),
        }
    }

    pub fn describe(self) -> String {
        match self {
            ChildEnd::Exited(code) => format!("exit code {code}"),
            ChildEnd::Signaled(signal) => format!("signal {signal}"),
            ChildEnd::ExitOrSignal(n) => {
                format!("exit code or signal {n} (Apache logs AH00052 when it was a signal)")
            }
            ChildEnd::Unknown => "status unknown".to_string(),
        }
    }
}

/// The wait before the next start: doubling (1 s .. 30 s) while the group keeps dying quickly
/// or failing to set up, none after a clean exit or a process that ran a while. `lived` counts
/// from the end of the previous back-off, not from the fork.
pub fn next_backoff(previous: Duration, lived: Duration, end: ChildEnd) -> Duration {
    let clean = end == ChildEnd::Exited(0);
    let setup_failed = matches!(end, ChildEnd::Exited(EXIT_SETUP_FAILED));
    if setup_failed || (lived < QUICK_DEATH && !clean) {
        (previous * 2).clamp(Duration::from_secs(1), MAX_BACKOFF)
    } else {
        Duration::ZERO
    }
}

/// The MPM reaped one of our daemons (`raw_status` as from waitpid, or None if it was lost).
pub fn child_died(slot: usize, reported: Option<i32>) {
    let mut guard = state();
    let Some(supervisor) = guard.as_mut() else {
        return;
    };
    if supervisor.parent_pid != std::process::id() || slot >= supervisor.slots.len() {
        return;
    }
    let group_index = supervisor.slots[slot].group;
    let name = supervisor.registry.groups[group_index].spec.name.clone();
    let pid = supervisor.slots[slot].pid.take().unwrap_or(0);
    let end = ChildEnd::from_reported(reported);
    let how = end.describe();
    if supervisor.stopping {
        wsgi_log!(
            Level::Info,
            "WSGIRS0420: Process '{name}' (pid {pid}) has exited while Apache is stopping ({how})."
        );
        return;
    }
    // A process that died without stopping left its slot on the load board open: close it,
    // so no worker claims a thread there and its group sees it down until it is replaced.
    if let Some(board_slot) = supervisor.registry.groups[group_index]
        .load
        .slot(supervisor.slots[slot].process)
    {
        board_slot.close();
    }
    let slot_state = &mut supervisor.slots[slot];
    // The process slept its back-off before starting: that time is not "running".
    let lived = slot_state
        .started
        .elapsed()
        .saturating_sub(slot_state.backoff);
    slot_state.backoff = next_backoff(slot_state.backoff, lived, end);
    let delay = slot_state.backoff;
    if end == ChildEnd::Exited(0) {
        wsgi_log!(
            Level::Info,
            "WSGIRS0423: Process '{name}' (pid {pid}) exited to restart; starting a new one."
        );
    } else {
        wsgi_log!(
            Level::Error,
            "WSGIRS0421: Process '{name}' has died, deregister and restart it. \
         Pid {pid} ended with {how} after {:.1}s{}.",
            lived.as_secs_f64(),
            if delay.is_zero() {
                String::new()
            } else {
                format!(
                    "; the replacement waits {}s before starting",
                    delay.as_secs()
                )
            }
        );
    }
    if let Err(err) = supervisor.spawn(slot) {
        wsgi_log!(Level::Alert, "{err}");
    }
}

/// Apache announced a restart or stop (it is about to reclaim its workers): daemons that die
/// from now on stay dead, and every daemon is told to stop now, so a worker waiting for a
/// daemon's answer is released within shutdown-timeout instead of being killed by Apache.
pub fn apache_stopping() {
    if let Some(supervisor) = state().as_mut() {
        if supervisor.parent_pid != std::process::id() || supervisor.stopping {
            return;
        }
        supervisor.stopping = true;
        for pid in supervisor.slots.iter().filter_map(|slot| slot.pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}

/// Stops every daemon of this generation: SIGTERM, up to shutdown-timeout to finish, then
/// SIGKILL; reaps them and removes the sockets. Runs when Apache's configuration pool is
/// cleared (restart, graceful, stop); does nothing in any process but the parent.
pub fn stop_all() {
    let Some(supervisor) = state().take() else {
        return;
    };
    if supervisor.parent_pid != std::process::id() {
        // An inherited copy in a worker or daemon: put it back untouched.
        *state() = Some(supervisor);
        return;
    }
    if !supervisor.stopping {
        return drain_for_graceful_restart(&supervisor);
    }
    let mut running: Vec<(Pid, Duration)> = Vec::new();
    for slot in &supervisor.slots {
        if let Some(pid) = slot.pid {
            let pid = Pid::from_raw(pid);
            // Usually signalled already by apache_stopping; a second SIGTERM is harmless.
            if kill(pid, Signal::SIGTERM).is_ok() {
                // One second more than the daemon gives its own threads, so a daemon that
                // finishes in time exits by itself and logs it.
                let timeout = supervisor.registry.groups[slot.group].spec.shutdown_timeout
                    + Duration::from_secs(1);
                running.push((pid, timeout));
            }
        }
    }
    let started = Instant::now();
    while !running.is_empty() {
        running.retain(|&(pid, timeout)| {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    if started.elapsed() < timeout {
                        return true;
                    }
                    wsgi_log!(
                        Level::Warn,
                        "WSGIRS0422: Daemon process {pid} did not stop within shutdown-timeout \
                         ({}s); killing it.",
                        timeout.as_secs()
                    );
                    let _ = kill(pid, Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                    false
                }
                // Exited, or already reaped by the MPM (ECHILD).
                _ => false,
            }
        });
        if !running.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    for group in &supervisor.registry.groups {
        listener::remove(&group.socket_path);
    }
}

/// `apachectl graceful`: the old daemons are asked to drain (SIGUSR1: keep serving what is
/// already queued, finish requests in flight within graceful-timeout, then exit) and handed to
/// the MPM to reap, so the parent does not wait for them. Their socket files stay: the new
/// generation renames its sockets over the same paths, and the new daemons accept the old
/// workers' requests (the group secrets survive the restart).
fn drain_for_graceful_restart(supervisor: &Supervisor) {
    for slot in &supervisor.slots {
        if let Some(pid) = slot.pid {
            if kill(Pid::from_raw(pid), Signal::SIGUSR1).is_ok() {
                (supervisor.hooks.adopt)(pid);
            }
        }
    }
    wsgi_log!(
        Level::Info,
        "WSGIRS0424: Graceful restart: daemon processes of the previous configuration finish \
         the requests they have, then exit."
    );
}

/// In an Apache worker process: close every group's listening socket so a worker can never
/// accept a request meant for a daemon.
pub fn close_listeners_in_worker() {
    if let Some(supervisor) = state().take() {
        drop(supervisor.listeners);
    }
}

/// The pid of every running daemon, for diagnostics and tests.
pub fn daemon_pids() -> Vec<i32> {
    state()
        .as_ref()
        .map(|s| s.slots.iter().filter_map(|slot| slot.pid).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_statuses_decode_both_forms() {
        assert_eq!(ChildEnd::from_reported(Some(0)), ChildEnd::Exited(0));
        assert_eq!(ChildEnd::from_reported(Some(78)), ChildEnd::Exited(78));
        assert_eq!(ChildEnd::from_reported(Some(9)), ChildEnd::ExitOrSignal(9));
        // Raw waitpid statuses from APR's refresh path.
        assert_eq!(ChildEnd::from_reported(Some(78 << 8)), ChildEnd::Exited(78));
        assert_eq!(ChildEnd::from_reported(Some(3 << 8)), ChildEnd::Exited(3));
        assert_eq!(
            ChildEnd::from_reported(Some((1 << 8) | 9)),
            ChildEnd::Signaled(9)
        );
        assert_eq!(ChildEnd::from_reported(None), ChildEnd::Unknown);
        assert!(ChildEnd::ExitOrSignal(9).describe().contains("signal 9"));
    }

    #[test]
    fn backoff_doubles_for_crash_loops_and_resets_after_a_good_run() {
        let quick = Duration::from_millis(100);
        let long = Duration::from_secs(60);
        let crash = ChildEnd::ExitOrSignal(9);
        let mut b = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..7 {
            b = next_backoff(b, quick, crash);
            seen.push(b.as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(next_backoff(b, long, crash), Duration::ZERO);
        // A set-up failure backs off however long the process took to fail.
        assert_eq!(
            next_backoff(
                Duration::from_secs(4),
                long,
                ChildEnd::Exited(EXIT_SETUP_FAILED)
            )
            .as_secs(),
            8
        );
        // A clean exit (a requested restart) never does.
        assert_eq!(
            next_backoff(Duration::from_secs(4), quick, ChildEnd::Exited(0)),
            Duration::ZERO
        );
    }
}
