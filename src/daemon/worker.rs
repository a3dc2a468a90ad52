//! The daemon process: after the fork it blocks Apache's signals, waits out any restart
//! back-off, drops root (checked), moves to its home, starts Python, and serves the group's
//! socket with `threads` threads until it is told to stop. Each thread accepts without the
//! GIL and attaches to Python only to run the application.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::socket::{accept4, SockFlag};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{self, chdir};

use nix::sys::socket::getsockopt;
use nix::sys::socket::sockopt::PeerCredentials;

use super::connection::Connection;
use super::lifecycle::{self, Activity, Policy, Verdict};
use super::listener;
use super::origin;
use super::privileges::{self, System};
use super::supervisor::EXIT_SETUP_FAILED;
use super::GroupRuntime;
use crate::logging::Level;
use crate::python;
use crate::wire::{self, Kind};
use crate::wsgi_log;

pub struct DaemonContext {
    pub group: GroupRuntime,
    pub listen_fd: RawFd,
    /// Back-off before starting, after a crash loop.
    pub start_delay: Duration,
    /// Apache's parent: if it dies, so do we (no orphaned daemons).
    pub parent_pid: u32,
}

/// The signals Apache uses to stop and restart; a daemon treats each as "stop gracefully".
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGWINCH,
    ] {
        set.add(signal);
    }
    set
}

/// Runs the daemon; the return value is the process exit code.
pub fn run(ctx: DaemonContext) -> i32 {
    let name = ctx.group.spec.name.clone();
    // Block before any thread exists so every thread inherits the mask; SIGPIPE is blocked
    // too, so writes to a vanished peer fail with EPIPE instead of killing the process.
    let mut blocked = stop_signals();
    blocked.add(Signal::SIGPIPE);
    blocked.add(Signal::SIGXCPU);
    if let Err(err) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None) {
        wsgi_log!(
            Level::Alert,
            "WSGIRS0430: Daemon process '{name}' cannot block signals: {err}"
        );
        return EXIT_SETUP_FAILED;
    }
    let stop = match StopSignal::new() {
        Ok(stop) => Arc::new(stop),
        Err(err) => {
            wsgi_log!(
                Level::Alert,
                "WSGIRS0431: Daemon process '{name}' cannot create its stop pipe: {err}"
            );
            return EXIT_SETUP_FAILED;
        }
    };
    let _ = PROCESS_STOP.set(Arc::clone(&stop));
    {
        let stop = Arc::clone(&stop);
        let name_for_signals = name.clone();
        std::thread::Builder::new()
            .name("wsgi-signals".into())
            .spawn(move || {
                let mut watched = stop_signals();
                watched.add(Signal::SIGXCPU);
                loop {
                    match watched.wait() {
                        Ok(Signal::SIGXCPU) => request_restart(&format!(
                            "WSGIRS0443: [{name_for_signals}] Restarting daemon process \
                             gracefully: cpu-time-limit reached."
                        )),
                        // Apache's graceful restart: the new generation's socket has taken our
                        // path; serve what already reached ours for a moment, then drain.
                        Ok(Signal::SIGUSR1 | Signal::SIGWINCH) => {
                            RESTART_REQUESTED.store(true, Ordering::SeqCst);
                            std::thread::sleep(DRAIN_WINDOW);
                            return stop.trigger();
                        }
                        Ok(_) => return stop.trigger(),
                        Err(_) => return,
                    }
                }
            })
            .ok();
    }

    if !ctx.start_delay.is_zero() && stop.sleep(ctx.start_delay) {
        return 0;
    }
    if let Err(message) = become_daemon_user(&ctx.group) {
        wsgi_log!(Level::Alert, "{message}");
        return EXIT_SETUP_FAILED;
    }
    // Set after the uid change (which clears it); then make sure the parent did not die
    // before it took effect.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    if unistd::getppid().as_raw() as u32 != ctx.parent_pid {
        return 0;
    }
    if let Err(err) = apply_limits(&ctx.group) {
        wsgi_log!(Level::Alert, "WSGIRS0445: Daemon process '{name}': {err}");
        return EXIT_SETUP_FAILED;
    }
    // lang= and locale= shape how Python decodes and encodes text; set before it starts.
    // Only the signal thread exists now and it never reads the environment.
    if let Some(lang) = &ctx.group.spec.lang {
        std::env::set_var("LANG", lang);
    }
    if let Some(locale) = &ctx.group.spec.locale {
        std::env::set_var("LC_ALL", locale);
    }
    if let Err(err) = python::initialize(&ctx.group) {
        wsgi_log!(
            Level::Alert,
            "WSGIRS0432: Daemon process '{name}' could not start Python: {err}"
        );
        return EXIT_SETUP_FAILED;
    }
    let thread_count = ctx.group.spec.threads.max(1);
    let activity = lifecycle::install(Activity::new(thread_count as usize));
    for script in &ctx.group.import_scripts {
        python::preload(script, &name);
    }
    wsgi_log!(
        Level::Info,
        "WSGIRS0433: Starting process '{name}' with uid={}, gid={} and threads={}.",
        unistd::getuid(),
        unistd::getgid(),
        ctx.group.spec.threads.max(1)
    );

    let listen_fd = ctx.listen_fd;
    let group = Arc::new(ctx.group);
    activity.gil_acquired();
    start_monitor(&group, &stop, activity);
    let mut threads = Vec::new();
    for index in 0..thread_count {
        let stop = Arc::clone(&stop);
        let group = Arc::clone(&group);
        let spawned = std::thread::Builder::new()
            .name(format!("wsgi-{index}"))
            .spawn(move || {
                python::with_thread_state(|| accept_loop(listen_fd, &stop, &group, index as usize))
            });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(err) => {
                wsgi_log!(
                    Level::Alert,
                    "WSGIRS0434: Daemon process '{name}' cannot start thread {index}: {err}"
                );
                return EXIT_SETUP_FAILED;
            }
        }
    }
    stop.wait();
    // A restart the process asked for itself (a changed script) lets in-flight requests
    // finish within graceful-timeout; Apache stopping us gives shutdown-timeout.
    let grace = if IMMEDIATE_EXIT.load(Ordering::SeqCst) {
        Duration::ZERO
    } else if RESTART_REQUESTED.load(Ordering::SeqCst) {
        group.spec.graceful_timeout
    } else {
        group.spec.shutdown_timeout
    };
    let deadline = Instant::now() + grace;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    wsgi_log!(Level::Info, "WSGIRS0435: Process '{name}' stopped.");
    0
}

/// This process's stop signal, for a restart requested from inside (see `request_restart`).
static PROCESS_STOP: OnceLock<Arc<StopSignal>> = OnceLock::new();
static RESTART_REQUESTED: AtomicBool = AtomicBool::new(false);
/// After Apache's graceful signal, how long a daemon keeps accepting on its old socket.
const DRAIN_WINDOW: Duration = Duration::from_millis(500);
/// Requests in flight are stuck (request-timeout, deadlock-timeout): exit without waiting.
static IMMEDIATE_EXIT: AtomicBool = AtomicBool::new(false);

/// Watches the lifecycle limits once per tick, and (for deadlock-timeout) keeps proving that
/// the GIL can be acquired.
fn start_monitor(group: &Arc<GroupRuntime>, stop: &Arc<StopSignal>, activity: &'static Activity) {
    let policy = Policy::from_spec(&group.spec);
    if policy == Policy::default() {
        return;
    }
    if policy.deadlock_timeout.is_some() {
        let stop = Arc::clone(stop);
        let _ = std::thread::Builder::new()
            .name("wsgi-gil-ping".into())
            .spawn(move || {
                while !stop.sleep(Duration::from_secs(1)) {
                    python::ping_gil();
                    activity.gil_acquired();
                }
            });
    }
    let stop = Arc::clone(stop);
    let name = group.spec.name.clone();
    let _ = std::thread::Builder::new()
        .name("wsgi-monitor".into())
        .spawn(move || {
            while !stop.sleep(Duration::from_millis(200)) {
                match activity.verdict(&policy, activity.now_ms()) {
                    Some(verdict) => return apply_verdict(&name, verdict),
                    None => continue,
                }
            }
        });
}

/// Restarts this process as a lifecycle verdict says.
pub fn apply_verdict(name: &str, verdict: Verdict) {
    match verdict {
        Verdict::Graceful(why) => request_restart(&format!(
            "WSGIRS0443: [{name}] Restarting daemon process gracefully: {why}."
        )),
        Verdict::Immediate(why) => {
            IMMEDIATE_EXIT.store(true, Ordering::SeqCst);
            wsgi_log!(
                Level::Error,
                "WSGIRS0444: [{name}] Restarting daemon process now: {why}; requests in flight \
                 are abandoned."
            );
            RESTART_REQUESTED.store(true, Ordering::SeqCst);
            if let Some(stop) = PROCESS_STOP.get() {
                stop.trigger();
            }
        }
    }
}

/// Asks this daemon process to restart gracefully: it stops accepting, lets the requests in
/// flight finish, and exits; the supervisor starts a fresh one. Logs `why` once.
pub fn request_restart(why: &str) {
    if !RESTART_REQUESTED.swap(true, Ordering::SeqCst) {
        wsgi_log!(Level::Info, "{why}");
        if let Some(stop) = PROCESS_STOP.get() {
            stop.trigger();
        }
    }
}

/// memory-limit (RLIMIT_DATA), virtual-memory-limit (RLIMIT_AS) and cpu-time-limit
/// (RLIMIT_CPU: SIGXCPU at the limit asks for a graceful restart; the hard limit, a
/// graceful-timeout later, kills).
fn apply_limits(group: &GroupRuntime) -> Result<(), String> {
    use nix::sys::resource::{setrlimit, Resource};
    let spec = &group.spec;
    let set = |resource, what: &str, soft: u64, hard: u64| {
        setrlimit(resource, soft, hard).map_err(|e| format!("cannot set {what} to {soft}: {e}"))
    };
    if let Some(bytes) = spec.memory_limit.filter(|&b| b > 0) {
        set(Resource::RLIMIT_DATA, "memory-limit", bytes, bytes)?;
    }
    if let Some(bytes) = spec.virtual_memory_limit.filter(|&b| b > 0) {
        set(Resource::RLIMIT_AS, "virtual-memory-limit", bytes, bytes)?;
    }
    if let Some(secs) = spec.cpu_time_limit.filter(|&s| s > 0) {
        let hard = secs + spec.graceful_timeout.as_secs() + 1;
        set(Resource::RLIMIT_CPU, "cpu-time-limit", secs, hard)?;
    }
    Ok(())
}

/// Drops root (when we have it), moves to the home directory and applies the umask.
fn become_daemon_user(group: &GroupRuntime) -> Result<(), String> {
    let name = &group.spec.name;
    if unistd::geteuid().is_root() {
        if group.identity.uid == 0 {
            return Err(format!(
                "WSGIRS0436: Daemon process '{name}': WSGI process blocked from running as root."
            ));
        }
        privileges::drop_to(&mut System, &group.identity)
            .map_err(|err| format!("WSGIRS0437: Daemon process '{name}': {err}"))?;
    }
    chdir(&group.home).map_err(|err| {
        format!(
            "WSGIRS0438: Daemon process '{name}' cannot change to home directory '{}' as uid {}: {err}",
            group.home.display(),
            unistd::getuid()
        )
    })?;
    if let Some(mask) = group.spec.umask {
        umask(Mode::from_bits_truncate(mask as libc::mode_t));
    }
    Ok(())
}

fn accept_loop(listen_fd: RawFd, stop: &StopSignal, group: &GroupRuntime, index: usize) {
    let activity = lifecycle::activity();
    let policy = Policy::from_spec(&group.spec);
    let listener = listener::borrow_inherited(listen_fd);
    let waiter = AcceptWaiter::new(listener, stop.read_end());
    loop {
        match waiter.wait() {
            Ok(()) => {}
            Err(Errno::EINTR) => continue,
            Err(err) => {
                wsgi_log!(
                    Level::Error,
                    "WSGIRS0439: poll on daemon socket failed: {err}"
                );
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if stop.is_set() {
            // Serve whatever already waits in the backlog: those requests reached us before
            // we stopped and have nowhere else to go.
            while let Ok(fd) = accept4(listen_fd, SockFlag::SOCK_CLOEXEC) {
                let stream = UnixStream::from(listener::own_accepted(fd));
                serve_connection(stream, group);
            }
            return;
        }
        match accept4(listen_fd, SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => {
                let stream = UnixStream::from(listener::own_accepted(fd));
                if let Some(a) = activity {
                    a.request_started(index);
                }
                serve_connection(stream, group);
                if let Some(a) = activity {
                    let finished = a.request_finished(index);
                    if let Some(verdict) = a.reached_maximum(&policy, finished) {
                        apply_verdict(&group.spec.name, verdict);
                    }
                }
            }
            // Another process or thread took the connection first.
            Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => {}
            Err(err) => {
                wsgi_log!(
                    Level::Error,
                    "WSGIRS0440: accept on daemon socket failed: {err}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads the request, checks where it came from, and hands it to Python.
fn serve_connection(stream: UnixStream, group: &GroupRuntime) {
    let name = &group.spec.name;
    let refuse = |why: &dyn std::fmt::Display| {
        wsgi_log!(
            Level::Error,
            "WSGIRS0441: [{name}] Request origin could not be validated: {why}. Connection dropped."
        );
    };
    let peer_uid = match getsockopt(&stream, PeerCredentials) {
        Ok(cred) => cred.uid(),
        Err(err) => return refuse(&format_args!("SO_PEERCRED failed: {err}")),
    };
    if let Err(err) = origin::check_peer(peer_uid, group.worker_uid) {
        return refuse(&err);
    }
    // The worker sends its request at once; an idle connection must not hold a thread.
    // The worker sends its request at once, and answers body pulls as fast as its client
    // allows (bounded by Apache's Timeout, which socket-timeout defaults to): twice that is a
    // safe ceiling for every read, so an idle or vanished peer cannot hold a thread forever.
    let _ = stream.set_read_timeout(Some(group.socket_timeout.max(Duration::from_secs(1)) * 2));
    let mut conn = Connection::new(stream);
    let payload = match conn.read_request() {
        Ok(payload) => payload,
        Err(err) => {
            wsgi_log!(
                Level::Error,
                "WSGIRS0442: [{name}] Could not read the request from the Apache worker: {err}"
            );
            return;
        }
    };
    let pairs: Vec<(&[u8], &[u8])> = match wire::pairs(Kind::Request, &payload).collect() {
        Ok(pairs) => pairs,
        Err(err) => return refuse(&format_args!("malformed request: {err}")),
    };
    let secret = origin::secret_for(group.index).unwrap_or([0; origin::SECRET_LEN]);
    if let Err(err) = origin::check_request(&pairs, &secret, name) {
        return refuse(&err);
    }
    if let Some(limit) = group.spec.queue_timeout {
        if let Some(waited) = queue_wait(&pairs) {
            if waited > limit {
                wsgi_log!(
                    Level::Error,
                    "WSGIRS0446: Queue timeout expired for WSGI daemon process '{name}'. The \
                     request waited {:.1}s for a free thread (queue-timeout is {}s).",
                    waited.as_secs_f64(),
                    limit.as_secs()
                );
                let _ = conn.send_fail(504);
                return;
            }
        }
    }
    python::serve(conn, &pairs[1..], group);
}

/// Waits until a connection may be accepted or the process stops. Each thread has its own
/// epoll set with the listener registered EPOLLEXCLUSIVE, so a new connection wakes one
/// thread rather than every thread of every process of the group; plain poll() is the
/// fallback where epoll is refused.
struct AcceptWaiter<'a> {
    epoll: Option<Epoll>,
    listener: BorrowedFd<'a>,
    stop: BorrowedFd<'a>,
}

impl<'a> AcceptWaiter<'a> {
    fn new(listener: BorrowedFd<'a>, stop: BorrowedFd<'a>) -> AcceptWaiter<'a> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .ok()
            .filter(|epoll| {
                let exclusive = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                epoll.add(listener, EpollEvent::new(exclusive, 0)).is_ok()
                    && epoll
                        .add(stop, EpollEvent::new(EpollFlags::EPOLLIN, 1))
                        .is_ok()
            });
        AcceptWaiter {
            epoll,
            listener,
            stop,
        }
    }

    fn wait(&self) -> nix::Result<()> {
        match &self.epoll {
            Some(epoll) => {
                let mut events = [EpollEvent::empty(); 2];
                epoll.wait(&mut events, EpollTimeout::NONE).map(|_| ())
            }
            None => {
                let mut fds = [
                    PollFd::new(self.listener, PollFlags::POLLIN),
                    PollFd::new(self.stop, PollFlags::POLLIN),
                ];
                poll(&mut fds, PollTimeout::NONE).map(|_| ())
            }
        }
    }
}

/// How long the request waited between the worker and a daemon thread.
fn queue_wait(pairs: &[(&[u8], &[u8])]) -> Option<Duration> {
    let (_, value) = pairs
        .iter()
        .find(|(key, _)| *key == b"mod_wsgi.queue_start")?;
    let start: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(now.saturating_sub(Duration::from_micros(start)))
}

/// "Stop now", set by the signal thread and seen by every accept thread through a pipe that
/// stays readable once written (level-triggered poll wakes them all).
pub struct StopSignal {
    flag: AtomicBool,
    read: OwnedFd,
    write: OwnedFd,
}

impl StopSignal {
    fn new() -> nix::Result<StopSignal> {
        let (read, write) = unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(StopSignal {
            flag: AtomicBool::new(false),
            read,
            write,
        })
    }

    fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = unistd::write(&self.write, b"x");
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Blocks until triggered.
    fn wait(&self) {
        while !self.is_set() {
            let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::NONE);
        }
    }

    /// Sleeps up to `duration`; true if stopped meanwhile.
    fn sleep(&self, duration: Duration) -> bool {
        let millis = u16::try_from(duration.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(millis));
        self.is_set()
    }
}
