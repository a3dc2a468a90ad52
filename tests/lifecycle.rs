//! Integration tests of the daemon lifecycle limits (SPEC §7): each restart happens for the
//! reason configured, is logged with that reason, and shows as a new daemon pid.

// A failed unwrap in a test is the test failing, with its message.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::*;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

fn pid_of(server: &TestServer, path: &str) -> u64 {
    let r = server.get(path);
    assert_eq!(r.status, 200, "{r:?}\n{}", server.error_log());
    r.json().u64_of("pid")
}

fn new_pid_within(server: &TestServer, path: &str, old: u64) -> u64 {
    let mut pid = old;
    let changed = wait_until(WAIT, || {
        let r = server.try_request("GET", path, &[], b"");
        if let Ok(r) = r {
            if r.status == 200 {
                pid = r.json().u64_of("pid");
            }
        }
        pid != old
    });
    assert!(
        changed,
        "no new daemon after waiting\n{}",
        server.error_log()
    );
    pid
}

#[test]
fn maximum_requests_recycles_the_process() {
    let server = TestServer::start(
        "WSGIDaemonProcess recycle processes=1 threads=1 maximum-requests=3\n\
         WSGIScriptAlias /whoami @APPS@/whoami.wsgi process-group=recycle\n",
    );
    let first = pid_of(&server, "/whoami");
    assert_eq!(pid_of(&server, "/whoami"), first);
    assert_eq!(pid_of(&server, "/whoami"), first);
    let second = new_pid_within(&server, "/whoami", first);
    assert_ne!(second, first);
    server.expect_log("maximum-requests reached (3 requests served)", WAIT);
}

#[test]
fn inactivity_timeout_restarts_an_idle_process() {
    let server = TestServer::start(
        "WSGIDaemonProcess idle processes=1 threads=1 inactivity-timeout=2\n\
         WSGIScriptAlias /whoami @APPS@/whoami.wsgi process-group=idle\n",
    );
    let first = pid_of(&server, "/whoami");
    server.expect_log("inactivity-timeout: no request for 2s", WAIT);
    let second = new_pid_within(&server, "/whoami", first);
    assert_ne!(second, first);
}

#[test]
fn restart_interval_restarts_periodically() {
    let server = TestServer::start(
        "WSGIDaemonProcess periodic processes=1 threads=2 restart-interval=2\n\
         WSGIScriptAlias /whoami @APPS@/whoami.wsgi process-group=periodic\n",
    );
    let first = pid_of(&server, "/whoami");
    server.expect_log("restart-interval of 2s reached", WAIT);
    assert_ne!(new_pid_within(&server, "/whoami", first), first);
}

#[test]
fn request_timeout_abandons_a_stuck_request_and_recovers() {
    let server = TestServer::start(
        "WSGIDaemonProcess stuck processes=1 threads=2 request-timeout=2\n\
         WSGIScriptAlias /sleep @APPS@/sleep.wsgi process-group=stuck\n\
         WSGIScriptAlias /whoami @APPS@/whoami.wsgi process-group=stuck\n",
    );
    let first = pid_of(&server, "/whoami");
    let started = Instant::now();
    let r = server.try_request("GET", "/sleep?30", &[], b"");
    let status = r.as_ref().map(|r| r.status).unwrap_or(0);
    assert!(status == 0 || status >= 500, "a stuck request got {status}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the stuck request was not cut off"
    );
    server.expect_log(
        "request-timeout: a request has been running for more than 2s",
        WAIT,
    );
    assert_ne!(new_pid_within(&server, "/whoami", first), first);
}

#[test]
fn queue_timeout_answers_504_when_all_threads_are_busy() {
    let server = TestServer::start(
        "WSGIDaemonProcess queue processes=1 threads=1 queue-timeout=1\n\
         WSGIScriptAlias /sleep @APPS@/sleep.wsgi process-group=queue\n",
    );
    let addr = server.addr();
    let slow = std::thread::spawn(move || http_request(addr, "GET", "/sleep?3", &[], b""));
    std::thread::sleep(Duration::from_millis(300));
    let r = server.get("/sleep?0");
    assert_eq!(r.status, 504, "{r:?}\n{}", server.error_log());
    server.expect_log(
        "Queue timeout expired for WSGI daemon process 'queue'",
        WAIT,
    );
    let slow = slow.join().unwrap().unwrap();
    assert_eq!(slow.status, 200);
}

#[test]
fn script_change_restarts_the_process_with_new_code() {
    let server = TestServer::start(
        "WSGIDaemonProcess reload processes=1 threads=2\n\
         WSGIScriptAlias /v @ROOT@/apps/version.wsgi process-group=reload\n",
    );
    let script = server.apps_dir().join("version.wsgi");
    let app = |version: &str| {
        format!(
            "import os\n\
             def application(environ, start_response):\n    \
             body = ('{version} %d' % os.getpid()).encode()\n    \
             start_response('200 OK', [('Content-Type', 'text/plain')])\n    \
             return [body]\n"
        )
    };
    std::fs::write(&script, app("one")).unwrap();
    let r = server.get("/v");
    assert!(
        r.text().starts_with("one "),
        "{r:?}\n{}",
        server.error_log()
    );
    let first_pid = r.text().split(' ').nth(1).unwrap_or("").to_string();
    // A new mtime, whatever the clock's resolution.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&script, app("two")).unwrap();
    let r = server.get("/v");
    assert!(
        r.text().starts_with("two "),
        "the changed script was not reloaded: {r:?}"
    );
    server.expect_log(
        "has changed; reloading it and restarting this daemon process",
        WAIT,
    );
    let mut pid = first_pid.clone();
    assert!(wait_until(WAIT, || {
        let r = server.get("/v");
        pid = r.text().split(' ').nth(1).unwrap_or("").to_string();
        r.text().starts_with("two ") && pid != first_pid
    }));
}

#[test]
fn script_reloading_off_keeps_the_loaded_code() {
    let server = TestServer::start(
        "WSGIDaemonProcess keep processes=1 threads=2\n\
         WSGIScriptReloading Off\n\
         WSGIScriptAlias /v @ROOT@/apps/version.wsgi process-group=keep\n",
    );
    let script = server.apps_dir().join("version.wsgi");
    let app = |version: &str| {
        format!(
            "def application(environ, start_response):\n    \
             start_response('200 OK', [('Content-Type', 'text/plain')])\n    \
             return [b'{version}']\n"
        )
    };
    std::fs::write(&script, app("one")).unwrap();
    assert_eq!(server.get("/v").text(), "one");
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&script, app("two")).unwrap();
    assert_eq!(server.get("/v").text(), "one");
}

/// A bounded load (4 clients for ~20 s on loopback) while `apache2 -k graceful` is sent 5
/// times: not one request may fail. Prints the counts.
#[test]
fn graceful_restarts_under_load_fail_no_request() {
    let mut server = TestServer::start(
        "WSGIDaemonProcess busy processes=2 threads=4\n\
         WSGIScriptAlias /hello @APPS@/hello.wsgi process-group=busy\n",
    );
    assert_eq!(server.get("/hello").status, 200);
    let addr = server.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match http_request(addr, "GET", "/hello", &[], b"") {
                        Ok(r) if r.status == 200 && r.body == b"Hello World!" => ok += 1,
                        Ok(r) => {
                            failed += 1;
                            errors.push(format!("status {}", r.status));
                        }
                        Err(e) => {
                            failed += 1;
                            errors.push(format!("{e:?}"));
                        }
                    }
                }
                (ok, failed, errors)
            })
        })
        .collect();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(3));
        server.graceful();
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    for client in clients {
        let (o, f, e) = client.join().unwrap();
        ok += o;
        failed += f;
        errors.extend(e);
    }
    eprintln!(
        "graceful under load: {ok} requests succeeded, {failed} failed during 5 graceful restarts"
    );
    assert!(ok > 1000, "too little load to mean anything: {ok}");
    assert_eq!(
        failed,
        0,
        "failed requests: {errors:?}\n{}",
        server.error_log()
    );
}

/// While a daemon is busy, the memory a big body freed serves the next one (it is given back
/// once the process is quiet, below): after the first 16 MiB body, the next ones fault in
/// almost none of their pages again. With glibc's defaults, freeing big blocks at the top of
/// a thread's arena gives their pages back at once, and every big body faults them all in
/// again (4,096 faults for 16 MiB), which cost big uploads a fifth of their speed.
#[test]
fn memory_a_big_body_freed_serves_the_next_request() {
    let server = TestServer::start(
        "WSGIDaemonProcess busy processes=1 threads=1\n\
         WSGIScriptAlias /memory @APPS@/memory.wsgi process-group=busy\n",
    );
    let faults = || {
        let r = server.get("/memory?body=16");
        assert_eq!(r.status, 200, "{r:?}\n{}", server.error_log());
        r.json().u64_of("faults")
    };
    let first = faults();
    // Back to back, well within the second after which a quiet process gives memory back.
    let next: Vec<u64> = (0..3).map(|_| faults()).collect();
    eprintln!("page faults for a 16 MiB body: first {first}, then {next:?}");
    // Otherwise this test proves nothing: the first body's pages were faulted in (most of
    // them: memory Python freed while starting may serve part of it).
    assert!(
        first >= 2_000,
        "the first 16 MiB took only {first} page faults"
    );
    if reference_mode() {
        return;
    }
    // Two of three: a pause of a second between two requests (a loaded machine) lets the
    // process give its memory back, as it should.
    assert!(
        next.iter().filter(|&&f| f < 400).count() >= 2,
        "the next 16 MiB bodies faulted their pages in again: first {first}, then {next:?}"
    );
}

/// A server whose group 'quiet' (one process of `threads` threads) runs memory.wsgi at
/// /memory, with the module's debug lines (the give-back ones) in the log.
fn quiet_group_server(threads: u32) -> TestServer {
    TestServer::start(&format!(
        "LogLevel wsgi_module:debug\n\
         WSGIDaemonProcess quiet processes=1 threads={threads}\n\
         WSGIScriptAlias /memory @APPS@/memory.wsgi process-group=quiet\n"
    ))
}

/// What big bodies freed on several threads is given back once the process is quiet too, all
/// of it: the memory a daemon lets malloc keep for the next request (above) must not stay at
/// the top of per-thread arenas, which malloc_trim leaves alone.
#[test]
fn memory_big_bodies_freed_on_several_threads_is_given_back_once_quiet() {
    let server = quiet_group_server(4);
    let report = server.get("/memory").json();
    let (pid, before) = (report.u64_of("pid") as u32, report.u64_of("rss_kib"));
    // Four at a time, twice: every thread of the process has had a 12 MiB body. (Together
    // under 64 MiB, which malloc keeps free at the top of the heap while busy.)
    for _ in 0..2 {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let r = server.get("/memory?body=12");
                    assert_eq!(r.status, 200, "{r:?}");
                });
            }
        });
    }
    let held = rss_kib(pid).unwrap_or(0);
    if reference_mode() {
        return;
    }
    // Otherwise this test proves nothing: the bodies' memory was kept for the next request.
    assert!(
        held > before + 9 * 1024,
        "the freed bodies were not kept: {before} -> {held} KiB"
    );
    assert_memory_given_back(&server, pid, (before, "the bodies"), held, 6 * 1024);
}

/// Waits until daemon `pid` is back under `margin_kib` above its resident size `before` (what)
/// after holding `held` KiB, and fails if it is not within WAIT.
fn assert_memory_given_back(
    server: &TestServer,
    pid: u32,
    (before, what): (u64, &str),
    held: u64,
    margin_kib: u64,
) {
    let mut now = held;
    let given_back = wait_until(WAIT, || {
        now = rss_kib(pid).unwrap_or(u64::MAX);
        now < before + margin_kib
    });
    assert!(
        given_back,
        "the daemon still holds {now} KiB (was {before} KiB before {what}, {held} KiB after)\n{}",
        server.error_log()
    );
}

#[test]
fn memory_the_application_freed_is_given_back_once_the_process_is_quiet() {
    let server = quiet_group_server(2);
    let r = server.get("/memory?fragment=96");
    assert_eq!(r.status, 200, "{r:?}\n{}", server.error_log());
    let report = r.json();
    let (pid, before, held) = (
        report.u64_of("pid") as u32,
        report.u64_of("before_kib"),
        report.u64_of("rss_kib"),
    );
    // Otherwise this test proves nothing: malloc kept the freed blocks.
    assert!(
        held > before + 64 * 1024,
        "the app's freed 96 MiB were not held: {before} -> {held} KiB"
    );
    // Nothing else gives it back: still held a moment later (a second before the trim).
    std::thread::sleep(Duration::from_millis(300));
    let soon = rss_kib(pid).unwrap_or(0);
    assert!(
        soon > before + 64 * 1024,
        "the freed memory went back on its own: {before} -> {held} -> {soon} KiB"
    );
    if reference_mode() {
        // mod_wsgi keeps it (the README says so).
        std::thread::sleep(Duration::from_secs(3));
        let later = rss_kib(pid).unwrap_or(0);
        assert!(
            later > before + 64 * 1024,
            "{before} -> {held} -> {later} KiB"
        );
        return;
    }
    assert_memory_given_back(&server, pid, (before, "the request"), held, 32 * 1024);
    server.expect_log("WSGIRS0450: Process 'quiet' gave the memory", WAIT);
}
