//! Integration tests of persistent worker→daemon connections: each Apache child keeps idle
//! UNIX-socket connections to a daemon group and reuses them, a busy daemon's connections are
//! passed over, dead or departing daemons' connections are dropped (or answered with Goodbye
//! and the request sent again) without one request failing or one error line, and nothing of
//! one request (body bytes, errors) leaks into the next on a reused connection.
//!
//! The daemon side is observed through /proc: the UNIX sockets in a daemon's fd table are
//! looked up in /proc/net/unix. The group's listener is the one socket there that has the
//! listening flag (`__SO_ACCEPTCON`, 0x10000) and is bound to a path under `<root>/run` (a
//! daemon keeps no other group's socket); the connections a daemon accepted carry the same
//! path (Linux copies the listener's address to every accepted socket) without that flag. So "connections
//! the daemon holds" = sockets in its fd table with a group socket path and no listening flag.
//! Needs root (reading another user's /proc/<pid>/fd; the daemons run as www-data).
//!
//! App: tests/apps/pooling.wsgi.

// A failed unwrap in a test is the test failing, with its message.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::*;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Daemon processes and their sockets
// ---------------------------------------------------------------------------------------------

/// One line of /proc/net/unix.
#[derive(Debug, Clone)]
struct UnixEntry {
    flags: u64,
    state: u32,
    path: String,
}

const SO_ACCEPTCON: u64 = 0x10000;

/// /proc/net/unix by inode.
fn unix_table() -> HashMap<u64, UnixEntry> {
    let text = fs::read_to_string("/proc/net/unix").expect("read /proc/net/unix");
    let mut out = HashMap::new();
    // Num RefCount Protocol Flags Type St Inode [Path]
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(flags), Ok(state), Ok(inode)) = (
            u64::from_str_radix(f[3], 16),
            u32::from_str_radix(f[5], 16),
            f[6].parse::<u64>(),
        ) else {
            continue;
        };
        let path = f.get(7).map(|s| s.to_string()).unwrap_or_default();
        out.insert(inode, UnixEntry { flags, state, path });
    }
    out
}

/// Inodes of the sockets in `pid`'s fd table.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// What a daemon holds of its group's socket.
#[derive(Debug)]
struct DaemonSockets {
    /// Listening sockets bound to a group socket path (the group's listener: 1).
    listeners: usize,
    /// Other sockets with a group socket path: the worker connections it accepted and has
    /// not closed (idle, busy, or half-closed by the worker alike).
    connections: usize,
    /// Each of them, for the failure message.
    detail: Vec<String>,
}

/// The sockets of `pid` that belong to its group's socket (see the file comment): the
/// listener is the listening socket in its fd table bound under `server.run_dir()` (the path
/// as bound, which may differ from the socket file's final name, e.g. by a `.new` suffix if
/// the socket was bound under a temporary name and renamed); the connections are the other
/// sockets in its fd table with exactly that path.
fn daemon_sockets(server: &TestServer, pid: u32) -> DaemonSockets {
    let run_dir = server.run_dir().to_string_lossy().into_owned();
    let table = unix_table();
    let mine: Vec<(u64, UnixEntry)> = socket_inodes(pid)
        .into_iter()
        .filter_map(|inode| table.get(&inode).map(|e| (inode, e.clone())))
        .collect();
    let listener_paths: BTreeSet<String> = mine
        .iter()
        .filter(|(_, e)| e.flags & SO_ACCEPTCON != 0 && e.path.starts_with(&run_dir))
        .map(|(_, e)| e.path.clone())
        .collect();
    let mut out = DaemonSockets {
        listeners: 0,
        connections: 0,
        detail: Vec::new(),
    };
    for (inode, entry) in &mine {
        if !listener_paths.contains(&entry.path) {
            continue;
        }
        if entry.flags & SO_ACCEPTCON != 0 {
            out.listeners += 1;
            out.detail
                .push(format!("listener inode {inode} {}", entry.path));
        } else {
            out.connections += 1;
            out.detail.push(format!(
                "connection inode {inode} state {:02} {}",
                entry.state, entry.path
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The error log
// ---------------------------------------------------------------------------------------------

/// `[date] [module:level] …` → (module, level).
fn module_and_level(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('[')?;
    let rest = &rest[rest.find("] [")? + 3..];
    let tag = &rest[..rest.find(']')?];
    tag.split_once(':')
}

/// Lines at level error or more severe that come from the module (its `[wsgi:…]` lines, or
/// any line with a WSGIRS id), and only those that concern a request (`[client …]`) when
/// `client_only`.
fn wsgi_error_lines(log: &str, client_only: bool) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let Some((module, level)) = module_and_level(l) else {
                return false;
            };
            matches!(level, "error" | "crit" | "alert" | "emerg")
                && (module == "wsgi" || l.contains("WSGIRS"))
                && (!client_only || l.contains("[client "))
        })
        .map(str::to_string)
        .collect()
}

/// Panics with the log when the module logged an error-level line since `offset`.
fn assert_no_wsgi_errors(server: &TestServer, offset: usize, what: &str) {
    let since = server.error_log_since(offset);
    let errors = wsgi_error_lines(&since, false);
    assert!(
        errors.is_empty(),
        "{what}: the module logged {} error-level line(s):\n{}\n--- error_log ---\n{}",
        errors.len(),
        errors.join("\n"),
        server.error_log()
    );
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// A client: a fresh TCP connection per request, or one keep-alive connection (reopened when
/// the server closed it after a response that said `Connection: close`).
enum Client {
    Fresh,
    Keep(Option<KeepAlive>),
}

impl Client {
    fn keep() -> Client {
        Client::Keep(None)
    }

    fn request(
        &mut self,
        server_addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, String> {
        match self {
            Client::Fresh => http_request(server_addr, method, path, headers, body)
                .map_err(|e| format!("{method} {path} (fresh connection): {e}")),
            Client::Keep(slot) => {
                let reused = slot.is_some();
                if slot.is_none() {
                    *slot = Some(
                        KeepAlive::connect(server_addr)
                            .map_err(|e| format!("connect {server_addr}: {e}"))?,
                    );
                }
                let ka = slot.as_mut().unwrap();
                match ka.request(method, path, headers, body) {
                    Ok(r) => {
                        if r.header("connection")
                            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                        {
                            *slot = None;
                        }
                        Ok(r)
                    }
                    Err(e) => {
                        *slot = None;
                        Err(format!(
                            "{method} {path} (keep-alive connection, {}): {e}",
                            if reused { "reused" } else { "new" }
                        ))
                    }
                }
            }
        }
    }
}

/// Whether `error` (from `Client::request`) is the server closing a reused keep-alive
/// connection before it answered. HTTP lets a server close an idle connection at any moment,
/// and clients send a request that got no answer once more (RFC 9112 §9.3.1 allows it for
/// idempotent ones; these tests' POSTs can be repeated too). Apache does this with no log line
/// above trace1: on a graceful restart, and in mpm_event whenever a kept connection's next
/// request finds no idle worker thread (it then closes every kept connection of the child),
/// which a burst of requests answered together can cause. The module itself always answers
/// with a status line; a crashed Apache child would look the same, so the tests that retry
/// also check that no child crashed (`assert_no_child_crashed`).
fn server_closed_kept_connection(error: &str) -> bool {
    error.contains("(keep-alive connection, reused)")
        && (error.contains("connection closed before any response")
            || error.contains("during send request"))
}

/// Runs `send` with `client`, and once more (on a new connection) when the server had closed
/// the reused keep-alive connection before answering, as HTTP clients do; the bool says
/// whether it had to.
fn retry_if_server_closed<T>(
    client: &mut Client,
    mut send: impl FnMut(&mut Client) -> Result<T, String>,
) -> (Result<T, String>, bool) {
    match send(client) {
        Err(e) if server_closed_kept_connection(&e) => (
            send(client).map_err(|retry| format!("{retry} (retried after: {e})")),
            true,
        ),
        result => (result, false),
    }
}

/// Fails if the error log says an Apache child (or a daemon) died of a signal, or a panic:
/// what a retried request (see `retry_if_server_closed`) could otherwise hide.
fn assert_no_child_crashed(log: &str) {
    let crashes: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("exit signal") || line.contains("panicked"))
        .collect();
    assert!(
        crashes.is_empty(),
        "a process crashed:\n{}\n--- error_log ---\n{log}",
        crashes.join("\n")
    );
}

/// A 200 with pooling.wsgi's JSON, else Err with what came.
fn ok_json(r: &Response, what: &str) -> Result<Json, String> {
    if r.status != 200 {
        return Err(format!("{what}: status {} {:?}", r.status, r.text()));
    }
    Json::parse(&r.text()).map_err(|e| format!("{what}: not JSON ({e}): {:?}", r.text()))
}

/// The expected (len, crc) when the app reads at most `limit` bytes of
/// `Pattern::to_vec(seed, len)`.
fn expected_read(seed: u64, len: u64, limit: Option<u64>) -> (u64, u32) {
    let body = Pattern::to_vec(seed, len);
    let n = limit.map_or(body.len(), |l| (l as usize).min(body.len()));
    (n as u64, crc32(&body[..n]))
}

/// Checks pooling.wsgi's /body answer against what it should have read; the daemon's pid.
fn check_body_reply(
    r: &Response,
    what: &str,
    seed: u64,
    len: u64,
    limit: Option<u64>,
) -> Result<u64, String> {
    let j = ok_json(r, what)?;
    let (want_len, want_crc) = expected_read(seed, len, limit);
    let got_len = j["len"].as_u64();
    let got_crc = j["crc"].as_u64();
    if got_len != Some(want_len) || got_crc != Some(u64::from(want_crc)) {
        return Err(format!(
            "{what}: the app read len={got_len:?} crc={got_crc:?}, expected len={want_len} \
             crc={want_crc} (body of {len} bytes, seed {seed}, limit {limit:?})"
        ));
    }
    j["pid"].as_u64().ok_or_else(|| format!("{what}: no pid"))
}

/// Request number `i` of a mixed load under `prefix` (`/p`): even → GET /info, odd → POST
/// /body?read=all with a body of its own (a seed and a length from `i`). The daemon's pid.
fn mixed_request(
    client: &mut Client,
    addr: std::net::SocketAddr,
    prefix: &str,
    i: u64,
) -> Result<u64, String> {
    if i % 2 == 0 {
        let path = format!("{prefix}/info");
        let r = client.request(addr, "GET", &path, &[], b"")?;
        let j = ok_json(&r, &format!("GET {path} #{i}"))?;
        if j["method"].as_str() != Some("GET") {
            return Err(format!("GET {path} #{i}: the app saw {j:?}"));
        }
        j["pid"].as_u64().ok_or_else(|| format!("GET #{i}: no pid"))
    } else {
        let seed = 1000 + i;
        let len = 1 + (i * 7919) % 40_000;
        let body = Pattern::to_vec(seed, len);
        let path = format!("{prefix}/body?read=all");
        let r = client.request(addr, "POST", &path, &[], &body)?;
        check_body_reply(&r, &format!("POST {path} #{i}"), seed, len, None)
    }
}

/// `n` clients in parallel, each running `per_client` mixed requests (request numbers unique
/// across clients, starting at `first`); client c uses keep-alive when `c % 2 == 0`. Returns
/// (pids seen, failures).
fn parallel_mixed(
    server: &TestServer,
    prefix: &str,
    n: u64,
    per_client: u64,
    first: u64,
) -> (Vec<u64>, Vec<String>) {
    let addr = server.addr();
    thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|c| {
                s.spawn(move || {
                    let mut client = if c % 2 == 0 {
                        Client::keep()
                    } else {
                        Client::Fresh
                    };
                    let mut pids = Vec::new();
                    let mut failures = Vec::new();
                    for k in 0..per_client {
                        match mixed_request(&mut client, addr, prefix, first + c * per_client + k) {
                            Ok(pid) => pids.push(pid),
                            Err(e) => failures.push(e),
                        }
                    }
                    (pids, failures)
                })
            })
            .collect();
        let mut pids = Vec::new();
        let mut failures = Vec::new();
        for h in handles {
            let (p, f) = h.join().unwrap();
            pids.extend(p);
            failures.extend(f);
        }
        (pids, failures)
    })
}

fn info_pid(server: &TestServer, path: &str) -> u64 {
    let r = server.get(path);
    ok_json(&r, path)
        .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log()))
        .u64_of("pid")
}

// ---------------------------------------------------------------------------------------------
// 1. Reuse
// ---------------------------------------------------------------------------------------------

/// 60 sequential requests on one keep-alive client connection and 10 on fresh ones, all to a
/// one-process group: afterwards the daemon still holds at least one accepted connection (an
/// idle one, parked for the next request) and no more than a handful. With one connection
/// per request it would hold none.
#[test]
fn idle_connections_are_reused() {
    let _turn = shared();
    require_root!();
    let server = TestServer::start(
        "WSGIDaemonProcess reuse processes=1 threads=4\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=reuse\n",
    );
    let offset = server.error_log().len();
    let addr = server.addr();
    let mut pids = BTreeSet::new();
    let mut ka = Client::keep();
    for i in 0..60 {
        pids.insert(
            mixed_request(&mut ka, addr, "/p", i)
                .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log())),
        );
    }
    let mut fresh = Client::Fresh;
    for i in 60..70 {
        pids.insert(
            mixed_request(&mut fresh, addr, "/p", i)
                .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log())),
        );
    }
    assert_eq!(pids.len(), 1, "one daemon process expected: {pids:?}");
    let pid = *pids.iter().next().unwrap() as u32;
    assert_eq!(live_daemons(&server, "reuse"), vec![pid]);

    // Let the last connection settle (parked, or closed).
    thread::sleep(Duration::from_millis(300));
    let sockets = daemon_sockets(&server, pid);
    assert_eq!(
        sockets.listeners, 1,
        "the group's listener was not found among daemon {pid}'s sockets (the method of \
         counting is broken): {sockets:?}"
    );
    assert!(
        sockets.connections >= 1,
        "daemon {pid} holds no worker connection after 70 requests: connections are not kept \
         for reuse: {sockets:?}"
    );
    assert!(
        sockets.connections <= 8,
        "daemon {pid} holds {} worker connections after 70 sequential requests (expected a \
         handful at most): {sockets:?}",
        sockets.connections
    );

    // More of the same neither grows the set nor changes the process.
    for i in 70..100 {
        pids.insert(
            mixed_request(&mut ka, addr, "/p", i)
                .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log())),
        );
    }
    assert_eq!(pids.len(), 1, "the daemon changed: {pids:?}");
    thread::sleep(Duration::from_millis(300));
    let again = daemon_sockets(&server, pid);
    assert!(
        (1..=8).contains(&again.connections),
        "after 30 more requests daemon {pid} holds {} connections: {again:?}",
        again.connections
    );
    assert_no_wsgi_errors(&server, offset, "sequential requests");
}

// ---------------------------------------------------------------------------------------------
// 2. maximum-requests
// ---------------------------------------------------------------------------------------------

/// maximum-requests=5 recycles the only daemon every few requests, each time with idle
/// connections parked in it: 30 sequential requests on one keep-alive client connection and
/// 32 from 4 concurrent clients, GET and POST alternating, all 200 with the right content;
/// at least 6 different daemon pids; no error-level line from the module.
#[test]
fn maximum_requests_restarts_lose_no_request() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess maxreq processes=1 threads=2 maximum-requests=5\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=maxreq\n",
    );
    let offset = server.error_log().len();
    let addr = server.addr();
    let mut pids = BTreeSet::new();
    let mut failures = Vec::new();
    let mut ka = Client::keep();
    for i in 0..30 {
        match mixed_request(&mut ka, addr, "/p", i) {
            Ok(pid) => {
                pids.insert(pid);
            }
            Err(e) => failures.push(e),
        }
    }
    let (more, failed) = parallel_mixed(&server, "/p", 4, 8, 100);
    pids.extend(more);
    failures.extend(failed);
    assert!(
        failures.is_empty(),
        "{} of 62 requests failed:\n{}\n--- error_log ---\n{}",
        failures.len(),
        failures.join("\n"),
        server.error_log()
    );
    assert!(
        pids.len() >= 6,
        "maximum-requests=5 over 62 requests should have recycled the daemon at least 5 times; \
         pids seen: {pids:?}\n{}",
        server.error_log()
    );
    server.expect_log("maximum-requests reached", WAIT);
    // Let the last recycle finish before reading the log.
    thread::sleep(Duration::from_millis(500));
    assert_no_wsgi_errors(&server, offset, "maximum-requests recycling");
}

/// 16 keep-alive clients, each sending GET /p/info in a loop for 4 s to a group of
/// `processes` processes with threads=2 and maximum-requests=10: more than the processes'
/// threads and queues hold, so new connections to the group's socket keep coming. Checks
/// that no request failed; returns the pids seen, the number of requests, the slowest
/// request and the error log.
fn steady_recycling(processes: u32) -> (BTreeSet<u64>, u64, Duration, String) {
    let server = TestServer::start(&format!(
        "LogLevel wsgi_module:info\n\
         WSGIDaemonProcess steady processes={processes} threads=2 maximum-requests=10\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=steady\n"
    ));
    let offset = server.error_log().len();
    let addr = server.addr();
    let until = Instant::now() + Duration::from_secs(4);
    let (pids, failures, count, slowest, races) = thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(move || {
                    let mut client = Client::keep();
                    let mut pids = BTreeSet::new();
                    let mut failures = Vec::new();
                    let mut k = 0u64;
                    let mut slowest = Duration::ZERO;
                    let mut races = 0u64;
                    while Instant::now() < until {
                        let started = Instant::now();
                        let (r, raced) = retry_if_server_closed(&mut client, |client| {
                            let r = client.request(addr, "GET", "/p/info", &[], b"")?;
                            let j = ok_json(&r, "GET /p/info")?;
                            j["pid"].as_u64().ok_or_else(|| "no pid".to_string())
                        });
                        races += u64::from(raced);
                        match r {
                            Ok(pid) => {
                                pids.insert(pid);
                            }
                            Err(e) => failures.push(e),
                        }
                        slowest = slowest.max(started.elapsed());
                        k += 1;
                    }
                    (pids, failures, k, slowest, races)
                })
            })
            .collect();
        let mut pids = BTreeSet::new();
        let mut failures = Vec::new();
        let mut count = 0;
        let mut slowest = Duration::ZERO;
        let mut races = 0;
        for h in handles {
            let (p, f, k, slow, r) = h.join().unwrap();
            pids.extend(p);
            failures.extend(f);
            count += k;
            slowest = slowest.max(slow);
            races += r;
        }
        (pids, failures, count, slowest, races)
    });
    eprintln!(
        "processes={processes}: {count} requests, slowest {slowest:?}, {races} sent again after \
         Apache closed their kept connection, pids {pids:?}"
    );
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed:\n{}\n--- error_log ---\n{}",
        failures.len(),
        failures.join("\n"),
        server.error_log()
    );
    thread::sleep(Duration::from_millis(500));
    assert_no_wsgi_errors(&server, offset, "maximum-requests under steady load");
    assert_no_child_crashed(&server.error_log());
    (pids, count, slowest, server.error_log())
}

/// Under steady load, maximum-requests=10 still recycles a one-process group again and again
/// (about once a second: Apache's parent reaps and replaces daemons once a second), and no
/// request fails. A stopping daemon must not take the new connections that keep arriving on
/// the group's socket (the socket stays with Apache; the replacement takes them), or it never
/// stops.
#[test]
fn maximum_requests_recycles_under_steady_load() {
    let _turn = shared();
    let (pids, count, _, log) = steady_recycling(1);
    assert!(
        pids.len() >= 3,
        "maximum-requests=10 over {count} requests in 4 s should have replaced the process at \
         least twice; pids seen: {pids:?}\n{log}"
    );
}

/// The processes of a group reach maximum-requests together under balanced load, but restart
/// one at a time: the error log never shows a process starting its restart before the one
/// restarting before it is back, and so no request waits long (with both down, requests would
/// wait for Apache's once-a-second replacement, as with processes=1: 2 to 3 s).
#[test]
fn processes_of_a_group_recycle_one_at_a_time() {
    let _turn = shared();
    let (pids, count, slowest, log) = steady_recycling(2);
    assert!(
        pids.len() >= 4,
        "maximum-requests=10 over {count} requests in 4 s should have replaced the processes \
         at least twice; pids seen: {pids:?}\n{log}"
    );
    let (restarts, overlaps) = overlapping_restarts(&log, "steady");
    assert!(
        restarts >= 2,
        "{restarts} restart lines in the error log\n{log}"
    );
    assert!(
        overlaps.is_empty(),
        "two processes of the group were down at once:\n{}\n--- error_log ---\n{log}",
        overlaps.join("\n")
    );
    // Coarse, so that a loaded machine does not fail it: a request that waited this long
    // waited for a replacement.
    assert!(
        slowest < Duration::from_millis(1500),
        "a request waited {slowest:?}: both processes were down at once?\n{log}"
    );
}

/// How many processes of `group` the error log shows restarting, and the lines where one
/// began to restart while another was down (or that name no pid). A process is down from its
/// "Restarting daemon process gracefully" line (WSGIRS0443) to its replacement's "Starting
/// process" line (WSGIRS0433): the first process started after Apache's "exited to restart"
/// line for it (WSGIRS0423). Lines from different processes are in the order they were
/// written (one file, appended to). Needs LogLevel info for the module.
fn overlapping_restarts(log: &str, group: &str) -> (usize, Vec<String>) {
    let number_after = |line: &str, marker: &str| -> Option<u32> {
        let rest = line.split(marker).nth(1)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let restarting = format!("WSGIRS0443: [{group}] ");
    let exited = format!("WSGIRS0423: Process '{group}' (pid ");
    let starting = format!("WSGIRS0433: Starting process '{group}' ");
    let mut down: Vec<u32> = Vec::new();
    let mut awaiting_replacement = std::collections::VecDeque::new();
    let mut overlaps = Vec::new();
    let mut restarts = 0;
    for line in log.lines() {
        if line.contains(&restarting) {
            restarts += 1;
            if !down.is_empty() {
                overlaps.push(format!("{line}\n  while pid(s) {down:?} were not back yet"));
            }
            match number_after(line, "[pid ") {
                Some(pid) => down.push(pid),
                None => overlaps.push(format!("{line}\n  (no pid in this restart line)")),
            }
        } else if line.contains(&exited) {
            awaiting_replacement.extend(number_after(line, &exited));
        } else if line.contains(&starting) {
            if let Some(gone) = awaiting_replacement.pop_front() {
                down.retain(|&pid| pid != gone);
            }
        }
    }
    (restarts, overlaps)
}

/// The parser above, on lines shaped as the module writes them: a second restart that waits
/// for the first one's replacement passes, one that does not is reported.
#[test]
fn overlapping_restarts_reads_the_error_log() {
    let line = |pid: u32, text: &str| {
        format!("[Wed Nov 25 04:08:29.1 2026] [wsgi:info] [pid {pid}:tid {pid}] {text}\n")
    };
    let restart = |pid| {
        line(
            pid,
            "WSGIRS0443: [g] Restarting daemon process gracefully: maximum-requests reached \
             (10 requests served).",
        )
    };
    let exited = |pid| {
        line(
            1,
            &format!("WSGIRS0423: Process 'g' (pid {pid}) exited to restart; starting a new one."),
        )
    };
    let start = |pid| {
        line(
            pid,
            "WSGIRS0433: Starting process 'g' with uid=33, gid=33 and threads=2.",
        )
    };
    let in_turn = [
        start(10),
        start(11),
        restart(10),
        exited(10),
        start(12),
        restart(11),
        exited(11),
        start(13),
    ]
    .concat();
    assert_eq!(overlapping_restarts(&in_turn, "g"), (2, vec![]));
    let together = [
        start(10),
        start(11),
        restart(10),
        restart(11),
        exited(10),
        start(12),
    ]
    .concat();
    let (restarts, overlaps) = overlapping_restarts(&together, "g");
    assert_eq!(restarts, 2);
    assert_eq!(overlaps.len(), 1, "{overlaps:?}");
    assert!(
        overlaps[0].contains("[pid 11:") && overlaps[0].contains("[10]"),
        "{overlaps:?}"
    );
    assert_eq!(overlapping_restarts(&together, "other"), (0, vec![]));
    let (_, unreadable) = overlapping_restarts(&restart(10).replace("[pid 10:", "[pid ?:"), "g");
    assert_eq!(
        unreadable.len(),
        1,
        "a restart line without a pid is reported"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A busy process is passed over
// ---------------------------------------------------------------------------------------------

/// processes=2 threads=1, with idle connections to both processes: while one process is busy
/// with a 4 s request, 10 quick requests in a row each finish in well under a second, served
/// by the other process.
///
/// The pool is prepared so that reusing idle connections without looking at the daemons'
/// busy counts would fail: while process P1 is busy with a first slow request (whose
/// connection is not reusable: the app raises after its headers), two overlapping requests give
/// the worker two connections to the other process P2, which end on top of the idle list.
/// The 4 s request then takes one of them (P2 is busy), and the most recently returned idle
/// connection left also leads to P2. One Apache child only (MinSpareThreads 1), so every
/// request sees the same pool.
#[test]
fn busy_process_is_skipped() {
    let _turn = alone();
    let server = TestServer::start(
        "MinSpareThreads 1\n\
         WSGIDaemonProcess two processes=2 threads=1\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=two\n",
    );
    let addr = server.addr();
    let overlapping_pair = |path: &str| -> Vec<u64> {
        let pair: Vec<Result<Response, HttpError>> = thread::scope(|s| {
            let a = s.spawn(|| http_request(addr, "GET", path, &[], b""));
            thread::sleep(Duration::from_millis(50));
            let b = s.spawn(|| http_request(addr, "GET", path, &[], b""));
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        pair.into_iter()
            .map(|r| {
                let r = r.unwrap_or_else(|e| panic!("{path}: {e}\n{}", server.error_log()));
                ok_json(&r, path).unwrap().u64_of("pid")
            })
            .collect()
    };
    // Warm up: overlapping requests need both processes (one thread each), so both end up
    // with idle connections.
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        seen.extend(overlapping_pair("/p/sleep?secs=0.3"));
    }
    for _ in 0..4 {
        seen.insert(info_pid(&server, "/p/info"));
    }
    assert_eq!(
        seen.len(),
        2,
        "the warm-up should have used both processes: {seen:?}"
    );

    let scratch = ScratchDir::new("busy");
    let slow = |secs: u32, mark: &str, fail: bool| {
        let path = format!(
            "/p/sleep?secs={secs}&mark={}&fail={}",
            scratch.join(mark).display(),
            u8::from(fail)
        );
        let handle = thread::spawn(move || {
            let started = Instant::now();
            let r = http_request(addr, "GET", &path, &[], b"");
            (r, started.elapsed())
        });
        let pid: u64 = scratch
            .wait_for_file(mark, WAIT)
            .unwrap_or_else(|| panic!("the slow request never started\n{}", server.error_log()))
            .trim()
            .parse()
            .unwrap();
        (handle, pid)
    };

    // P1 busy; two overlapping requests to P2.
    let (first_slow, p1) = slow(2, "first-slow-pid", true);
    let p2_pair = overlapping_pair("/p/sleep?secs=0.3");
    assert!(
        p2_pair.iter().all(|&p| p != p1 && seen.contains(&p)),
        "requests sent while {p1} was busy went to {p2_pair:?}\n{}",
        server.error_log()
    );
    // (It ends in an app error after the headers: what the client gets is not checked.)
    let _ = first_slow.join().unwrap();

    // The 4 s request, then the quick ones.
    let (slow_handle, slow_pid) = slow(4, "slow-pid", false);
    assert!(seen.contains(&slow_pid), "{slow_pid} not in {seen:?}");
    let mut ka = Client::keep();
    let mut fresh = Client::Fresh;
    let mut report = Vec::new();
    for i in 0..10 {
        let client = if i % 2 == 0 { &mut ka } else { &mut fresh };
        let started = Instant::now();
        let r = client
            .request(addr, "GET", "/p/info", &[], b"")
            .unwrap_or_else(|e| panic!("quick request {i}: {e}\n{}", server.error_log()));
        let took = started.elapsed();
        let pid = ok_json(&r, "quick request").unwrap().u64_of("pid");
        report.push(format!("#{i}: pid {pid} in {took:?}"));
        assert!(
            took < Duration::from_millis(1000) && pid != slow_pid,
            "quick request {i} waited for the busy process {slow_pid} (or took too long) \
             while the other process was idle:\n{}",
            report.join("\n")
        );
    }
    eprintln!(
        "busy_process_is_skipped: first slow on {p1}, overlapping pair on {p2_pair:?}, \
         4 s request on {slow_pid}; quick requests:\n{}",
        report.join("\n")
    );
    assert!(
        !slow_handle.is_finished(),
        "the slow request ended before the quick ones did: the test proved nothing"
    );
    let (r, took) = slow_handle.join().unwrap();
    let r = r.unwrap_or_else(|e| panic!("slow request: {e}\n{}", server.error_log()));
    assert_eq!(ok_json(&r, "slow request").unwrap().u64_of("pid"), slow_pid);
    assert!(took >= Duration::from_secs(4), "{took:?}");
}

/// processes=2 threads=1, both busy (P1 for 4 s, P2 for 0.8 s), with idle connections to
/// both in the one Apache child: two quick requests sent then wait in the processes' queues,
/// one each, over those kept connections, and the one that waits behind P1's long request is
/// taken back and sent to P2 as soon as P2 is free. Both finish long before the 4 s request,
/// served by P2. (Without the taking back, one would wait for the 4 s request.)
#[test]
fn a_saturated_group_queues_over_kept_connections_and_never_behind_a_long_request() {
    let _turn = alone();
    require_root!();
    let server = TestServer::start(
        "MinSpareThreads 1\n\
         WSGIDaemonProcess two processes=2 threads=1\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=two\n",
    );
    let addr = server.addr();
    let offset = server.error_log().len();
    // Warm up: four overlapping requests need both processes and their queues, so the child
    // ends up with idle connections to both (two to each, as a rule).
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let round: Vec<u64> = thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 30 }));
                    s.spawn(|| http_request(addr, "GET", "/p/sleep?secs=0.3", &[], b""))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    let r = h
                        .join()
                        .unwrap()
                        .unwrap_or_else(|e| panic!("warm-up: {e}\n{}", server.error_log()));
                    ok_json(&r, "warm-up").unwrap().u64_of("pid")
                })
                .collect()
        });
        seen.extend(round);
    }
    assert_eq!(
        seen.len(),
        2,
        "the warm-up should have used both processes: {seen:?}"
    );
    thread::sleep(Duration::from_millis(200));
    let connections = |pids: &BTreeSet<u64>| -> Vec<usize> {
        pids.iter()
            .map(|&pid| daemon_sockets(&server, pid as u32).connections)
            .collect()
    };
    let before = connections(&seen);

    let scratch = ScratchDir::new("queued");
    let slow = |secs: f64, mark: &str| {
        let path = format!("/p/sleep?secs={secs}&mark={}", scratch.join(mark).display());
        let handle = thread::spawn(move || {
            let started = Instant::now();
            (
                http_request(addr, "GET", &path, &[], b""),
                started.elapsed(),
            )
        });
        let pid: u64 = scratch
            .wait_for_file(mark, WAIT)
            .unwrap_or_else(|| panic!("{mark} never started\n{}", server.error_log()))
            .trim()
            .parse()
            .unwrap();
        (handle, pid)
    };
    let (long, long_pid) = slow(4.0, "long-pid");
    let (medium, medium_pid) = slow(0.8, "medium-pid");
    assert_ne!(
        long_pid, medium_pid,
        "the second sleep should have found the free process"
    );

    let quick: Vec<(u64, Duration)> = thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let path = format!(
                    "/p/sleep?secs=0&mark={}",
                    scratch.join(&format!("quick-{i}")).display()
                );
                let server = &server;
                s.spawn(move || {
                    let started = Instant::now();
                    let r = http_request(addr, "GET", &path, &[], b"")
                        .unwrap_or_else(|e| panic!("quick: {e}\n{}", server.error_log()));
                    (
                        ok_json(&r, "quick").unwrap().u64_of("pid"),
                        started.elapsed(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("long on {long_pid}, medium on {medium_pid}, quick: {quick:?}");
    for (pid, took) in &quick {
        assert!(
            *pid == medium_pid && *took < Duration::from_millis(2500),
            "a quick request waited behind the long request on {long_pid}: {quick:?}"
        );
    }
    assert!(
        !long.is_finished(),
        "the long request ended before the quick ones: the test proved nothing"
    );
    let after = connections(&seen);
    eprintln!("daemon connections (pids {seen:?}) before: {before:?}, after: {after:?}");
    if before.iter().all(|&n| n >= 2) {
        // Two kept connections to each process: one for the long or medium request, one for
        // a quick request to wait on.
        assert_eq!(
            after, before,
            "the quick requests should have waited over kept connections, not new ones"
        );
    }
    let (r, took) = medium.join().unwrap();
    r.unwrap_or_else(|e| panic!("medium: {e}\n{}", server.error_log()));
    assert!(took >= Duration::from_millis(800));
    let (r, took) = long.join().unwrap();
    let r = r.unwrap_or_else(|e| panic!("long: {e}\n{}", server.error_log()));
    assert_eq!(ok_json(&r, "long").unwrap().u64_of("pid"), long_pid);
    assert!(took >= Duration::from_secs(4), "{took:?}");
    // The long request's process, free again, found the withdrawn request and discarded it:
    // each quick request ran once, where it was answered.
    thread::sleep(Duration::from_millis(300));
    for i in 0..2 {
        let ran_on = scratch
            .wait_for_file(&format!("quick-{i}"), WAIT)
            .unwrap_or_default();
        assert_eq!(
            ran_on.trim(),
            medium_pid.to_string(),
            "quick request {i} ran again on {long_pid}"
        );
    }
    assert_no_wsgi_errors(&server, offset, "queued requests");
}

// ---------------------------------------------------------------------------------------------
// 4. Killed daemons
// ---------------------------------------------------------------------------------------------

/// Idle connections to daemons that were SIGKILLed are found dead and dropped: once the
/// replacements serve, 30 requests (GET and POST, concurrent, fresh and keep-alive client
/// connections) all succeed, and no request-level error is logged.
#[test]
fn killed_daemon_idle_connections_are_dropped() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess victim processes=2 threads=2\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=victim\n",
    );
    let (_, failures) = parallel_mixed(&server, "/p", 4, 5, 0);
    assert!(failures.is_empty(), "warm-up: {failures:?}");
    let mut victims = Vec::new();
    assert!(
        wait_until(WAIT, || {
            victims = live_daemons(&server, "victim");
            victims.len() == 2
        }),
        "two daemons expected: {victims:?}\n{}",
        server.error_log()
    );
    for &pid in &victims {
        kill9(pid);
    }
    // The replacements: two new live daemons, and a request served by one of them.
    let killed: HashSet<u64> = victims.iter().map(|&p| u64::from(p)).collect();
    let up = wait_until(WAIT, || {
        let live = live_daemons(&server, "victim");
        live.len() == 2
            && live.iter().all(|p| !killed.contains(&u64::from(*p)))
            && server
                .try_request("GET", "/p/info", &[], b"")
                .ok()
                .and_then(|r| ok_json(&r, "poll").ok())
                .and_then(|j| j["pid"].as_u64())
                .is_some_and(|p| !killed.contains(&p))
    });
    assert!(
        up,
        "no replacement daemons after the SIGKILL\n{}",
        server.error_log()
    );
    let offset = server.error_log().len();
    let (pids, failures) = parallel_mixed(&server, "/p", 3, 10, 1000);
    assert!(
        failures.is_empty(),
        "{} of 30 requests after the replacement was up failed:\n{}\n--- error_log ---\n{}",
        failures.len(),
        failures.join("\n"),
        server.error_log()
    );
    let stale: Vec<&u64> = pids.iter().filter(|p| killed.contains(p)).collect();
    assert!(stale.is_empty(), "answers from killed daemons?! {stale:?}");
    thread::sleep(Duration::from_millis(300));
    let errors = wsgi_error_lines(&server.error_log_since(offset), true);
    assert!(
        errors.is_empty(),
        "request errors logged after the replacement was up:\n{}\n--- error_log ---\n{}",
        errors.join("\n"),
        server.error_log()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Graceful restart
// ---------------------------------------------------------------------------------------------

/// `apache2 -k graceful` while the pools are warm and 4 clients keep sending GET and POST:
/// not one request fails, no error-level line from the module. Two clients use a fresh TCP
/// connection per request; two use keep-alive connections, and send a request once more when
/// Apache had closed the kept connection before answering (`retry_if_server_closed`; counted
/// apart).
#[test]
fn graceful_restart_with_pooled_connections() {
    let _turn = shared();
    let mut server = TestServer::start(
        "WSGIDaemonProcess grace processes=2 threads=4\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=grace\n",
    );
    let (_, failures) = parallel_mixed(&server, "/p", 4, 10, 0);
    assert!(failures.is_empty(), "warm-up: {failures:?}");
    let offset = server.error_log().len();
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(10_000));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let stop = Arc::clone(&stop);
            let counter = Arc::clone(&counter);
            thread::spawn(move || {
                let mut client = if c % 2 == 0 {
                    Client::keep()
                } else {
                    Client::Fresh
                };
                let (mut ok, mut failures, mut races) = (0u64, Vec::new(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let (result, raced) = retry_if_server_closed(&mut client, |client| {
                        mixed_request(client, addr, "/p", i)
                    });
                    races += u64::from(raced);
                    match result {
                        Ok(_) => ok += 1,
                        Err(e) => failures.push(e),
                    }
                }
                (ok, failures, races)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(800));
    server.graceful();
    thread::sleep(Duration::from_millis(2000));
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failures, mut races) = (0u64, Vec::new(), 0u64);
    for c in clients {
        let (o, f, r) = c.join().unwrap();
        ok += o;
        failures.extend(f);
        races += r;
    }
    eprintln!(
        "graceful with pooled connections: {ok} requests ok, {} failed, {races} keep-alive \
         close races retried",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} requests failed across the graceful restart:\n{}\n--- error_log ---\n{}",
        failures.len(),
        failures.join("\n"),
        server.error_log()
    );
    assert!(ok >= 50, "too little load to mean anything: {ok}");
    assert_no_child_crashed(&server.error_log());
    // The restarted daemons serve.
    assert!(
        parallel_mixed(&server, "/p", 2, 5, 50_000).1.is_empty(),
        "requests after the graceful restart failed\n{}",
        server.error_log()
    );
    thread::sleep(Duration::from_millis(300));
    assert_no_wsgi_errors(&server, offset, "graceful restart");
}

// ---------------------------------------------------------------------------------------------
// 6. Request bodies on reused connections
// ---------------------------------------------------------------------------------------------

/// Writes one request with a chunked body (64 KiB chunks) on a keep-alive connection.
fn send_chunked(ka: &mut KeepAlive, path: &str, body: &[u8]) {
    let mut bytes = ka
        .head("POST", path, &[("Transfer-Encoding", "chunked")], 0)
        .into_bytes();
    for piece in body.chunks(65536) {
        bytes.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        bytes.extend_from_slice(piece);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    ka.write_raw(&bytes).expect("write chunked request");
}

/// On one keep-alive client connection (so one Apache child, whose daemon connection is
/// reused), POSTs of 0 B to 3 MiB, with Content-Length and chunked, that the app reads whole,
/// not at all, or only partly: what the app read is always exactly the start of its own
/// request's body (length and CRC-32), never a leftover of the previous request's.
#[test]
fn uploads_on_reused_connections_stay_intact() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess uploads processes=1 threads=2\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=uploads\n\
         <Location /p>\n\
             WSGIChunkedRequest On\n\
         </Location>\n",
    );
    let offset = server.error_log().len();
    const K: u64 = 1024;
    const M: u64 = 1024 * 1024;
    // (body length, bytes the app reads (None: all), chunked)
    let cases: &[(u64, Option<u64>, bool)] = &[
        (0, None, false),
        (1, None, false),
        (100 * K, None, false),
        (3 * M, Some(0), false),
        (10, None, false),
        (3 * M, Some(1000), false),
        (100 * K, None, false),
        (100 * K, None, true),
        (1, Some(0), false),
        (3 * M, None, false),
        (100 * K, Some(65537), false),
        (0, None, true),
        (5000, Some(100), true),
        (3 * M, None, true),
        (1, None, false),
        (100 * K, Some(0), true),
        (2, None, false),
        (3 * M, Some(3 * M - 1), false),
        (100 * K, None, true),
        (0, Some(0), false),
        (777, None, false),
        (3 * M, Some(12345), true),
        (64 * K, None, false),
    ];
    // A body mostly left unread, then the next request at once: the worker can send that
    // request while the daemon still reads the answer to its read-ahead (a race once lost
    // about one CI run in four; with these 40 repeats the old build lost it 4 runs out of 4).
    let race = [(3 * M, Some(1000), false), (100 * K, None, false)];
    let cases: Vec<_> = cases.iter().chain(race.iter().cycle().take(80)).collect();
    let mut ka = server.connect();
    let mut pids = BTreeSet::new();
    for (n, &&(len, limit, chunked)) in cases.iter().enumerate() {
        if n % 50 == 49 {
            // Within the client's MaxKeepAliveRequests (100).
            ka = server.connect();
        }
        let seed = 500 + n as u64;
        let body = Pattern::to_vec(seed, len);
        let read = match limit {
            None => "all".to_string(),
            Some(0) => "none".to_string(),
            Some(k) => k.to_string(),
        };
        let path = format!("/p/body?read={read}");
        let what = format!(
            "request #{n}: POST {path} with {len} bytes{}",
            if chunked { " (chunked)" } else { "" }
        );
        if chunked {
            send_chunked(&mut ka, &path, &body);
        } else {
            ka.send("POST", &path, &[], &body)
                .unwrap_or_else(|e| panic!("{what}: send: {e}"));
        }
        let r = ka
            .read_response("POST")
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", server.error_log()));
        assert!(
            !r.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
            "{what}: Apache closed the client connection: {r:?}"
        );
        let pid = check_body_reply(&r, &what, seed, len, limit)
            .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log()));
        pids.insert(pid);
        // A GET with no body in between, on the same connection.
        if n % 4 == 3 {
            let r = ka
                .request("GET", "/p/body?read=all", &[], b"")
                .unwrap_or_else(|e| panic!("GET after {what}: {e}"));
            check_body_reply(&r, &format!("GET after {what}"), 0, 0, None).unwrap();
        }
    }
    assert_eq!(pids.len(), 1, "one daemon process expected: {pids:?}");
    assert_no_wsgi_errors(&server, offset, "uploads");
}

// ---------------------------------------------------------------------------------------------
// 7. wsgi.input kept after the response
// ---------------------------------------------------------------------------------------------

/// An app that keeps every request's wsgi.input in a global list (so it outlives the
/// response, and its connection cannot be reused safely): 20 POSTs, half of each body read,
/// then 20 mixed requests, all 200 with the right content.
#[test]
fn input_kept_after_response_still_works() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess keeper processes=1 threads=2\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=keeper\n",
    );
    let offset = server.error_log().len();
    let addr = server.addr();
    let mut ka = Client::keep();
    let mut fresh = Client::Fresh;
    let mut kept = Vec::new();
    for i in 0..20u64 {
        let client = if i % 3 == 2 { &mut fresh } else { &mut ka };
        let seed = 7000 + i;
        let len = 1000 + 37 * i;
        let body = Pattern::to_vec(seed, len);
        let r = client
            .request(addr, "POST", "/p/keep", &[], &body)
            .unwrap_or_else(|e| panic!("#{i}: {e}\n{}", server.error_log()));
        let what = format!("POST /p/keep #{i}");
        check_body_reply(&r, &what, seed, len, Some(len / 2))
            .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log()));
        kept.push(ok_json(&r, &what).unwrap().u64_of("kept"));
    }
    assert!(
        kept.windows(2).all(|w| w[1] == w[0] + 1),
        "the app's list of kept inputs should grow by one per request: {kept:?}"
    );
    for i in 0..20 {
        let client = if i % 2 == 0 { &mut ka } else { &mut fresh };
        mixed_request(client, addr, "/p", 100 + i)
            .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log()));
    }
    assert_no_wsgi_errors(&server, offset, "kept wsgi.input");
}

// ---------------------------------------------------------------------------------------------
// 8. Apache children that exit
// ---------------------------------------------------------------------------------------------

/// MaxConnectionsPerChild 4 makes Apache replace its children every few connections, each
/// leaving idle connections parked in the daemon: 40 requests on fresh client connections all
/// succeed, the children did turn over, no error-level line, and the daemon closes the
/// connections of the children that left (it holds no more than a few afterwards).
#[test]
fn apache_child_exit_closes_parked_connections_quietly() {
    let _turn = shared();
    require_root!();
    let server = TestServer::start(
        "MaxConnectionsPerChild 4\n\
         WSGIDaemonProcess parked processes=1 threads=4\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=parked\n",
    );
    let offset = server.error_log().len();
    let addr = server.addr();
    let mut pids = BTreeSet::new();
    let mut fresh = Client::Fresh;
    for i in 0..40 {
        pids.insert(
            mixed_request(&mut fresh, addr, "/p", i)
                .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log())),
        );
    }
    assert_eq!(pids.len(), 1, "one daemon process expected: {pids:?}");
    let pid = *pids.iter().next().unwrap() as u32;
    let children: BTreeSet<String> = server
        .access_log()
        .lines()
        .filter(|l| l.contains("/p/"))
        .filter_map(|l| l.rsplit("pid=").next().map(|s| s.trim().to_string()))
        .collect();
    assert!(
        children.len() >= 5,
        "MaxConnectionsPerChild 4 over 40 connections should have used several Apache \
         children: {children:?}"
    );
    let mut sockets = daemon_sockets(&server, pid);
    let settled = wait_until(Duration::from_secs(5), || {
        sockets = daemon_sockets(&server, pid);
        sockets.connections <= 4
    });
    assert_eq!(sockets.listeners, 1, "{sockets:?}");
    assert!(
        settled,
        "daemon {pid} still holds {} connections after {} Apache children came and went: \
         connections of exited children are not closed: {sockets:?}",
        sockets.connections,
        children.len()
    );
    assert_no_wsgi_errors(&server, offset, "Apache children exiting");
}

// ---------------------------------------------------------------------------------------------
// More: groups, errors mid-request, restarts while idle, script reload
// ---------------------------------------------------------------------------------------------

/// Two groups used alternately from the same client connection (so from the same Apache
/// child and its pools): every request is served by its own group's process.
#[test]
fn pooled_connections_never_cross_groups() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess ga processes=1 threads=2\n\
         WSGIDaemonProcess gb processes=1 threads=2\n\
         WSGIScriptAlias /a @APPS@/pooling.wsgi process-group=ga\n\
         WSGIScriptAlias /b @APPS@/pooling.wsgi process-group=gb\n",
    );
    let addr = server.addr();
    let mut ka = Client::keep();
    let mut by_group: HashMap<&str, BTreeSet<u64>> = HashMap::new();
    for i in 0..40u64 {
        let (prefix, group) = if i % 3 == 0 {
            ("/b", "gb")
        } else {
            ("/a", "ga")
        };
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let body = if method == "POST" {
            Pattern::to_vec(i, 300)
        } else {
            Vec::new()
        };
        let path = format!("{prefix}/body?read=all");
        let r = ka
            .request(addr, method, &path, &[], &body)
            .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log()));
        let j = ok_json(&r, &path).unwrap();
        assert_eq!(
            j["group"].as_str(),
            Some(group),
            "{method} {path} was served by another group: {j:?}"
        );
        by_group.entry(group).or_default().insert(j.u64_of("pid"));
    }
    let (a, b) = (&by_group["ga"], &by_group["gb"]);
    assert!(
        a.len() == 1 && b.len() == 1 && a != b,
        "each group has its own single process: {by_group:?}"
    );
}

/// Requests that end in an error (an app exception after the headers, one before them, a
/// client that goes away mid-response and one that goes away mid-upload) leave nothing
/// behind on pooled connections: the requests that follow all succeed with the right
/// content, and the daemon does not pile up connections.
#[test]
fn errors_mid_request_do_not_poison_the_pool() {
    let _turn = shared();
    require_root!();
    let server = TestServer::start(
        "WSGIDaemonProcess errs processes=1 threads=4\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=errs\n",
    );
    let addr = server.addr();
    let mut ka = Client::keep();
    let mut n = 0u64;
    let mut good = |ka: &mut Client, server: &TestServer| {
        for _ in 0..3 {
            mixed_request(ka, addr, "/p", n)
                .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log()));
            n += 1;
        }
    };
    for round in 0..3 {
        good(&mut ka, &server);
        // An exception after the headers: the response is cut short (or ends early).
        // (whatever the client sees of it: not checked here)
        let _ = ka.request(addr, "GET", "/p/raise_after_headers", &[], b"");
        good(&mut ka, &server);
        // An exception before the headers: 500.
        let r = ka
            .request(addr, "GET", "/p/raise", &[], b"")
            .unwrap_or_else(|e| panic!("/p/raise: {e}"));
        assert_eq!(r.status, 500, "round {round}: {r:?}");
        good(&mut ka, &server);
        // A client that reads a little of a 16 MiB response, then goes away.
        let mut gone = KeepAlive::connect(addr).unwrap();
        gone.send("GET", "/p/big?n=16777216", &[], b"").unwrap();
        let first = gone.read_some(1000).unwrap();
        assert!(!first.is_empty(), "round {round}: no answer to /p/big");
        gone.abort();
        good(&mut ka, &server);
        // A client that sends half of a 1 MiB body the app reads whole, then goes away.
        let mut gone = KeepAlive::connect(addr).unwrap();
        let body = Pattern::to_vec(round, 512 * 1024);
        let mut bytes = gone
            .head("POST", "/p/body?read=all", &[], 1024 * 1024)
            .into_bytes();
        bytes.extend_from_slice(&body);
        gone.write_raw(&bytes).unwrap();
        thread::sleep(Duration::from_millis(200));
        gone.abort();
        good(&mut ka, &server);
    }
    let (pids, failures) = parallel_mixed(&server, "/p", 4, 5, 10_000);
    assert!(
        failures.is_empty(),
        "after the errors: {failures:?}\n{}",
        server.error_log()
    );
    let pids: BTreeSet<u64> = pids.into_iter().collect();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let pid = *pids.iter().next().unwrap() as u32;
    let mut sockets = daemon_sockets(&server, pid);
    let settled = wait_until(Duration::from_secs(5), || {
        sockets = daemon_sockets(&server, pid);
        sockets.connections <= 8
    });
    assert!(
        settled,
        "daemon {pid} holds {} connections after the failed requests: {sockets:?}",
        sockets.connections
    );
}

/// restart-interval and inactivity-timeout stop a daemon whose idle connections are parked
/// (the restart-interval one under a steady stream of requests, so some requests meet the
/// Goodbye): every request, GET and POST, succeeds; no error-level line.
#[test]
fn restart_interval_and_inactivity_timeout_lose_no_request() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess periodic processes=1 threads=2 restart-interval=1\n\
         WSGIDaemonProcess idle processes=1 threads=2 inactivity-timeout=1\n\
         WSGIScriptAlias /periodic @APPS@/pooling.wsgi process-group=periodic\n\
         WSGIScriptAlias /idle @APPS@/pooling.wsgi process-group=idle\n",
    );
    let offset = server.error_log().len();
    let addr = server.addr();

    // Idle: warm the pool, let the daemon time out, then POST on what the pool has.
    let mut ka = Client::keep();
    let mut idle_pids = BTreeSet::new();
    for round in 0..2u64 {
        for i in 0..6 {
            idle_pids.insert(
                mixed_request(&mut ka, addr, "/idle", round * 100 + i)
                    .unwrap_or_else(|e| panic!("{e}\n{}", server.error_log())),
            );
        }
        thread::sleep(Duration::from_millis(2500));
        idle_pids.insert(
            mixed_request(&mut ka, addr, "/idle", round * 100 + 51).unwrap_or_else(|e| {
                panic!(
                    "POST after the inactivity-timeout: {e}\n{}",
                    server.error_log()
                )
            }),
        );
    }
    assert!(
        idle_pids.len() >= 3,
        "inactivity-timeout=1 should have restarted the daemon twice: {idle_pids:?}\n{}",
        server.error_log()
    );

    // Periodic: a steady stream from 3 clients for 4 s.
    let started = Instant::now();
    let (periodic_pids, failures, count) = thread::scope(|s| {
        let handles: Vec<_> = (0..3u64)
            .map(|c| {
                s.spawn(move || {
                    let mut ka = Client::keep();
                    let mut fresh = Client::Fresh;
                    let (mut pids, mut failures) = (BTreeSet::new(), Vec::new());
                    let mut i = 0u64;
                    while started.elapsed() < Duration::from_secs(4) {
                        let client = if (i + c) % 3 == 0 {
                            &mut fresh
                        } else {
                            &mut ka
                        };
                        match mixed_request(client, addr, "/periodic", 1000 + c * 100_000 + i) {
                            Ok(pid) => {
                                pids.insert(pid);
                            }
                            Err(e) => failures.push(e),
                        }
                        i += 1;
                    }
                    (pids, failures, i)
                })
            })
            .collect();
        let (mut pids, mut failures, mut count) = (BTreeSet::new(), Vec::new(), 0);
        for h in handles {
            let (p, f, n) = h.join().unwrap();
            pids.extend(p);
            failures.extend(f);
            count += n;
        }
        (pids, failures, count)
    });
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed while restart-interval=1 recycled the daemon:\n{}\n\
         --- error_log ---\n{}",
        failures.len(),
        failures.join("\n"),
        server.error_log()
    );
    assert!(
        periodic_pids.len() >= 3,
        "restart-interval=1 over 4 s should have restarted the daemon: {periodic_pids:?}"
    );
    thread::sleep(Duration::from_millis(300));
    assert_no_wsgi_errors(&server, offset, "restart-interval / inactivity-timeout");
}

/// A changed script restarts the daemon (its parked connections get Goodbye) while requests
/// keep coming on pooled connections: every request succeeds, the new code answers, no
/// error-level line.
#[test]
fn script_reload_with_pooled_connections_loses_no_request() {
    let _turn = shared();
    let server = TestServer::start(
        "WSGIDaemonProcess reload processes=1 threads=2\n\
         WSGIScriptAlias /p @APPS@/pooling.wsgi process-group=reload\n",
    );
    let offset = server.error_log().len();
    let addr = server.addr();
    let (_, failures) = parallel_mixed(&server, "/p", 3, 4, 0);
    assert!(failures.is_empty(), "warm-up: {failures:?}");
    let first = info_pid(&server, "/p/info");
    let script = server.apps_dir().join("pooling.wsgi");
    let source = fs::read_to_string(&script).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut ka = Client::keep();
            let mut fresh = Client::Fresh;
            let mut failures = Vec::new();
            let mut i = 100u64;
            while !stop.load(Ordering::Relaxed) {
                let client = if i % 3 == 0 { &mut fresh } else { &mut ka };
                if let Err(e) = mixed_request(client, addr, "/p", i) {
                    failures.push(e);
                }
                i += 1;
            }
            (i - 100, failures)
        })
    };
    // A new mtime, whatever the clock's resolution.
    thread::sleep(Duration::from_millis(1100));
    fs::write(&script, format!("{source}\n# changed\n")).unwrap();
    let mut pid = first;
    let reloaded = wait_until(WAIT, || {
        pid = info_pid(&server, "/p/info");
        pid != first
    });
    thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (count, failures) = load.join().unwrap();
    assert!(
        reloaded,
        "the changed script did not restart the daemon\n{}",
        server.error_log()
    );
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed across the script reload:\n{}\n--- error_log ---\n{}",
        failures.len(),
        failures.join("\n"),
        server.error_log()
    );
    thread::sleep(Duration::from_millis(300));
    assert_no_wsgi_errors(&server, offset, "script reload");
}

/// Resident KiB of the regions (`memfd:mod_wsgi_rs`) a process maps, and how many it maps.
fn region_pages_kib(pid: u32) -> (u64, u64) {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut kib, mut mappings, mut in_region) = (0, 0, false);
    for line in smaps.lines() {
        let field = line.split_whitespace().next().unwrap_or("");
        if field.contains('-') && !field.ends_with(':') {
            in_region = line.contains("memfd:mod_wsgi_rs");
            mappings += u64::from(in_region);
        } else if in_region && field == "Rss:" {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    (kib, mappings)
}

/// `region_pages_kib` summed over every process of the server (Apache's and the daemons').
fn server_region_pages_kib(server: &TestServer) -> (u64, u64) {
    let processes = server.processes();
    let each = processes.iter().map(|p| region_pages_kib(p.pid));
    each.fold((0, 0), |(kib, n), (k, m)| (kib + k, n + m))
}

/// Waits up to `within` for the server's regions to keep only their control pages (one 4 KiB
/// page per mapping); Err with the KiB they still hold.
fn wait_for_control_pages_only(server: &TestServer, within: Duration) -> Result<(), u64> {
    let mut now = 0;
    let freed = wait_until(within, || {
        let (kib, mappings) = server_region_pages_kib(server);
        now = kib;
        kib <= 4 * mappings
    });
    if freed {
        Ok(())
    } else {
        Err(now)
    }
}

/// After big bodies, the pages they left in the memory an Apache child shares with a daemon
/// (one region per kept connection) are freed once the child is quiet; the connection stays,
/// and the bodies it carries afterwards arrive intact.
#[test]
fn an_apache_child_gives_back_the_pages_big_bodies_left_once_it_is_quiet() {
    if reference_mode() {
        // mod_wsgi shares no memory with its daemons.
        return;
    }
    let _turn = shared();
    let server = TestServer::start(
        "LogLevel wsgi_module:debug\n\
         WSGIDaemonProcess quiet processes=1 threads=4\n\
         WSGIScriptAlias /echo @APPS@/echo.wsgi process-group=quiet\n",
    );
    let addr = server.addr();
    let body: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let echo = || {
        // Spooled: the whole body is read before the response starts.
        let r = http_request(addr, "POST", "/echo?spool=1", &[], &body).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body == body, "the echoed body differs");
    };
    echo();
    // (The worker puts the connection back just after the client has its response.)
    thread::sleep(Duration::from_millis(200));
    echo();
    let (held, mappings) = server_region_pages_kib(&server);
    // At least the daemon's body slots.
    assert!(
        held >= 512,
        "the bodies left only {held} KiB in {mappings} region mappings: this test proves nothing"
    );
    if let Err(now) = wait_for_control_pages_only(&server, Duration::from_secs(10)) {
        panic!(
            "the regions still hold {now} KiB (was {held} KiB)\n{}",
            server.error_log()
        );
    }
    server.expect_log(
        "WSGIRS0324: Apache child gave memory back after going quiet",
        Duration::from_secs(10),
    );
    // The kept connection still serves, with fresh pages; and again once they are freed.
    echo();
    thread::sleep(Duration::from_millis(1500));
    echo();
}

/// A busy Apache child does not wait for a quiet second to free the pages big bodies left in
/// the region of a kept connection: once that connection has been idle for a second, its pages
/// go, while the child still runs a request of another group.
#[test]
fn a_busy_apache_child_frees_the_pages_of_a_connection_idle_for_a_second() {
    if reference_mode() {
        // mod_wsgi shares no memory with its daemons.
        return;
    }
    let _turn = shared();
    let server = TestServer::start(
        "LogLevel wsgi_module:debug\n\
         WSGIDaemonProcess bodies processes=1 threads=2\n\
         WSGIDaemonProcess sleepy processes=1 threads=2\n\
         WSGIScriptAlias /echo @APPS@/echo.wsgi process-group=bodies\n\
         WSGIScriptAlias /sleep @APPS@/sleep.wsgi process-group=sleepy\n",
    );
    let body: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    // One client connection, so one Apache child serves both of its requests.
    let mut client = server.connect();
    let echoed = client.request("POST", "/echo?spool=1", &[], &body).unwrap();
    assert_eq!(echoed.status, 200);
    assert!(echoed.body == body, "the echoed body differs");
    // The child now runs a 4 s request in the other group: it has no quiet moment until then.
    client.send("GET", "/sleep?4", &[], b"").unwrap();
    let sleeping = Instant::now();
    let (held, mappings) = server_region_pages_kib(&server);
    assert!(
        held >= 512,
        "the body left only {held} KiB in {mappings} region mappings: this test proves nothing"
    );
    // (The sleeping request's connection uses no slot: its region keeps its control page.)
    let freed = wait_for_control_pages_only(&server, Duration::from_secs(3));
    let freed_after = sleeping.elapsed();
    if let Err(now) = freed {
        panic!(
            "the regions still hold {now} KiB (was {held} KiB)\n{}",
            server.error_log()
        );
    }
    assert!(
        freed_after < Duration::from_millis(3500),
        "freed only after {freed_after:?}, when the child may have been quiet already"
    );
    let slept = client.read_response("GET").unwrap();
    assert_eq!(slept.status, 200, "{slept:?}");
    assert!(
        sleeping.elapsed() >= Duration::from_secs(4),
        "the request kept the child busy"
    );
    let log = server.error_log();
    assert!(
        log.contains(
            "WSGIRS0325: Apache child freed the pages big bodies left in the memory it shares \
             with daemons over kept connections idle for a second (1 of them)."
        ),
        "{log}"
    );
    assert!(
        !log.contains("WSGIRS0324"),
        "no child went quiet, so none gave memory back that way\n{log}"
    );
    // The kept connection still carries big bodies intact, on fresh pages.
    let again = client.request("POST", "/echo?spool=1", &[], &body).unwrap();
    assert_eq!(again.status, 200);
    assert!(
        again.body == body,
        "the echoed body differs after the release"
    );
}

/// response-buffer-size= bounds how much of one response a daemon puts in the memory it shares
/// with the Apache child, which holds those bytes until its client takes them: in 64 KiB
/// slots, so 65536 is one slot where the default allows four. Against a client that stalls,
/// each daemon fills what it may and sends the rest inline; every byte arrives.
#[test]
fn response_buffer_size_bounds_what_a_response_holds_in_shared_memory() {
    if reference_mode() {
        // mod_wsgi shares no memory with its daemons.
        return;
    }
    let _turn = shared();
    let server = TestServer::start(
        "SendBufferSize 32768\n\
         WSGIDaemonProcess small processes=1 threads=2 response-buffer-size=65536\n\
         WSGIDaemonProcess roomy processes=1 threads=2\n\
         WSGIScriptAlias /small/stream @APPS@/stream.wsgi process-group=small\n\
         WSGIScriptAlias /small/memory @APPS@/memory.wsgi process-group=small\n\
         WSGIScriptAlias /roomy/stream @APPS@/stream.wsgi process-group=roomy\n\
         WSGIScriptAlias /roomy/memory @APPS@/memory.wsgi process-group=roomy\n",
    );
    const SLOT_KIB: u64 = 64;
    let mut filled = HashMap::new();
    for group in ["small", "roomy"] {
        let pid = info_pid(&server, &format!("/{group}/memory")) as u32;
        let len = 4 * 1024 * 1024 + 7;
        let path = format!("/{group}/stream?bytes={len}&seed=21");
        let mut check = PatternCheck::new(21, len);
        let mut stalled = None;
        let streamed = http_stream(server.addr(), "GET", &path, &[], Body::Empty, |chunk| {
            if stalled.is_none() {
                // The client stalls at its first bytes; meanwhile the socket buffers fill and
                // the daemon runs as far ahead as it may. Measured while the request still
                // runs, so the Apache child's quiet-time release cannot have freed anything.
                // What the daemon touched beyond each region's control page is the data slots
                // it filled (a GET leaves the body slots alone).
                thread::sleep(Duration::from_millis(500));
                stalled = Some(region_pages_kib(pid));
            }
            check.feed(chunk);
        })
        .unwrap_or_else(|e| panic!("{path}: {e}\n{}", server.error_log()));
        assert_eq!(streamed.status, 200, "{path}: {streamed:?}");
        assert_eq!(streamed.body_len, len, "{path}");
        check.finish().unwrap_or_else(|e| panic!("{path}: {e}"));
        let (kib, mappings) = stalled.unwrap_or_default();
        filled.insert(group, kib.saturating_sub(4 * mappings));
    }
    assert!(
        filled["roomy"] > SLOT_KIB,
        "the default group filled only {} KiB of data slots: this test proves nothing",
        filled["roomy"]
    );
    assert!(
        filled["small"] <= SLOT_KIB,
        "response-buffer-size=65536 allows one 64 KiB slot, but the daemon filled {} KiB (the \
         default group filled {} KiB)",
        filled["small"],
        filled["roomy"]
    );
}
