//! The daemon process: after the fork it blocks Apache's signals, waits out any restart
//! back-off, drops root (checked), moves to its home, starts Python, and serves the group's
//! socket with `threads` threads until it is told to stop. Threads wait for work without the
//! GIL (new connections and requests on kept ones come from one epoll set, see `Dispatcher`),
//! read and check each request without it, and attach to Python only to run the application,
//! oldest request first.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
use crate::httpd::heap;
use crate::load::LoadSlot;
use crate::logging::Level;
use crate::python;
use crate::quiet::Trimmed;
use crate::wire::{self, region, Kind, WireError};
use crate::wsgi_log;

pub struct DaemonContext {
    pub group: GroupRuntime,
    pub listen_fd: RawFd,
    /// Back-off before starting, after a crash loop.
    pub start_delay: Duration,
    /// Apache's parent: if it dies, so do we (no orphaned daemons).
    pub parent_pid: u32,
    /// This process's place on the load board (see `crate::load`), and its index there.
    pub load: Option<&'static LoadSlot>,
    pub slot: u32,
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
    // Before any thread exists: a thread that allocated first would get an arena of its own.
    let malloc_tuning = heap::keep_freed_memory_while_busy();
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
                            SOCKET_STAYS.store(false, Ordering::SeqCst);
                            RESTART_REQUESTED.store(true, Ordering::SeqCst);
                            std::thread::sleep(DRAIN_WINDOW);
                            return stop.trigger();
                        }
                        // Apache stops: the socket goes away with it.
                        Ok(_) => {
                            SOCKET_STAYS.store(false, Ordering::SeqCst);
                            return stop.trigger();
                        }
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
        Level::Debug,
        "WSGIRS0451: Process '{name}' malloc: {malloc_tuning}."
    );
    wsgi_log!(
        Level::Info,
        "WSGIRS0433: Starting process '{name}' with uid={}, gid={} and threads={}.",
        unistd::getuid(),
        unistd::getgid(),
        ctx.group.spec.threads.max(1)
    );

    let group = Arc::new(ctx.group);
    let dispatcher = match Dispatcher::new(
        ctx.listen_fd,
        Arc::clone(&stop),
        Arc::clone(&group),
        ctx.load,
        ctx.slot,
    ) {
        Ok(dispatcher) => Arc::new(dispatcher),
        Err(err) => {
            wsgi_log!(
                Level::Alert,
                "WSGIRS0434: Daemon process '{name}' cannot watch its socket with epoll: {err}"
            );
            return EXIT_SETUP_FAILED;
        }
    };
    if ctx.load.is_some() {
        group.load.open(ctx.slot as usize, thread_count);
    }
    activity.gil_acquired();
    start_monitor(&group, ctx.slot, &stop, activity);
    let mut threads = Vec::new();
    for index in 0..thread_count {
        let dispatcher = Arc::clone(&dispatcher);
        let spawned = std::thread::Builder::new()
            .name(format!("wsgi-{index}"))
            .spawn(move || python::with_thread_state(|| dispatcher.run_thread(index as usize)));
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
    // Threads still busy (an immediate exit, or the grace ran out) never parked theirs again;
    // whatever is idle now learns that we are going.
    dispatcher.close_idle();
    wsgi_log!(Level::Info, "WSGIRS0435: Process '{name}' stopped.");
    0
}

/// This process's stop signal, for a restart requested from inside (see `request_restart`).
static PROCESS_STOP: OnceLock<Arc<StopSignal>> = OnceLock::new();
static RESTART_REQUESTED: AtomicBool = AtomicBool::new(false);
/// The process restarts itself (a lifecycle limit, a changed script): its group's socket stays
/// open in Apache's parent, so a connection waiting there is taken by another process of the
/// group or by the replacement, and the process accepts none while it stops.
static SOCKET_STAYS: AtomicBool = AtomicBool::new(false);
/// After Apache's graceful signal, how long a daemon keeps accepting on its old socket.
const DRAIN_WINDOW: Duration = Duration::from_millis(500);
/// Requests in flight are stuck (request-timeout, deadlock-timeout): exit without waiting.
static IMMEDIATE_EXIT: AtomicBool = AtomicBool::new(false);

/// Watches the lifecycle limits once per tick, gives the memory the app freed back when the
/// process goes quiet (see `quiet::trim_due`), and (for deadlock-timeout) keeps
/// proving that the GIL can be acquired.
fn start_monitor(
    group: &Arc<GroupRuntime>,
    slot: u32,
    stop: &Arc<StopSignal>,
    activity: &'static Activity,
) {
    let policy = Policy::from_spec(&group.spec);
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
    let watch_limits = policy != Policy::default();
    let stop = Arc::clone(stop);
    let group = Arc::clone(group);
    let _ = std::thread::Builder::new()
        .name("wsgi-monitor".into())
        .spawn(move || {
            let mut trimmed = Trimmed::default();
            while !stop.sleep(Duration::from_millis(200)) {
                if let Some(now) = activity.trim_due(trimmed, activity.now_ms()) {
                    trimmed = now;
                    give_back_memory(&group.spec.name);
                }
                if !watch_limits {
                    continue;
                }
                // A maximum-requests restart waiting for its turn is asked again here too:
                // an idle process sees no request end.
                let verdict = activity
                    .verdict(&policy, activity.now_ms())
                    .or_else(waiting_for_turn);
                match verdict {
                    Some(verdict) if restart_now(&group, slot, &verdict) => {
                        return apply_verdict(&group.spec.name, verdict)
                    }
                    _ => continue,
                }
            }
        });
}

/// Gives the memory malloc holds free back to the system; says how much at LogLevel debug.
fn give_back_memory(name: &str) {
    let change = heap::ResidentChange::start(crate::logging::enabled(Level::Debug));
    if !heap::give_back_free_memory() {
        return;
    }
    if let Some(change) = change.finish() {
        wsgi_log!(
            Level::Debug,
            "WSGIRS0450: Process '{name}' gave the memory its application freed back: {change}."
        );
    }
}

/// How long a process due to restart in turn (see `Verdict::InTurn`) waits for another
/// process of its group to come back first: a process that cannot start at all must not keep
/// the others from restarting forever.
const TURN_WAIT_LIMIT: Duration = Duration::from_secs(10);

/// An InTurn restart this process is waiting to take its turn for: since when, and why.
static WAITING_FOR_TURN: OnceLock<(Instant, String)> = OnceLock::new();

/// True when this process (`slot` on its group's board) may restart for `verdict` now. An
/// InTurn restart waits for the group's restart turn (see `LoadBoard::take_restart_turn`), up
/// to TURN_WAIT_LIMIT from the first time it had to wait (said once in the log); the monitor
/// asks again every tick (`waiting_for_turn`).
fn restart_now(group: &GroupRuntime, slot: u32, verdict: &Verdict) -> bool {
    let Verdict::InTurn(why) = verdict else {
        return true;
    };
    if group.load.take_restart_turn(slot as usize) {
        return true;
    }
    let mut first = false;
    let (since, _) = WAITING_FOR_TURN.get_or_init(|| {
        first = true;
        (Instant::now(), why.clone())
    });
    if first {
        wsgi_log!(
            Level::Info,
            "WSGIRS0449: [{}] {why}; another process of the group is restarting, so this one \
             restarts once it is back (at most {}s from now).",
            group.spec.name,
            TURN_WAIT_LIMIT.as_secs()
        );
    }
    since.elapsed() >= TURN_WAIT_LIMIT
}

/// The InTurn restart this process waits to take its turn for, if any.
fn waiting_for_turn() -> Option<Verdict> {
    WAITING_FOR_TURN
        .get()
        .map(|(_, why)| Verdict::InTurn(why.clone()))
}

/// Restarts this process as a lifecycle verdict says.
pub fn apply_verdict(name: &str, verdict: Verdict) {
    match verdict {
        Verdict::Graceful(why) | Verdict::InTurn(why) => request_restart(&format!(
            "WSGIRS0443: [{name}] Restarting daemon process gracefully: {why}."
        )),
        Verdict::Immediate(why) => {
            IMMEDIATE_EXIT.store(true, Ordering::SeqCst);
            wsgi_log!(
                Level::Error,
                "WSGIRS0444: [{name}] Restarting daemon process now: {why}; requests in flight \
                 are abandoned."
            );
            SOCKET_STAYS.store(true, Ordering::SeqCst);
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
        SOCKET_STAYS.store(true, Ordering::SeqCst);
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

/// Event tokens in a process's epoll set; parked connections use the tokens above these.
const LISTENER: u64 = 0;
const STOP: u64 = 1;
const FIRST_PARKED: u64 = 2;
/// The most idle connections a process keeps; beyond it a finished connection is closed
/// (with a Goodbye). Apache opens at most one per worker thread that is using the group.
const MAX_PARKED: usize = 1024;

/// Hands work to a daemon process's threads. One epoll set holds the listener (one-shot, so a
/// new connection wakes one thread, which accepts and re-arms it), the stop pipe, and every
/// idle connection (one-shot: the thread woken by a request takes the connection out of the
/// idle set, serves it, and parks it again). So an idle connection never holds a thread, and a
/// thread takes whichever work is ready first.
pub struct Dispatcher {
    epoll: Epoll,
    listen_fd: RawFd,
    stop: Arc<StopSignal>,
    group: Arc<GroupRuntime>,
    parked: Mutex<Parked>,
    /// Requests read and checked, oldest first, for whichever thread takes the GIL next.
    pending: Mutex<VecDeque<Pending>>,
    /// This process's slot on the load board, and its index (named in every End frame).
    load: Option<&'static LoadSlot>,
    slot: u32,
    policy: Policy,
}

/// The idle connections, by slot in a small slab; a slot's generation is part of its epoll
/// token, so an event for a connection that was closed meanwhile cannot pick up a newcomer.
#[derive(Default)]
struct Parked {
    entries: Vec<(u32, Option<Connection>)>,
    free: Vec<usize>,
    count: usize,
}

impl Parked {
    fn insert(&mut self, conn: Connection) -> u64 {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.entries.push((0, None));
                self.entries.len() - 1
            }
        };
        let entry = &mut self.entries[index];
        entry.0 = entry.0.wrapping_add(1);
        entry.1 = Some(conn);
        self.count += 1;
        FIRST_PARKED + ((u64::from(entry.0)) << 32 | index as u64)
    }

    /// The slab index a token names, if the token is still current.
    fn index(&self, token: u64) -> Option<usize> {
        let key = token.checked_sub(FIRST_PARKED)?;
        let index = usize::try_from(key & 0xffff_ffff).ok()?;
        let (generation, _) = self.entries.get(index)?;
        (u64::from(*generation) == key >> 32).then_some(index)
    }

    fn get(&self, token: u64) -> Option<&Connection> {
        self.entries[self.index(token)?].1.as_ref()
    }

    fn take(&mut self, token: u64) -> Option<Connection> {
        let index = self.index(token)?;
        let conn = self.entries[index].1.take()?;
        self.free.push(index);
        self.count -= 1;
        Some(conn)
    }

    fn take_all(&mut self) -> Vec<Connection> {
        let mut all = Vec::with_capacity(self.count);
        for (index, entry) in self.entries.iter_mut().enumerate() {
            if let Some(conn) = entry.1.take() {
                all.push(conn);
                self.free.push(index);
            }
        }
        self.count = 0;
        all
    }
}

impl Dispatcher {
    pub fn new(
        listen_fd: RawFd,
        stop: Arc<StopSignal>,
        group: Arc<GroupRuntime>,
        load: Option<&'static LoadSlot>,
        slot: u32,
    ) -> nix::Result<Dispatcher> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let listener = listener::borrow_inherited(listen_fd);
        epoll.add(
            listener,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT, LISTENER),
        )?;
        // Level-triggered: once stopped, every thread's wait returns.
        epoll.add(stop.read_end(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))?;
        Ok(Dispatcher {
            epoll,
            listen_fd,
            stop,
            parked: Mutex::new(Parked::default()),
            pending: Mutex::new(VecDeque::new()),
            policy: Policy::from_spec(&group.spec),
            group,
            load,
            slot,
        })
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One daemon thread: serves whatever is ready until the process stops.
    fn run_thread(&self, thread: usize) {
        let mut events = [EpollEvent::empty(); 1];
        loop {
            match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(err) => {
                    wsgi_log!(
                        Level::Error,
                        "WSGIRS0439: [{}] Waiting on the daemon socket failed: {err}",
                        self.group.spec.name
                    );
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            match events[0].data() {
                STOP => return self.drain(thread),
                // Stopping: the level-triggered STOP may come after a ready listener.
                LISTENER if self.stop.is_set() => return self.drain(thread),
                LISTENER => self.accept(thread),
                token => {
                    let conn = self.parked().take(token);
                    if let Some(conn) = conn {
                        if self.stop.is_set() {
                            conn.goodbye();
                        } else {
                            self.serve(conn, thread, false);
                        }
                    }
                }
            }
        }
    }

    fn accept(&self, thread: usize) {
        let accepted = accept4(self.listen_fd, SockFlag::SOCK_CLOEXEC);
        // Re-arm at once, so another thread takes the next connection while we serve this one.
        let rearm = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT, LISTENER);
        if let Err(err) = self
            .epoll
            .modify(listener::borrow_inherited(self.listen_fd), &mut { rearm })
        {
            wsgi_log!(
                Level::Error,
                "WSGIRS0439: [{}] Cannot re-arm the daemon socket: {err}",
                self.group.spec.name
            );
        }
        match accepted {
            Ok(fd) => {
                let stream = UnixStream::from(listener::own_accepted(fd));
                if let Some(conn) = admit(stream, &self.group, self.slot, self.load) {
                    self.serve(conn, thread, true);
                }
            }
            // Another process took the connection first.
            Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => {}
            Err(err) => {
                wsgi_log!(
                    Level::Error,
                    "WSGIRS0440: [{}] accept on daemon socket failed: {err}",
                    self.group.spec.name
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Serves the next request on `conn`, then parks it for the one after (or says goodbye
    /// when the process is stopping).
    fn serve(&self, conn: Connection, thread: usize, fresh: bool) {
        let Some(mut conn) = self.serve_request(conn, thread, fresh) else {
            return;
        };
        // The next request may already be in our buffer (see `has_next_request`), where
        // epoll would never report it.
        while conn.has_next_request() && !self.stop.is_set() {
            let Some(next) = self.serve_request(conn, thread, false) else {
                return;
            };
            conn = next;
        }
        conn.trim();
        if self.stop.is_set() {
            return conn.goodbye();
        }
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
        let mut parked = self.parked();
        if parked.count >= MAX_PARKED {
            drop(parked);
            return conn.goodbye();
        }
        let token = parked.insert(conn);
        // Armed while the idle set is locked: a thread woken at once waits for the lock, and
        // then finds the connection there.
        let registered = match parked.get(token) {
            Some(conn) => {
                // The connection served may not be the one this thread read (see
                // serve_request): a new one is not in the epoll set yet.
                let mut event = EpollEvent::new(flags, token);
                match self.epoll.modify(conn.stream(), &mut event) {
                    Err(Errno::ENOENT) => self.epoll.add(conn.stream(), event),
                    other => other,
                }
            }
            None => Ok(()),
        };
        if let Err(err) = registered {
            let conn = parked.take(token);
            drop(parked);
            wsgi_log!(
                Level::Error,
                "WSGIRS0447: [{}] Cannot keep an idle connection from Apache: {err}",
                self.group.spec.name
            );
            if let Some(conn) = conn {
                conn.goodbye();
            }
        }
    }

    /// The process is stopping: close the idle connections with a Goodbye, which tells their
    /// workers to send their next request elsewhere. When Apache stops or restarts, the socket
    /// goes away with its processes (a graceful restart's new socket has taken its path, so
    /// nothing new arrives): first serve the first request of every connection that already
    /// reached it, which has nowhere else to go. A process that restarts itself leaves its
    /// socket alone: under steady load new connections keep arriving there, and taking them
    /// would keep it from ever stopping.
    fn drain(&self, thread: usize) {
        if let Some(slot) = self.load {
            slot.close();
        }
        while !SOCKET_STAYS.load(Ordering::SeqCst) {
            let Ok(fd) = accept4(self.listen_fd, SockFlag::SOCK_CLOEXEC) else {
                break;
            };
            let stream = UnixStream::from(listener::own_accepted(fd));
            if let Some(conn) = admit(stream, &self.group, self.slot, self.load) {
                self.serve(conn, thread, true);
            }
        }
        self.close_idle();
    }

    /// Says goodbye to every idle connection.
    pub fn close_idle(&self) {
        if let Some(slot) = self.load {
            // First, so that no worker picks one of them while we go through them.
            slot.close();
        }
        let idle = self.parked().take_all();
        for conn in idle {
            conn.goodbye();
        }
    }
}

/// Checks a new connection's peer and sets its deadlines.
fn admit(
    stream: UnixStream,
    group: &GroupRuntime,
    slot: u32,
    load: Option<&'static LoadSlot>,
) -> Option<Connection> {
    let peer_uid = match getsockopt(&stream, PeerCredentials) {
        Ok(cred) => cred.uid(),
        Err(err) => {
            refuse_origin(group, &format_args!("SO_PEERCRED failed: {err}"));
            return None;
        }
    };
    if let Err(err) = origin::check_peer(peer_uid, group.worker_uid) {
        refuse_origin(group, &err);
        return None;
    }
    // Requests are read only when epoll says one is there, and the worker answers body pulls
    // as fast as its client allows (bounded by Apache's Timeout, which socket-timeout defaults
    // to): twice that is a safe ceiling for every read, so a stalled or vanished peer cannot
    // hold a thread forever.
    let _ = stream.set_read_timeout(Some(group.socket_timeout.max(Duration::from_secs(1)) * 2));
    let data_slots = region::data_slots_for(group.spec.response_buffer_size);
    Some(
        Connection::new(stream, slot)
            .with_data_slots(data_slots)
            .with_process_load(load),
    )
}

fn refuse_origin(group: &GroupRuntime, why: &dyn std::fmt::Display) {
    wsgi_log!(
        Level::Error,
        "WSGIRS0441: [{}] Request origin could not be validated: {why}. Connection dropped.",
        group.spec.name
    );
}

/// A request read and checked, waiting for a thread that holds the GIL.
struct Pending {
    conn: Connection,
    payload: Vec<u8>,
    /// When the worker sent it (mod_wsgi.queue_start), for queue-timeout.
    queued_at: Option<Duration>,
}

/// What a thread does with the request it took from the pending queue.
enum Begin {
    Run(Connection, Vec<u8>),
    /// Answered without Python (queue-timeout); the connection if it can carry another.
    Answered(Option<Connection>),
}

impl Dispatcher {
    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads one request, checks where it came from, and runs the request that has waited
    /// longest (this one, or one another thread read earlier). Returns the connection that
    /// thread served, when it can carry another request. `fresh`: the first request of a new
    /// connection (for a kept one, the worker closing it is normal: its Apache child exited).
    ///
    /// Why the queue: every thread that read a request races for the GIL, and CPython gives
    /// it to whichever thread grabs it first, usually one that was already running. If each
    /// thread ran the request it read, a request could lose that race many times over (with
    /// 16 threads at 64 concurrent requests: a median of 0.24 ms but a 99th percentile of
    /// 21-25 ms from the worker's send to the application's first line). The winner takes the
    /// oldest request instead, so requests start in the order they arrived, without any
    /// hand-over between threads.
    fn serve_request(&self, conn: Connection, thread: usize, fresh: bool) -> Option<Connection> {
        let pending = self.read_request(conn, fresh)?;
        self.pending().push_back(pending);
        let mut answered = None;
        let mut started = false;
        // Each thread pushes one request and takes one, so the queue is never empty here.
        let served = python::serve_next(
            || match self.begin(self.pending().pop_front()?, thread) {
                Begin::Run(conn, payload) => {
                    started = true;
                    Some((conn, payload))
                }
                Begin::Answered(conn) => {
                    answered = conn;
                    None
                }
            },
            &self.group,
        );
        if started {
            self.end(thread);
        }
        served.or(answered)
    }

    /// Reads and checks the next request on `conn`.
    fn read_request(&self, mut conn: Connection, fresh: bool) -> Option<Pending> {
        let group = &*self.group;
        let name = &group.spec.name;
        // A request over a kept connection was claimed on the load board by its worker; the
        // claim is given back once the request counts as busy (or is refused).
        let mut claim = ReleaseClaim(self.load.filter(|_| !fresh));
        let payload = match conn.read_request() {
            Ok(payload) => payload,
            Err(WireError::Closed) if !fresh => return None,
            Err(err) => {
                wsgi_log!(
                    Level::Error,
                    "WSGIRS0442: [{name}] Could not read the request from the Apache worker: {err}"
                );
                return None;
            }
        };
        // A kept connection's region is mapped already: the request is picked up (or found
        // withdrawn) before anything else, so the worker cannot also withdraw a request
        // refused below (each would give its claim back).
        let had_region = conn.has_region();
        if had_region && !conn.pick_up() {
            // Its worker withdrew it, and gave the claim back itself: the request went to a
            // process that had a thread free sooner. The worker closed the connection.
            claim.0 = None;
            return None;
        }
        let pairs: Vec<(&[u8], &[u8])> = match wire::pairs(Kind::Request, &payload).collect() {
            Ok(pairs) => pairs,
            Err(err) => {
                refuse_origin(group, &format_args!("malformed request: {err}"));
                return None;
            }
        };
        let secret = origin::secret_for(group.index).unwrap_or([0; origin::SECRET_LEN]);
        if let Err(err) = origin::check_request(&pairs, &secret, name) {
            refuse_origin(group, &err);
            return None;
        }
        // Only a validated worker's region is mapped. Without it the connection still works,
        // with every body byte inline.
        if let Err(err) = conn.accept_region() {
            wsgi_log!(
                Level::Warn,
                "WSGIRS0448: [{name}] Could not map the memory the Apache worker shares for \
                 request and response bodies ({err}); this connection sends them over its \
                 socket instead."
            );
        }
        if !had_region {
            // A region mapped just now says so (a connection's first request is never
            // queued, so there is nothing to find withdrawn): later requests may be queued.
            let _ = conn.pick_up();
        }
        // From here until it ends, the request counts as busy (waiting for the GIL in the
        // pending queue or running), and its worker's claim is no longer needed.
        if let Some(slot) = self.load {
            slot.enter();
        }
        drop(claim);
        let queued_at = queue_start(&pairs);
        drop(pairs);
        Some(Pending {
            conn,
            payload,
            queued_at,
        })
    }

    /// Starts a request on this thread: queue-timeout, then the busy counts.
    fn begin(&self, pending: Pending, thread: usize) -> Begin {
        let group = &*self.group;
        if let (Some(limit), Some(start)) = (group.spec.queue_timeout, pending.queued_at) {
            let waited = now_since_epoch().saturating_sub(start);
            if waited > limit {
                wsgi_log!(
                    Level::Error,
                    "WSGIRS0446: Queue timeout expired for WSGI daemon process '{}'. The \
                     request waited {:.1}s for a free thread (queue-timeout is {}s).",
                    group.spec.name,
                    waited.as_secs_f64(),
                    limit.as_secs()
                );
                if let Some(slot) = self.load {
                    slot.leave();
                }
                let mut conn = pending.conn;
                return Begin::Answered(conn.send_fail(504).is_ok().then_some(conn));
            }
        }
        if let Some(a) = lifecycle::activity() {
            a.request_started(thread);
        }
        Begin::Run(pending.conn, pending.payload)
    }

    /// A request this thread started has ended.
    fn end(&self, thread: usize) {
        if let Some(slot) = self.load {
            slot.leave();
        }
        if let Some(a) = lifecycle::activity() {
            let finished = a.request_finished(thread);
            if let Some(verdict) = a.reached_maximum(&self.policy, finished) {
                if restart_now(&self.group, self.slot, &verdict) {
                    apply_verdict(&self.group.spec.name, verdict);
                }
            }
        }
    }
}

/// Gives a load-board claim back when dropped.
struct ReleaseClaim(Option<&'static LoadSlot>);

impl Drop for ReleaseClaim {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            slot.release_claim();
        }
    }
}

/// When the worker sent the request (mod_wsgi.queue_start, microseconds since the epoch).
fn queue_start(pairs: &[(&[u8], &[u8])]) -> Option<Duration> {
    let (_, value) = pairs
        .iter()
        .find(|(key, _)| *key == b"mod_wsgi.queue_start")?;
    let start: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    Some(Duration::from_micros(start))
}

fn now_since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
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
