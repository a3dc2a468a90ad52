//! Integration tests of fault tolerance (issue 5, SPEC §6 and §7): daemons killed under load,
//! one group saturated while another is measured, every remaining timeout and limit with short
//! values, a daemon that cannot set up, and hostile input on both sides of the module (HTTP
//! clients and the daemon socket). Each test starts its own Apache and stops it again.
//!
//! Apps: tests/apps/robustness.wsgi (misbehaving applications, by PATH_INFO) and
//! tests/apps/import_fails.wsgi (raises at import).

// A failed unwrap in a test is the test failing, with its message.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `<id>: <rest>` in our mode; in reference mode (Debian's mod_wsgi) only the phrase.
fn ours(id: &str, phrase: &str) -> String {
    match our_id() {
        Some(_) => format!("{id}: {phrase}"),
        None => phrase.to_string(),
    }
}

/// Waits until `group` has `n` live daemons (by their start lines); returns them.
fn wait_live_daemons(server: &TestServer, group: &str, n: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    let ok = wait_until(WAIT, || {
        pids = live_daemons(server, group);
        pids.len() >= n
    });
    assert!(
        ok,
        "group '{group}' never had {n} live daemons (have {pids:?})\n{}",
        server.error_log()
    );
    pids
}

/// GET `path` of robustness.wsgi's `/pid` kind: the daemon's pid.
fn pid_of(server: &TestServer, path: &str) -> u32 {
    let r = server.get(path);
    assert_eq!(r.status, 200, "{r:?}\n{}", server.error_log());
    r.text()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a pid: {r:?}"))
}

/// Polls `path` (a pid-reporting URL) until it answers 200 from a pid other than `old`.
fn new_pid_within(server: &TestServer, path: &str, old: u32, within: Duration) -> Option<u32> {
    let mut pid = old;
    let changed = wait_until(within, || {
        if let Ok(r) = server.try_request("GET", path, &[], b"") {
            if r.status == 200 {
                pid = r.text().trim().parse().unwrap_or(old);
            }
        }
        pid != old
    });
    changed.then_some(pid)
}

/// The log line holding `needle` (panics with the log when there is none within WAIT).
fn log_line(server: &TestServer, needle: &str) -> String {
    server.expect_log(needle, WAIT);
    server
        .error_log()
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_default()
        .to_string()
}

/// A tiny xorshift generator: the tests need "random", not "good".
struct Rng(u64);

impl Rng {
    fn from_clock() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Rng(nanos | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The p-th percentile (0 < p ≤ 100) of `samples` (sorted in place), nearest-rank.
fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// One request's outcome in a load loop.
struct Outcome {
    started: Instant,
    ok: bool,
    detail: String,
}

// ---------------------------------------------------------------------------------------------
// 1. Daemons killed with SIGKILL under load
// ---------------------------------------------------------------------------------------------

/// A bounded load (4 clients for ~16 s on loopback) while one daemon of the group, chosen at
/// random among the live ones, is SIGKILLed every ~1.5 s. Only requests that were inside a
/// killed process may fail (at most kills × threads), and once the killing stops (+2 s)
/// every request succeeds again. Prints the counts.
#[test]
fn sigkill_under_load_fails_only_requests_in_the_killed_process() {
    const THREADS: usize = 4;
    let _turn = alone();
    let server = TestServer::start(
        "WSGIDaemonProcess crashy processes=2 threads=4\n\
         WSGIScriptAlias /hello @APPS@/hello.wsgi process-group=crashy\n",
    );
    assert_eq!(server.get("/hello").status, 200, "{}", server.error_log());
    wait_live_daemons(&server, "crashy", 2);

    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let (ok, detail) = match http_request(addr, "GET", "/hello", &[], b"") {
                        Ok(r) if r.status == 200 && r.body == b"Hello World!" => {
                            (true, String::new())
                        }
                        Ok(r) => (false, format!("status {}", r.status)),
                        Err(e) => (false, e.to_string()),
                    };
                    outcomes.push(Outcome {
                        started,
                        ok,
                        detail,
                    });
                }
                outcomes
            })
        })
        .collect();

    let mut rng = Rng::from_clock();
    let seed = rng.0;
    let load_started = Instant::now();
    let mut kills: Vec<(Instant, u32)> = Vec::new();
    // Kill for ~12 s, then keep the load running 4 s more.
    while load_started.elapsed() < Duration::from_secs(12) {
        thread::sleep(Duration::from_millis(1200 + rng.below(600)));
        let live = live_daemons(&server, "crashy");
        if live.is_empty() {
            continue; // both are being replaced right now: wait for the next round
        }
        let victim = live[rng.below(live.len() as u64) as usize];
        kill9(victim);
        kills.push((Instant::now(), victim));
    }
    let last_kill = kills.last().map(|k| k.0).unwrap_or(load_started);
    thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let outcomes: Vec<Outcome> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();

    let total = outcomes.len();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    let late_failures: Vec<&String> = failed
        .iter()
        .filter(|o| o.started >= last_kill + Duration::from_secs(2))
        .map(|o| &o.detail)
        .collect();
    let late_total = outcomes
        .iter()
        .filter(|o| o.started >= last_kill + Duration::from_secs(2))
        .count();
    eprintln!(
        "crash under load: {total} requests, {} failed, {} kills (seed {seed:#x}; \
         {late_total} requests after the last kill + 2 s)",
        failed.len(),
        kills.len()
    );
    assert!(
        kills.len() >= 5,
        "too few kills to mean anything: {kills:?}"
    );
    assert!(total > 200, "too little load to mean anything: {total}");
    let details: Vec<&String> = failed.iter().map(|o| &o.detail).collect();
    eprintln!("crash under load: the failures: {details:?}");
    assert!(
        failed.len() <= kills.len() * THREADS,
        "{} failures for {} kills: more than the requests the killed processes held: {details:?}",
        failed.len(),
        kills.len()
    );
    assert!(late_total > 0, "no request after the last kill + 2 s");
    assert!(
        late_failures.is_empty(),
        "requests failed after the last kill + 2 s: {late_failures:?}\n{}",
        server.error_log()
    );
    // Every kill was noticed and the process replaced.
    assert!(
        wait_until(WAIT, || server
            .log_count("has died, deregister and restart it")
            >= kills.len()),
        "not every kill was logged ({} kills)\n{}",
        kills.len(),
        server.error_log()
    );
    assert_eq!(wait_live_daemons(&server, "crashy", 2).len(), 2);
    assert_eq!(server.get("/hello").status, 200);
}

// ---------------------------------------------------------------------------------------------
// 2. One group saturated, another measured
// ---------------------------------------------------------------------------------------------

/// `n` sequential requests to `path` (fresh connection each); their latencies. Panics on any
/// answer but 200.
fn sequential_latencies(server: &TestServer, path: &str, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|i| {
            let started = Instant::now();
            let r = server.try_request("GET", path, &[], b"");
            let took = started.elapsed();
            match r {
                Ok(r) if r.status == 200 => took,
                other => panic!(
                    "request {i} to {path} failed: {:?}\n{}",
                    other.map(|r| r.status),
                    server.error_log()
                ),
            }
        })
        .collect()
}

/// Group A (threads=2, queue-timeout=1) is saturated by 6 clients hitting a 2 s sleep; group
/// B's p99 over 300 sequential requests stays within 2× its unloaded p99 (+5 ms). A's extra
/// requests get 504 from queue-timeout; B never sees an error.
#[test]
fn a_saturated_group_does_not_slow_another_group() {
    let _turn = alone();
    let server = TestServer::start(
        "WSGIDaemonProcess A processes=1 threads=2 queue-timeout=1\n\
         WSGIDaemonProcess B processes=1 threads=2\n\
         WSGIScriptAlias /a @APPS@/sleep.wsgi process-group=A\n\
         WSGIScriptAlias /b @APPS@/hello.wsgi process-group=B\n",
    );
    assert_eq!(server.get("/a?0").status, 200, "{}", server.error_log());
    // Warm up B (script loaded, connections in their steady state).
    sequential_latencies(&server, "/b", 30);
    let mut unloaded = sequential_latencies(&server, "/b", 300);
    let unloaded_p99 = percentile(&mut unloaded, 99.0);

    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let saturating: Vec<_> = (0..6)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    statuses.push(match http_request(addr, "GET", "/a?2", &[], b"") {
                        Ok(r) => r.status.to_string(),
                        Err(e) => e.to_string(),
                    });
                }
                statuses
            })
        })
        .collect();
    let load_started = Instant::now();
    thread::sleep(Duration::from_millis(2500));
    let mut loaded = sequential_latencies(&server, "/b", 300);
    let loaded_p99 = percentile(&mut loaded, 99.0);
    // Keep A saturated for ~10 s in all.
    if let Some(left) = Duration::from_secs(10).checked_sub(load_started.elapsed()) {
        thread::sleep(left);
    }
    stop.store(true, Ordering::Relaxed);
    let statuses: Vec<String> = saturating
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let ok = statuses.iter().filter(|s| *s == "200").count();
    let queued_out = statuses.iter().filter(|s| *s == "504").count();
    let other: Vec<&String> = statuses
        .iter()
        .filter(|s| *s != "200" && *s != "504")
        .collect();
    eprintln!(
        "isolation: B p99 unloaded {:.2} ms, with A saturated {:.2} ms; \
         A: {ok} x 200, {queued_out} x 504 (queue-timeout), {} other",
        unloaded_p99.as_secs_f64() * 1000.0,
        loaded_p99.as_secs_f64() * 1000.0,
        other.len()
    );
    assert!(
        loaded_p99 <= unloaded_p99 * 2 + Duration::from_millis(5),
        "B slowed down while A was saturated: p99 {loaded_p99:?} vs {unloaded_p99:?} unloaded"
    );
    assert!(
        ok >= 4,
        "A served too little to have been saturated: {statuses:?}"
    );
    assert!(
        queued_out >= 1,
        "A's extra requests never hit queue-timeout: {statuses:?}"
    );
    assert!(other.is_empty(), "A's requests got {other:?}");
    assert!(server.error_log().contains(&ours(
        "WSGIRS0446",
        "Queue timeout expired for WSGI daemon process 'A'"
    )));
    assert!(
        !server.error_log().contains("daemon process 'B'"),
        "B logged an error:\n{}",
        server.error_log()
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The remaining timeouts and limits
// ---------------------------------------------------------------------------------------------

/// A thread that holds the GIL (a 60 s C call through ctypes.PyDLL) is a deadlock: the
/// process restarts at once after deadlock-timeout, logged with WSGIRS0444, and the group
/// serves again from a new pid.
#[test]
fn deadlock_timeout_restarts_a_process_whose_gil_is_held() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess gil processes=1 threads=2 deadlock-timeout=2\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=gil\n",
    );
    let first = pid_of(&server, "/r/pid");
    let addr = server.addr();
    let started = Instant::now();
    let hog = thread::spawn(move || http_request(addr, "GET", "/r/gil?60", &[], b""));
    server.expect_log(
        &ours(
            "WSGIRS0444",
            "[gil] Restarting daemon process now: deadlock-timeout",
        ),
        WAIT,
    );
    let logged_after = started.elapsed();
    let second = new_pid_within(&server, "/r/pid", first, WAIT);
    let serving_after = started.elapsed();
    let hog = hog.join().unwrap();
    let hog_ended = started.elapsed();
    eprintln!(
        "deadlock-timeout=2: restart logged after {logged_after:.1?}, new pid serving after \
         {serving_after:.1?}, the stuck request ended after {hog_ended:.1?} with {:?}",
        hog.as_ref().map(|r| r.status)
    );
    let second = second.unwrap_or_else(|| panic!("no new daemon\n{}", server.error_log()));
    assert_ne!(second, first);
    // ≤ deadlock-timeout, + 1 s for the GIL probe's period, + 1 s for the monitor and start.
    assert!(
        serving_after <= Duration::from_secs(5),
        "the group took {serving_after:?} to serve again after its GIL was taken"
    );
    assert!(!pid_alive(first), "the deadlocked process {first} survived");
    match hog {
        Ok(r) => assert!(r.status >= 500, "the stuck request got {r:?}"),
        Err(e) => panic!("the stuck request got no response: {e}"),
    }
    assert!(hog_ended < Duration::from_secs(10));
}

/// An application that cannot be imported: 500s, then startup-timeout restarts the process
/// (WSGIRS0443) and a new pid starts.
#[test]
fn startup_timeout_restarts_a_process_whose_app_cannot_load() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess boot processes=1 threads=1 startup-timeout=2\n\
         WSGIScriptAlias /broken @APPS@/import_fails.wsgi process-group=boot\n",
    );
    let first = wait_live_daemons(&server, "boot", 1)[0];
    let r = server.get("/broken");
    assert_eq!(r.status, 500, "{r:?}");
    log_line(&server, "import_fails.wsgi cannot be imported, on purpose");
    let line = log_line(&server, "startup-timeout");
    assert!(
        line.contains(&ours(
            "WSGIRS0443",
            "[boot] Restarting daemon process gracefully: startup-timeout"
        )),
        "{line}"
    );
    let mut pids = Vec::new();
    assert!(
        wait_until(WAIT, || {
            pids = live_daemons(&server, "boot");
            pids.iter().any(|&p| p != first)
        }),
        "no new daemon after the startup-timeout restart\n{}",
        server.error_log()
    );
    assert!(!pid_alive(first));
    // The new process cannot load the app either.
    assert_eq!(server.get("/broken").status, 500);
}

/// listen-backlog=1, threads=1, one slow request in the only thread, and 6 more clients:
/// the backlog holds a couple of them (served once the thread is free); the others are
/// retried until connect-timeout=1 and get 503 "Unable to connect to WSGI daemon process".
#[test]
fn connect_timeout_gives_503_when_the_backlog_is_full() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess tight processes=1 threads=1 listen-backlog=1 connect-timeout=1\n\
         WSGIScriptAlias /sleep @APPS@/sleep.wsgi process-group=tight\n",
    );
    assert_eq!(server.get("/sleep?0").status, 200, "{}", server.error_log());
    let addr = server.addr();
    let slow = thread::spawn(move || http_request(addr, "GET", "/sleep?6", &[], b""));
    thread::sleep(Duration::from_millis(500));
    let flood: Vec<_> = (0..6)
        .map(|_| {
            thread::spawn(move || {
                let started = Instant::now();
                let r = http_request(addr, "GET", "/sleep?0", &[], b"");
                (
                    r.map(|r| r.status).map_err(|e| e.to_string()),
                    started.elapsed(),
                )
            })
        })
        .collect();
    let results: Vec<_> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    let slow = slow.join().unwrap().map(|r| r.status);
    eprintln!("connect-timeout=1, backlog 1: slow request {slow:?}; flood {results:?}");
    assert_eq!(slow.ok(), Some(200));
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s == Ok(503)).collect();
    assert!(
        !refused.is_empty(),
        "no request was refused with 503: {results:?}\n{}",
        server.error_log()
    );
    for (_, took) in &refused {
        assert!(
            *took >= Duration::from_millis(900) && *took < Duration::from_secs(3),
            "a 503 came after {took:?}, not after ~connect-timeout"
        );
    }
    assert!(
        results.iter().all(|(s, _)| *s == Ok(503) || *s == Ok(200)),
        "{results:?}"
    );
    let line = log_line(&server, "Unable to connect to WSGI daemon process 'tight'");
    if our_id().is_some() {
        assert!(line.contains("WSGIRS0301"), "{line}");
    }
    assert_eq!(server.get("/sleep?0").status, 200);
}

/// socket-timeout=1 and an app that sleeps 3 s before start_response: 504 and mod_wsgi's
/// phrase; the group then serves normally.
#[test]
fn socket_timeout_gives_504_when_headers_are_late() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess slowhdr processes=1 threads=2 socket-timeout=1\n\
         WSGIScriptAlias /sleep @APPS@/sleep.wsgi process-group=slowhdr\n",
    );
    let started = Instant::now();
    let r = server.get("/sleep?3");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}\n{}", server.error_log());
    assert!(took < Duration::from_millis(2800), "the 504 took {took:?}");
    let line = log_line(
        &server,
        "Timeout when reading response headers from daemon process 'slowhdr'",
    );
    if our_id().is_some() {
        assert!(line.contains("WSGIRS0304"), "{line}");
    }
    assert_eq!(server.get("/sleep?0").status, 200);
}

/// `apache2 -k graceful` with a 3 s request in flight (graceful-timeout=10): the request
/// completes with 200 from the old daemon while a new daemon already serves other requests.
#[test]
fn graceful_restart_lets_a_request_in_flight_finish() {
    let _turn = shared();
    let mut server = TestServer::start(
        "WSGIDaemonProcess drain processes=1 threads=2 graceful-timeout=10\n\
         WSGIScriptAlias /sleep @APPS@/sleep.wsgi process-group=drain\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=drain\n",
    );
    let old = pid_of(&server, "/r/pid");
    let addr = server.addr();
    let started = Instant::now();
    let slow = thread::spawn(move || http_request(addr, "GET", "/sleep?3", &[], b""));
    thread::sleep(Duration::from_millis(300));
    server.graceful();
    let new = new_pid_within(&server, "/r/pid", old, Duration::from_secs(10));
    let new_serving = started.elapsed();
    let in_flight = !slow.is_finished();
    let slow = slow.join().unwrap();
    eprintln!(
        "graceful with a 3 s request in flight: new daemon {new:?} served after \
         {new_serving:.1?} (slow request still in flight: {in_flight}); slow request {:?}",
        slow.as_ref().map(|r| (r.status, r.text()))
    );
    let new = new.unwrap_or_else(|| panic!("no new daemon\n{}", server.error_log()));
    assert_ne!(new, old);
    assert!(
        in_flight,
        "the new daemon served only after the old request had finished ({new_serving:?})"
    );
    let slow = slow.unwrap_or_else(|e| panic!("the request in flight failed: {e}"));
    assert_eq!(slow.status, 200, "{slow:?}\n{}", server.error_log());
    assert!(
        slow.text().contains(&format!("in {old}")),
        "served by the old daemon: {slow:?}"
    );
    assert!(
        wait_until(WAIT, || !pid_alive(old)),
        "the old daemon {old} did not exit after its request"
    );
}

/// `apache2 -k stop` with a 30 s request in flight (shutdown-timeout=2): Apache's stop
/// completes in a few seconds, no daemon survives, no socket is left.
#[test]
fn shutdown_timeout_bounds_apache_stop_with_a_request_in_flight() {
    let _turn = shared();
    let mut server = TestServer::start(
        "WSGIDaemonProcess halt processes=1 threads=2 shutdown-timeout=2\n\
         WSGIScriptAlias /sleep @APPS@/sleep.wsgi process-group=halt\n",
    );
    assert_eq!(server.get("/sleep?0").status, 200);
    let daemons = wait_live_daemons(&server, "halt", 1);
    let addr = server.addr();
    let stuck = thread::spawn(move || http_request(addr, "GET", "/sleep?30", &[], b""));
    thread::sleep(Duration::from_millis(500));
    assert_eq!(server.socket_files().len(), 1);
    let report = server.stop();
    let stuck = stuck.join().unwrap();
    eprintln!(
        "stop with a 30 s request in flight (shutdown-timeout=2): took {:.1?}, forced {}, \
         survivors {:?}; the request got {:?}",
        report.elapsed,
        report.forced,
        report.survivors.iter().map(|p| p.pid).collect::<Vec<_>>(),
        stuck.as_ref().map(|r| r.status)
    );
    assert!(!report.forced, "Apache's parent had to be killed");
    assert!(
        report.survivors.is_empty(),
        "processes survived the stop: {:?}",
        report.survivors
    );
    assert!(daemons.iter().all(|&p| !pid_alive(p)));
    assert!(
        report.elapsed <= Duration::from_secs(6),
        "stop took {:?} with shutdown-timeout=2",
        report.elapsed
    );
    assert!(
        server.socket_files().is_empty(),
        "sockets left: {:?}",
        server.socket_files()
    );
    if let Ok(r) = stuck {
        assert_ne!(r.status, 200, "the killed request cannot have completed");
    }
}

/// memory-limit=200000000 and an app that allocates 500 MB: MemoryError, 500, logged; the
/// process keeps serving small requests (and small allocations).
#[test]
fn memory_limit_turns_a_huge_allocation_into_memory_error() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess small processes=1 threads=2 memory-limit=200000000\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=small\n",
    );
    let first = pid_of(&server, "/r/pid");
    let r = server.get("/r/alloc?500");
    assert_eq!(r.status, 500, "{r:?}\n{}", server.error_log());
    log_line(&server, "MemoryError");
    let r = server.get("/r/alloc?20");
    assert_eq!(r.status, 200, "{r:?}\n{}", server.error_log());
    assert_eq!(pid_of(&server, "/r/pid"), first, "the process was replaced");
}

/// cpu-time-limit=2 and a request that burns 3 s of CPU: SIGXCPU makes the process restart
/// gracefully (the request still completes), logged with the reason, and a new pid serves.
#[test]
fn cpu_time_limit_restarts_the_process_gracefully() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess cpu processes=1 threads=2 cpu-time-limit=2\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=cpu\n",
    );
    let first = pid_of(&server, "/r/pid");
    let r = server.get("/r/burn?3");
    assert_eq!(r.status, 200, "{r:?}\n{}", server.error_log());
    assert_eq!(r.text().trim(), format!("burnt {first}"));
    let line = log_line(&server, "cpu-time-limit");
    assert!(
        line.contains(&ours(
            "WSGIRS0443",
            "[cpu] Restarting daemon process gracefully: cpu-time-limit"
        )),
        "{line}"
    );
    let second = new_pid_within(&server, "/r/pid", first, WAIT)
        .unwrap_or_else(|| panic!("no new daemon\n{}", server.error_log()));
    assert_ne!(second, first);
}

/// home=/nonexistent/dir: the daemon says so clearly (WSGIRS0438), requests to that group get
/// an error, the other group serves, and the failing daemon is retried with a back-off (a
/// handful of lines in 8 s, not hundreds).
#[test]
fn a_daemon_that_cannot_set_up_is_reported_and_retried_with_backoff() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess homeless processes=1 threads=1 home=/nonexistent/dir socket-timeout=4\n\
         WSGIDaemonProcess fine processes=1 threads=1\n\
         WSGIScriptAlias /homeless @APPS@/hello.wsgi process-group=homeless\n\
         WSGIScriptAlias /fine @APPS@/hello.wsgi process-group=fine\n",
    );
    let line = log_line(
        &server,
        "cannot change to home directory '/nonexistent/dir'",
    );
    assert!(
        line.contains(&ours("WSGIRS0438", "Daemon process 'homeless'")),
        "{line}"
    );
    let started = Instant::now();
    let r = server.try_request("GET", "/homeless", &[], b"");
    let took = started.elapsed();
    eprintln!(
        "home=/nonexistent/dir: request got {:?} after {took:.1?}",
        r.as_ref().map(|r| r.status).map_err(|e| e.to_string())
    );
    let status = r.map(|r| r.status).unwrap_or(0);
    assert!(
        [500, 503, 504].contains(&status),
        "want an error status, got {status}"
    );
    assert_eq!(server.get("/fine").status, 200);
    let before = server.log_count("cannot change to home directory");
    thread::sleep(Duration::from_secs(8));
    let during = server.log_count("cannot change to home directory") - before;
    eprintln!("home=/nonexistent/dir: {during} set-up failures logged in 8 s");
    assert!(
        during <= 8,
        "the failing daemon is restarted in a tight loop: {during} failures in 8 s"
    );
    assert!(during >= 1, "the failing daemon is not retried at all");
    assert_eq!(server.get("/fine").status, 200);
}

/// Seconds since midnight of an Apache error-log line (`[Tue Nov 24 06:41:25.854731 2026]`).
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.strip_prefix('[')?.split(']').next()?;
    let clock = stamp.split_whitespace().nth(3)?;
    let mut parts = clock.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The contract behind the test above, stricter: a daemon whose set-up fails (exit code 78,
/// EXIT_SETUP_FAILED) is reported with that exit code, and its restarts back off
/// exponentially (1 s, 2 s, 4 s, 8 s … up to 30 s), so over 16 s there are at most ~5
/// attempts and the gaps grow.
#[test]
fn failing_setup_is_reported_with_its_exit_code_and_backs_off_exponentially() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess homeless processes=1 threads=1 home=/nonexistent/dir\n\
         WSGIScriptAlias /homeless @APPS@/hello.wsgi process-group=homeless\n",
    );
    server.expect_log("cannot change to home directory '/nonexistent/dir'", WAIT);
    thread::sleep(Duration::from_secs(16));
    let log = server.error_log();
    let attempts: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("cannot change to home directory"))
        .filter_map(log_time)
        .collect();
    let gaps: Vec<String> = attempts
        .windows(2)
        .map(|w| format!("{:.1}", w[1] - w[0]))
        .collect();
    eprintln!(
        "failing set-up: {} attempts in ~16 s, gaps {gaps:?} s",
        attempts.len()
    );
    let died: Vec<&str> = log.lines().filter(|l| l.contains("has died")).collect();
    assert!(
        died.iter().all(|l| l.contains("exit code 78")),
        "the set-up failure's exit code is not reported: {died:#?}"
    );
    assert!(
        attempts.len() <= 6,
        "no exponential back-off: {} attempts, gaps {gaps:?}",
        attempts.len()
    );
    let last_gap = attempts
        .windows(2)
        .last()
        .map(|w| w[1] - w[0])
        .unwrap_or(0.0);
    assert!(last_gap >= 3.5, "the back-off does not grow: gaps {gaps:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. Hostile input
// ---------------------------------------------------------------------------------------------

/// Malformed frames sent straight to a daemon's socket (as root, who may connect): garbage,
/// a header declaring 4 GiB, a truncated frame, a frame with a wrong secret, and a connection
/// that sends nothing. Each connection is dropped without an answer and logged; the daemon
/// (one thread only) keeps serving real requests after each.
#[test]
fn malformed_frames_on_the_daemon_socket_are_dropped_and_logged() {
    let _turn = shared();
    require_root!();
    let server = TestServer::start(
        "WSGIDaemonProcess wire processes=1 threads=1 socket-timeout=2\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=wire\n",
    );
    let first = pid_of(&server, "/r/pid");
    let socket = server.socket_files().pop().expect("the group's socket");
    let script = server.apps_dir().join("robustness.wsgi");
    let mut truncated = vec![1u8];
    truncated.extend_from_slice(&100u32.to_le_bytes());
    truncated.extend_from_slice(b"0123456789");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\xfe garbage".to_vec(),
            "unknown frame kind 71",
        ),
        (
            "4 GiB frame header",
            vec![1, 0xff, 0xff, 0xff, 0xff],
            "exceeds the limit",
        ),
        ("truncated frame", truncated, "in the middle of a frame"),
        (
            "wrong secret",
            forged_request(&[7u8; 32], "wire", &script.to_string_lossy()),
            "origin secret is wrong",
        ),
        (
            "silent connection",
            Vec::new(),
            "Could not read the request",
        ),
    ];
    for (what, bytes, logged) in cases {
        let before = server.error_log().len();
        let mut stream = UnixStream::connect(&socket).expect("connect as root");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(&bytes).unwrap();
        if what == "truncated frame" {
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let started = Instant::now();
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        let took = started.elapsed();
        // Closing a UNIX socket with unread data resets it: that is a drop too.
        let dropped = match &read {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(
            dropped && answer.is_empty(),
            "{what}: the daemon answered {answer:?} / {read:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{what}: dropped only after {took:?}"
        );
        assert!(
            wait_until(WAIT, || server.error_log_since(before).contains(logged)),
            "{what}: nothing logged containing {logged:?}\n{}",
            server.error_log_since(before)
        );
        let line = server
            .error_log_since(before)
            .lines()
            .find(|l| l.contains(logged))
            .unwrap_or_default()
            .to_string();
        if our_id().is_some() {
            assert!(
                line.contains("WSGIRS0441") || line.contains("WSGIRS0442"),
                "{what}: {line}"
            );
        }
        assert_eq!(
            pid_of(&server, "/r/pid"),
            first,
            "{what}: the daemon changed"
        );
    }
}

/// A request line of garbage gets Apache's 400; the daemons are not involved and keep serving.
#[test]
fn garbage_request_line_is_400_and_daemons_are_unaffected() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess calm processes=1 threads=2\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=calm\n",
    );
    let first = pid_of(&server, "/r/pid");
    for garbage in [
        &b"\x01\x02\x03 garbage \xff\xfe\r\n\r\n"[..],
        b"GET /r/pid HTTP/9.9.9 extra\r\n\r\n",
        b"NOT-A-REQUEST\r\n\r\n",
    ] {
        let mut conn = server.connect();
        conn.set_read_timeout(Duration::from_secs(10));
        conn.write_raw(garbage).unwrap();
        let r = conn
            .read_response("GET")
            .unwrap_or_else(|e| panic!("{garbage:?}: {e}"));
        assert_eq!(r.status, 400, "{garbage:?}: {r:?}");
    }
    assert_eq!(pid_of(&server, "/r/pid"), first);
    assert_eq!(server.log_count("has died"), 0);
}

/// Sends a POST head declaring `length` bytes and 4 KB of body, then waits; returns the
/// outcome and how long it took to come.
fn stalled_upload(
    server: &TestServer,
    path: &str,
    length: &str,
) -> (Result<u16, String>, Duration) {
    let mut conn = server.connect();
    let head = conn.head("POST", path, &[("Content-Length", length)], 0);
    conn.write_raw(head.as_bytes()).unwrap();
    conn.write_raw(&[b'x'; 4096]).unwrap();
    let started = Instant::now();
    conn.set_read_timeout(Duration::from_secs(20));
    let r = conn.read_response("POST");
    (
        r.map(|r| r.status).map_err(|e| e.to_string()),
        started.elapsed(),
    )
}

/// Content-Length: 2147483648, a few KB sent, then the client waits (Timeout 3). Where
/// Apache's own LimitRequestBody (1 GiB by default since 2.4.54) applies, the answer is an
/// immediate 413; with `LimitRequestBody 0` the body is read until Apache's Timeout, and the
/// request ends within ~Timeout + 2 s, with a 408. Either way the daemon's only thread is free
/// again.
#[test]
fn huge_declared_upload_that_stalls_frees_the_daemon_thread() {
    let _turn = shared();
    let server = TestServer::start(
        "Timeout 3\n\
         WSGIDaemonProcess upload processes=1 threads=1\n\
         WSGIScriptAlias /input @APPS@/input.wsgi process-group=upload\n\
         WSGIScriptAlias /big @APPS@/input.wsgi process-group=upload\n\
         <Location /big>\n    LimitRequestBody 0\n</Location>\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=upload\n",
    );
    let first = pid_of(&server, "/r/pid");

    let (limited, took) = stalled_upload(&server, "/input?mode=crc", "2147483648");
    eprintln!("2 GiB upload declared, default LimitRequestBody: {limited:?} after {took:.1?}");
    assert_eq!(
        limited,
        Ok(413),
        "Apache's LimitRequestBody should refuse it at once"
    );
    assert!(took < Duration::from_secs(2));

    let (stalled, took) = stalled_upload(&server, "/big?mode=crc", "2147483648");
    eprintln!("2 GiB upload declared, LimitRequestBody 0, stalled (Timeout 3): {stalled:?} after {took:.1?}");
    assert!(
        took <= Duration::from_millis(5500),
        "the stalled upload was held for {took:?}"
    );
    if let Ok(status) = stalled {
        assert_eq!(
            status,
            408,
            "a stalled upload should get 408 Request Timeout\n{}",
            server.error_log()
        );
    }
    // threads=1: this only works if the thread was freed.
    let started = Instant::now();
    assert_eq!(pid_of(&server, "/r/pid"), first);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Slow-loris clients (one header byte per second) do not delay other clients.
#[test]
fn slow_loris_clients_do_not_delay_others() {
    let _turn = alone();
    let server = TestServer::start(
        "WSGIDaemonProcess steady processes=1 threads=2\n\
         WSGIScriptAlias /hello @APPS@/hello.wsgi process-group=steady\n",
    );
    assert_eq!(server.get("/hello").status, 200);
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let loris: Vec<_> = (0..10)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut conn = match KeepAlive::connect(addr) {
                    Ok(c) => c,
                    Err(_) => return 0,
                };
                let head = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaa";
                let mut sent = 0;
                for byte in head.iter() {
                    if stop.load(Ordering::Relaxed) || conn.write_raw(&[*byte]).is_err() {
                        break;
                    }
                    sent += 1;
                    thread::sleep(Duration::from_secs(1));
                }
                sent
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(2));
    let mut latencies = Vec::new();
    let measure_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < measure_until {
        let started = Instant::now();
        let r = server.get("/hello");
        latencies.push(started.elapsed());
        assert_eq!(r.status, 200, "{r:?}");
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<usize> = loris.into_iter().map(|t| t.join().unwrap()).collect();
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "slow loris: {} requests meanwhile, worst {worst:?}; loris bytes sent {sent:?}",
        latencies.len()
    );
    assert!(latencies.len() >= 20);
    assert!(worst < Duration::from_secs(1), "a request took {worst:?}");
}

/// An app that returns an int: 500 and a log line naming the error; the group keeps serving.
#[test]
fn app_returning_a_non_iterable_is_500_and_logged() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess odd processes=1 threads=2\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=odd\n",
    );
    let first = pid_of(&server, "/r/pid");
    let r = server.get("/r/int");
    assert_eq!(r.status, 500, "{r:?}");
    let line = log_line(&server, "'int' object is not iterable");
    assert!(
        line.contains("[odd]"),
        "the log line does not name the group: {line}"
    );
    server.expect_log(
        &ours("WSGIRS0506", "Exception occurred processing WSGI script"),
        WAIT,
    );
    assert_eq!(pid_of(&server, "/r/pid"), first);
}

/// An iterable whose close() raises: the error is logged, the group keeps serving. With a
/// Content-Length the client has its whole body by then; without one, the response is cut
/// (no final chunk), since the daemon reports the failure by not ending the response.
#[test]
fn iterable_close_raising_is_logged_and_the_group_keeps_serving() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess closer processes=1 threads=2\n\
         WSGIScriptAlias /r @APPS@/robustness.wsgi process-group=closer\n",
    );
    let first = pid_of(&server, "/r/pid");
    let mut seen = Vec::new();
    for query in ["", "?nocl"] {
        let before = server.error_log().len();
        let r = server.try_request("GET", &format!("/r/close-raise{query}"), &[], b"");
        let summary = match &r {
            Ok(r) => format!("complete {} {:?}", r.status, r.text()),
            Err(e) => format!("cut: {e}"),
        };
        seen.push(format!("{query:?}: {summary}"));
        match &r {
            Ok(r) => {
                assert_eq!(r.status, 200, "{r:?}");
                assert_eq!(r.text(), "first chunk;second chunk");
            }
            Err(e) => assert!(
                e.is_incomplete() || e.is_no_response(),
                "{query}: unexpected {e}"
            ),
        }
        assert!(
            wait_until(WAIT, || server
                .error_log_since(before)
                .contains("close() of robustness.wsgi raised on purpose")),
            "close()'s exception was not logged\n{}",
            server.error_log_since(before)
        );
    }
    eprintln!("close() raising: {seen:?}");
    assert_eq!(pid_of(&server, "/r/pid"), first);
}
