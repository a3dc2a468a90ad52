//! Integration tests of the daemon boundary (SPEC §6): only Apache's workers can get a request
//! executed, a daemon holds nothing of Apache's beyond its error log, and daemons never
//! outlive the Apache parent.

// A failed unwrap in a test is the test failing, with its message.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// Connecting to a group's socket directly (here as root, who may open it) and sending a
/// request without the group's secret gets nothing executed: the daemon drops the
/// connection and logs mod_wsgi's phrase.
#[test]
fn forged_request_on_the_daemon_socket_is_refused() {
    require_root!();
    let server = TestServer::start(
        "WSGIDaemonProcess guarded processes=1 threads=2\n\
         WSGIScriptAlias /hello @APPS@/hello.wsgi process-group=guarded\n",
    );
    assert_eq!(server.get("/hello").status, 200);
    let sockets = server.socket_files();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    let script = server.apps_dir().join("hello.wsgi");
    for secret in [&[0u8; 32][..], b"guess", b""] {
        let mut stream = UnixStream::connect(&sockets[0]).expect("connect as root");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
            .write_all(&forged_request(
                secret,
                "guarded",
                &script.to_string_lossy(),
            ))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(
            answer.is_empty(),
            "the daemon answered a forged request: {answer:?}"
        );
    }
    server.expect_log("Request origin could not be validated", WAIT);
    assert!(server.error_log().contains("origin secret is wrong"));
    // Real requests still work.
    assert_eq!(server.get("/hello").status, 200);
}

/// The socket is 0600 and owned by Apache's worker user: another user cannot even connect.
#[test]
fn other_users_cannot_connect_to_daemon_sockets() {
    require_root!();
    let bob = require_user!("bob");
    let server = TestServer::start(
        "WSGIDaemonProcess private processes=1 threads=1\n\
         WSGIScriptAlias /hello @APPS@/hello.wsgi process-group=private\n",
    );
    let socket = server.socket_files().pop().expect("a socket");
    let probe = format!(
        "import os, socket\nos.setgid({gid}); os.setgroups([]); os.setuid({uid})\n\
         s = socket.socket(socket.AF_UNIX)\n\
         try:\n    s.connect({path:?}); print('connected')\nexcept PermissionError:\n    print('refused')\n",
        gid = bob.gid,
        uid = bob.uid,
        path = socket.to_string_lossy()
    );
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &probe])
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "refused",
        "{out:?}"
    );
}

/// A daemon keeps stdio, the error log, its own listener and its own connections, and
/// nothing else of Apache's: no access log, no MPM pipe, no scoreboard mapping.
#[test]
fn daemons_hold_nothing_of_apaches() {
    let server = TestServer::start(
        "WSGIDaemonProcess tidy processes=1 threads=2\n\
         WSGIDaemonProcess other processes=1 threads=1\n\
         WSGIScriptAlias /fds @APPS@/fds.wsgi process-group=tidy\n",
    );
    let r = server.get("/fds");
    assert_eq!(r.status, 200, "{}", server.error_log());
    let text = r.text();
    assert!(
        !text.contains("access_log"),
        "a daemon holds the access log: {text}"
    );
    assert!(
        !text.contains("/dev/zero"),
        "a daemon still maps the scoreboard: {text}"
    );
    // Its own group's load board is the one shared mapping of ours it keeps.
    assert!(
        text.contains("wsgi-load:tidy"),
        "the daemon lost its load board: {text}"
    );
    assert!(
        !text.contains("wsgi-load:other"),
        "a daemon maps another group's load board: {text}"
    );
    let j = r.json();
    let fds = j.get("fds").expect("fds");
    let pipes = text.matches("pipe:").count();
    // Our own stop pipe (two ends) is the only pipe a daemon opens before Python runs.
    assert!(
        pipes <= 2,
        "unexpected pipes (Apache's pipe of death?): {fds:?}"
    );
    let sockets = text.matches("socket:").count();
    // The group's listener and the request's own connection; never the other group's.
    assert!(
        sockets <= 2,
        "unexpected sockets (another group's listener?): {fds:?}"
    );
}

/// If the Apache parent dies without cleaning up (kill -9), its daemons follow within
/// seconds; the next start removes the stale socket files it left.
#[test]
fn daemons_die_with_the_parent_and_stale_sockets_are_removed() {
    let mut server = TestServer::start(
        "WSGIDaemonProcess orphan processes=2 threads=1\n\
         WSGIScriptAlias /hello @APPS@/hello.wsgi process-group=orphan\n",
    );
    assert_eq!(server.get("/hello").status, 200);
    let parent = server.pid();
    // The daemons announce themselves ("Starting process 'orphan'") with their pid; Apache's
    // own workers are not ours to stop.
    assert!(wait_until(WAIT, || server
        .error_log()
        .matches("Starting process 'orphan'")
        .count()
        == 2));
    let daemons: Vec<u32> = server
        .error_log()
        .lines()
        .filter(|l| l.contains("Starting process 'orphan'"))
        .filter_map(|l| {
            l.split("[pid ")
                .nth(1)?
                .split([':', ']'])
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(daemons.len(), 2, "{}", server.error_log());
    assert!(daemons
        .iter()
        .all(|&pid| descendants(parent).iter().any(|p| p.pid == pid)));
    let stale = server.socket_files();
    assert_eq!(stale.len(), 1);
    unsafe_kill(parent);
    let gone = wait_until(WAIT, || daemons.iter().all(|&pid| !pid_alive(pid)));
    let survivors: Vec<_> = daemons.iter().filter(|&&pid| pid_alive(pid)).collect();
    assert!(gone, "daemons outlived the Apache parent: {survivors:?}");
    assert!(
        stale[0].exists(),
        "the killed parent could not have removed its socket"
    );

    // Start the same configuration again: the dead parent's socket is cleaned up.
    let _ = server.stop();
    assert!(stale[0].exists());
    let conf = server.conf_path().to_path_buf();
    let apache = |action: &str| {
        std::process::Command::new(apache_bin())
            .args(["-f", &conf.to_string_lossy(), "-k", action])
            .status()
            .expect("apache2")
    };
    assert!(apache("start").success());
    let served = wait_until(WAIT, || {
        try_request(&server, "/hello").is_some_and(|status| status == 200)
    });
    let cleaned = !stale[0].exists();
    assert!(apache("stop").success());
    wait_until(WAIT, || server.socket_files().is_empty());
    assert!(
        served,
        "the restarted Apache did not serve\n{}",
        server.error_log()
    );
    assert!(cleaned, "stale socket {:?} survived a new start", stale[0]);
}

fn try_request(server: &TestServer, path: &str) -> Option<u16> {
    server
        .try_request("GET", path, &[], b"")
        .ok()
        .map(|r| r.status)
}

fn unsafe_kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}
