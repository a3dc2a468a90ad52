//! Integration tests of SPEC §8 and the rest of §4: the WSGI application as PEP 3333 defines
//! it, seen from a real Apache and a real CPython. The environ (every CGI variable, latin-1
//! native strings, SCRIPT_NAME/PATH_INFO for every kind of mount, REMOTE_USER and
//! HTTP_AUTHORIZATION), wsgi.input in every reading style (also chunked, also blocked on a
//! slow client while other threads run), start_response and exc_info, write(), generators,
//! close() in every ending (also when the client goes away), wsgi.file_wrapper in bounded
//! memory, HEAD, Content-Length, header validation, Set-Cookie, Location, the error log
//! (stdout, stderr, wsgi.errors, logging, tracebacks), script reloading, WSGIImportScript,
//! python-home / python-path, application groups, and `wsgiref.validate` finding nothing.
//!
//! Each test starts its own Apache, so they run in parallel. Marker files that prove close()
//! ran are written by the daemons into a world-writable `ScratchDir` (`SetEnv MARKER_DIR`).
//! The python-home tests need a virtualenv with `six` from PyPI (made once per machine under
//! /tmp, see `ensure_venv`); without PyPI they skip loudly.

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

const LOG_WAIT: Duration = Duration::from_secs(10);
/// How long a close() marker may take to appear.
const MARKER_WAIT: Duration = Duration::from_secs(20);
const MIB: u64 = 1024 * 1024;

// ---- helpers ---------------------------------------------------------------------------------

fn assert_status(server: &TestServer, what: &str, r: &Response, status: u16) {
    assert_eq!(
        r.status,
        status,
        "{what}: {r:?}\n--- error_log ---\n{}",
        server.error_log()
    );
}

/// GET `path`, assert 200, return the JSON body.
fn get_json(server: &TestServer, path: &str) -> Json {
    let r = server.get(path);
    assert_status(server, &format!("GET {path}"), &r, 200);
    r.json()
}

/// `j["env"][key]` as a string (None when the environ has no such str key).
fn env<'a>(j: &'a Json, key: &str) -> Option<&'a str> {
    j["env"][key].as_str()
}

/// Code points of a (latin-1) native string, for readable assertions about bytes.
fn code_points(s: &str) -> Vec<u32> {
    s.chars().map(u32::from).collect()
}

/// Waits for an error-log line (after byte `since`) that contains every one of `parts`.
fn expect_line(server: &TestServer, since: usize, parts: &[&str]) -> String {
    let mut found = None;
    wait_until(LOG_WAIT, || {
        found = server
            .error_log_since(since)
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no error-log line contains all of {parts:?}\n--- error_log (new part) ---\n{}",
            server.error_log_since(since)
        )
    })
}

/// The group name, when the module promises to put it in app output lines (not checked
/// against the reference mod_wsgi, which does not).
fn group_part(group: &str) -> Vec<&str> {
    if reference_mode() {
        vec![]
    } else {
        vec![group]
    }
}

fn wait_marker(scratch: &ScratchDir, name: &str, what: &str, server: &TestServer) {
    match scratch.wait_for_file(name, MARKER_WAIT) {
        Some(text) => assert_eq!(text, "closed", "{what}: marker {name}"),
        None => panic!(
            "{what}: close() was never called (no marker {name} within {MARKER_WAIT:?})\n--- error_log ---\n{}",
            server.error_log()
        ),
    }
}

/// The lines `body` splits into, each keeping its "\n" (what readline() returns).
fn lines_of(body: &str) -> Vec<String> {
    body.split_inclusive('\n').map(str::to_string).collect()
}

fn pieces(j: &Json) -> Vec<String> {
    j["pieces"]
        .as_array()
        .unwrap_or_else(|| panic!("no pieces in {j:?}"))
        .iter()
        .map(|p| p.as_str().expect("piece is a string").to_string())
        .collect()
}

/// Sets a file's mtime (so a rewrite is seen as a change even within one second).
fn set_mtime(path: &Path, when: SystemTime) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.set_modified(when)
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

// ---- the environ -----------------------------------------------------------------------------

#[test]
fn environ_holds_cgi_variables_and_wsgi_keys() {
    let server = TestServer::start(
        "WSGIDaemonProcess envg threads=4\n\
         WSGIDaemonProcess envmp processes=2 threads=1\n\
         WSGIScriptAlias /env @APPS@/environ.wsgi process-group=envg\n\
         WSGIScriptAlias /mp @APPS@/environ.wsgi process-group=envmp\n\
         SetEnv MOD_WSGI_RS_SETENV from-setenv\n",
    );
    let port = server.port().to_string();
    let r = server.request(
        "POST",
        "/env/a/b?x=1&y=%20",
        &[
            ("Content-Type", "text/plain"),
            ("X-Custom", "custom value"),
            ("X-Latin", "é"),
            ("Cookie", "k=v"),
            ("Authorization", "Bearer secret-token"),
        ],
        b"hello",
    );
    assert_status(&server, "POST /env/a/b", &r, 200);
    let j = r.json();
    let expect = [
        ("REQUEST_METHOD", "POST"),
        ("SCRIPT_NAME", "/env"),
        ("PATH_INFO", "/a/b"),
        ("QUERY_STRING", "x=1&y=%20"),
        ("REQUEST_URI", "/env/a/b?x=1&y=%20"),
        ("CONTENT_TYPE", "text/plain"),
        ("CONTENT_LENGTH", "5"),
        ("SERVER_NAME", "127.0.0.1"),
        ("SERVER_PORT", port.as_str()),
        ("SERVER_ADDR", "127.0.0.1"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("REQUEST_SCHEME", "http"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("HTTP_X_CUSTOM", "custom value"),
        ("HTTP_COOKIE", "k=v"),
        ("MOD_WSGI_RS_SETENV", "from-setenv"),
        ("mod_wsgi.process_group", "envg"),
    ];
    let mut wrong = Vec::new();
    for (key, want) in expect {
        if env(&j, key) != Some(want) {
            wrong.push(format!("{key}: want {want:?}, got {:?}", env(&j, key)));
        }
    }
    assert!(
        wrong.is_empty(),
        "environ differs:\n{}\n{j:?}",
        wrong.join("\n")
    );
    assert_eq!(
        env(&j, "HTTP_HOST"),
        Some(format!("127.0.0.1:{port}").as_str())
    );
    assert_eq!(
        env(&j, "SCRIPT_FILENAME"),
        Some(
            server
                .apps_dir()
                .join("environ.wsgi")
                .display()
                .to_string()
                .as_str()
        )
    );
    assert_eq!(
        env(&j, "DOCUMENT_ROOT"),
        Some(server.root().join("htdocs").display().to_string().as_str())
    );
    assert!(
        env(&j, "SERVER_SOFTWARE").is_some_and(|s| s.contains("Apache")),
        "{j:?}"
    );
    let remote_port: u16 = env(&j, "REMOTE_PORT")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("REMOTE_PORT is not a port: {j:?}"));
    assert_ne!(remote_port, 0);
    // The UTF-8 bytes of "é" arrive as two latin-1 code points, one per byte (PEP 3333).
    assert_eq!(
        env(&j, "HTTP_X_LATIN").map(code_points),
        Some(vec![0xC3, 0xA9]),
        "{j:?}"
    );
    for absent in [
        "HTTP_AUTHORIZATION",
        "HTTP_CONTENT_TYPE",
        "HTTP_CONTENT_LENGTH",
        "HTTPS",
    ] {
        assert!(
            j["env"].get(absent).is_none(),
            "{absent} must not be in the environ: {j:?}"
        );
    }
    assert_eq!(
        env(&j, "mod_wsgi.application_group"),
        Some(format!("127.0.0.1:{port}|/env").as_str())
    );
    // Every CGI key (no dot) is a native str.
    if let Json::Obj(types) = &j["types"] {
        let not_str: Vec<String> = types
            .iter()
            .filter(|(k, v)| !k.contains('.') && v.as_str() != Some("str"))
            .map(|(k, v)| format!("{k}: {v:?}"))
            .collect();
        assert!(not_str.is_empty(), "non-str CGI values: {not_str:?}");
    } else {
        panic!("no types in {j:?}");
    }
    assert_eq!(j["types"]["wsgi.version"].as_str(), Some("tuple"), "{j:?}");
    assert_eq!(j.u64_list_of("wsgi_version"), vec![1, 0]);
    assert_eq!(j.str_of("url_scheme"), "http");
    assert_eq!(j["input_terminated"].as_bool(), Some(true), "{j:?}");
    assert_eq!(j["multithread"].as_bool(), Some(true));
    // processes= not given: not multiprocess (giving it at all, even =1, makes it True).
    assert_eq!(j["multiprocess"].as_bool(), Some(false));
    assert_eq!(j["run_once"].as_bool(), Some(false));
    assert_eq!(j["file_wrapper"].as_bool(), Some(true), "{j:?}");
    assert_eq!(
        j["input_methods"].as_array().map(<[Json]>::len),
        Some(4),
        "{j:?}"
    );
    assert_eq!(
        j["errors_methods"].as_array().map(<[Json]>::len),
        Some(3),
        "{j:?}"
    );
    assert!(
        j["mod_wsgi_version"]
            .as_array()
            .is_some_and(|v| !v.is_empty()),
        "mod_wsgi.version: {j:?}"
    );
    assert_eq!(j.str_of("body"), "hello");

    // processes=2 threads=1: multiprocess, not multithread.
    let j = get_json(&server, "/mp");
    assert_eq!(j["multiprocess"].as_bool(), Some(true), "{j:?}");
    assert_eq!(j["multithread"].as_bool(), Some(false), "{j:?}");
    assert_eq!(env(&j, "REQUEST_METHOD"), Some("GET"));
    assert_eq!(
        env(&j, "QUERY_STRING"),
        Some(""),
        "QUERY_STRING is always set"
    );
}

#[test]
fn script_name_and_path_info_for_every_mount() {
    let server = TestServer::start_with_files(
        "WSGIDaemonProcess mounts processes=1 threads=4\n\
         WSGIScriptAlias /sub @APPS@/environ.wsgi process-group=mounts\n\
         WSGIScriptAlias /deep/er/mount @APPS@/environ.wsgi process-group=mounts\n\
         Alias /cgi/ @APPS@/\n\
         <Directory @APPS@>\n\
             Options +ExecCGI\n\
             AddHandler wsgi-script .wsgi\n\
             WSGIProcessGroup mounts\n\
         </Directory>\n\
         Listen 127.0.0.1:@PORT2@\n\
         <VirtualHost 127.0.0.1:@PORT2@>\n\
             ServerName root.example\n\
             Alias /static/ @ROOT@/htdocs/static/\n\
             WSGIScriptAlias / @APPS@/environ.wsgi process-group=mounts\n\
         </VirtualHost>\n",
        &[("htdocs/static/hello.txt", "static file\n")],
    );
    let cases = [
        ("/sub", "/sub", ""),
        ("/sub/", "/sub", "/"),
        ("/sub/x/y", "/sub", "/x/y"),
        // mod_wsgi collapses repeated slashes in both.
        ("/sub//x///y", "/sub", "/x/y"),
        ("/deep/er/mount/z", "/deep/er/mount", "/z"),
        ("/cgi/environ.wsgi", "/cgi/environ.wsgi", ""),
        (
            "/cgi/environ.wsgi/extra/path",
            "/cgi/environ.wsgi",
            "/extra/path",
        ),
    ];
    // Every case is tried; the mismatches are reported together at the end.
    let mut wrong = Vec::new();
    for (path, script_name, path_info) in cases {
        let j = get_json(&server, path);
        let got = (env(&j, "SCRIPT_NAME"), env(&j, "PATH_INFO"));
        if got != (Some(script_name), Some(path_info)) {
            wrong.push(format!(
                "GET {path}: want SCRIPT_NAME={script_name:?} PATH_INFO={path_info:?}, got {got:?}"
            ));
        }
    }
    // An alias matches whole path segments only.
    let r = server.get("/subway");
    assert_status(&server, "GET /subway", &r, 404);

    // WSGIScriptAlias / : SCRIPT_NAME is '' (never '/'), PATH_INFO the whole path.
    for (path, path_info) in [
        ("/", "/"),
        ("/x", "/x"),
        ("/sub-not-a-mount/y", "/sub-not-a-mount/y"),
    ] {
        let r = http_request(
            server.addr2(),
            "GET",
            path,
            &[("Host", "root.example")],
            b"",
        )
        .unwrap_or_else(|e| panic!("GET {path} on the / mount: {e}"));
        assert_status(&server, &format!("GET {path} (/ mount)"), &r, 200);
        let j = r.json();
        let got = (env(&j, "SCRIPT_NAME"), env(&j, "PATH_INFO"));
        if got != (Some(""), Some(path_info)) {
            wrong.push(format!(
                "GET {path} on the / mount: want SCRIPT_NAME=\"\" PATH_INFO={path_info:?}, got {got:?}"
            ));
        }
    }
    // mod_alias still serves its Alias beside WSGIScriptAlias / (as with mod_wsgi).
    let r = http_request(
        server.addr2(),
        "GET",
        "/static/hello.txt",
        &[("Host", "root.example")],
        b"",
    )
    .expect("GET /static/hello.txt");
    assert_status(&server, "GET /static/hello.txt", &r, 200);
    assert_eq!(r.text(), "static file\n");
    assert!(
        wrong.is_empty(),
        "SCRIPT_NAME/PATH_INFO (PATH_INFO is always present, '' when empty, as mod_wsgi \
         sets it):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn non_ascii_path_and_query_are_latin1_native_strings() {
    let server = TestServer::start(
        "WSGIDaemonProcess utf processes=1 threads=2\n\
         WSGIScriptAlias /env @APPS@/environ.wsgi process-group=utf\n",
    );
    // Percent-encoded UTF-8 in the path: PATH_INFO is decoded, one code point per byte.
    let j = get_json(&server, "/env/caf%C3%A9/%E2%9C%93?q=%C3%A9&raw=é");
    assert_eq!(
        env(&j, "PATH_INFO").map(code_points),
        Some(
            "/caf"
                .chars()
                .map(u32::from)
                .chain([0xC3, 0xA9, u32::from('/'), 0xE2, 0x9C, 0x93])
                .collect()
        ),
        "{:?}",
        j["env"]
    );
    // The query string stays as sent: escapes kept, raw bytes one code point each.
    let qs = env(&j, "QUERY_STRING").expect("QUERY_STRING");
    assert_eq!(
        code_points(qs),
        "q=%C3%A9&raw="
            .chars()
            .map(u32::from)
            .chain([0xC3, 0xA9])
            .collect::<Vec<_>>(),
        "{qs:?}"
    );
    assert!(
        env(&j, "REQUEST_URI").is_some_and(|u| u.starts_with("/env/caf%C3%A9/%E2%9C%93?")),
        "{:?}",
        j["env"]
    );
    // Raw (unencoded) UTF-8 bytes in the path.
    let j = get_json(&server, "/env/raw-é");
    assert_eq!(
        env(&j, "PATH_INFO").map(code_points),
        Some("/raw-".chars().map(u32::from).chain([0xC3, 0xA9]).collect()),
        "{:?}",
        j["env"]
    );
}

/// `{SHA}` of "s3cret" (what `htpasswd -s` writes).
const HTPASSWD: &str = "alice:{SHA}/vNB+F2HQ559kaLUZbmHHvZrXpg=\n";
/// base64("alice:s3cret")
const ALICE: &str = "Basic YWxpY2U6czNjcmV0";

#[test]
fn remote_user_and_authorization_follow_apache_auth() {
    let server = TestServer::start_with_files(
        "LoadModule auth_basic_module /usr/lib/apache2/modules/mod_auth_basic.so\n\
         LoadModule authn_core_module /usr/lib/apache2/modules/mod_authn_core.so\n\
         LoadModule authn_file_module /usr/lib/apache2/modules/mod_authn_file.so\n\
         LoadModule authz_user_module /usr/lib/apache2/modules/mod_authz_user.so\n\
         WSGIDaemonProcess auth processes=1 threads=2\n\
         WSGIScriptAlias /private @APPS@/environ.wsgi process-group=auth\n\
         WSGIScriptAlias /passed @APPS@/environ.wsgi process-group=auth\n\
         WSGIScriptAlias /open @APPS@/environ.wsgi process-group=auth\n\
         WSGIScriptAlias /open-on @APPS@/environ.wsgi process-group=auth\n\
         WSGIScriptAlias /optin @APPS@/environ.wsgi process-group=auth pass-authorization=On\n\
         <Location /private>\n\
             AuthType Basic\n\
             AuthName \"mod_wsgi_rs test\"\n\
             AuthBasicProvider file\n\
             AuthUserFile @ROOT@/conf/htpasswd\n\
             Require valid-user\n\
         </Location>\n\
         <Location /passed>\n\
             AuthType Basic\n\
             AuthName \"mod_wsgi_rs test\"\n\
             AuthBasicProvider file\n\
             AuthUserFile @ROOT@/conf/htpasswd\n\
             Require valid-user\n\
             WSGIPassAuthorization On\n\
         </Location>\n\
         <Location /open-on>\n\
             WSGIPassAuthorization On\n\
         </Location>\n",
        &[("conf/htpasswd", HTPASSWD)],
    );
    let r = server.get("/private");
    assert_status(&server, "GET /private without credentials", &r, 401);
    assert!(r.header("WWW-Authenticate").is_some(), "{r:?}");
    let r = server.request(
        "GET",
        "/private",
        &[("Authorization", "Basic YWxpY2U6d3Jvbmc=")],
        b"",
    );
    assert_status(&server, "GET /private with a wrong password", &r, 401);

    let r = server.request("GET", "/private/x", &[("Authorization", ALICE)], b"");
    assert_status(&server, "GET /private as alice", &r, 200);
    let j = r.json();
    assert_eq!(env(&j, "REMOTE_USER"), Some("alice"), "{:?}", j["env"]);
    assert_eq!(env(&j, "AUTH_TYPE"), Some("Basic"), "{:?}", j["env"]);
    assert_eq!(
        env(&j, "HTTP_AUTHORIZATION"),
        None,
        "WSGIPassAuthorization is Off by default"
    );

    let r = server.request("GET", "/passed", &[("Authorization", ALICE)], b"");
    assert_status(&server, "GET /passed as alice", &r, 200);
    let j = r.json();
    assert_eq!(env(&j, "REMOTE_USER"), Some("alice"));
    assert_eq!(env(&j, "HTTP_AUTHORIZATION"), Some(ALICE), "{:?}", j["env"]);

    // No Apache auth: the app may do its own, with the header passed only when allowed.
    let bearer = [("Authorization", "Bearer app-token")];
    let j = server.request("GET", "/open", &bearer, b"").json();
    assert_eq!(env(&j, "HTTP_AUTHORIZATION"), None, "{:?}", j["env"]);
    assert_eq!(env(&j, "REMOTE_USER"), None);
    assert_eq!(env(&j, "AUTH_TYPE"), None);
    let j = server.request("GET", "/open-on", &bearer, b"").json();
    assert_eq!(env(&j, "HTTP_AUTHORIZATION"), Some("Bearer app-token"));
    let j = server.request("GET", "/optin", &bearer, b"").json();
    assert_eq!(
        env(&j, "HTTP_AUTHORIZATION"),
        Some("Bearer app-token"),
        "pass-authorization=On on WSGIScriptAlias"
    );
}

// ---- wsgi.input ------------------------------------------------------------------------------

const INPUT_GROUP: &str = "WSGIDaemonProcess input processes=1 threads=4\n\
     WSGIScriptAlias /input @APPS@/input.wsgi process-group=input\n\
     WSGIScriptAlias /chunked @APPS@/input.wsgi process-group=input\n\
     <Location /chunked>\n\
         WSGIChunkedRequest On\n\
     </Location>\n";

fn post_input(server: &TestServer, query: &str, body: &[u8]) -> Json {
    let path = format!("/input?{query}");
    let r = server.request("POST", &path, &[("Content-Type", "text/plain")], body);
    assert_status(server, &format!("POST {path}"), &r, 200);
    r.json()
}

#[test]
fn wsgi_input_read_methods() {
    let server = TestServer::start(INPUT_GROUP);
    let body = "first line\nsecond line is longer\n\nlast line without newline";
    let lines = lines_of(body);
    let chunks = |n: usize| -> Vec<String> {
        body.as_bytes()
            .chunks(n)
            .map(|c| String::from_utf8(c.to_vec()).expect("ascii"))
            .collect()
    };
    let lines_capped = |n: usize| -> Vec<String> {
        lines
            .iter()
            .flat_map(|l| {
                l.as_bytes()
                    .chunks(n)
                    .map(|c| String::from_utf8(c.to_vec()).expect("ascii"))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mixed: Vec<String> = vec![
        "first line\n".into(),
        "sec".into(),
        "ond ".into(),
        "line is longer\n".into(),
        "\n".into(),
        "last line without newline".into(),
    ];
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("mode=read", vec![body.to_string()]),
        ("mode=read_n&n=7", chunks(7)),
        ("mode=read_n&n=1", chunks(1)),
        ("mode=readline", lines.clone()),
        ("mode=readline_n&n=5", lines_capped(5)),
        ("mode=readlines", lines.clone()),
        ("mode=iter", lines.clone()),
        ("mode=mixed", mixed),
    ];
    for (query, want) in cases {
        let j = post_input(&server, query, body.as_bytes());
        assert_eq!(pieces(&j), want, "{query}: {j:?}");
        assert_eq!(j.u64_of("total"), body.len() as u64, "{query}");
        assert_eq!(
            j.u64_of("crc32"),
            u64::from(crc32(body.as_bytes())),
            "{query}"
        );
        assert_eq!(j.str_of("after"), "", "{query}: read after the end");
        assert_eq!(
            j["types"].as_array().map(|t| t.to_vec()),
            Some(vec![Json::Str("bytes".into())]),
            "{query}: every piece is bytes"
        );
    }

    // Every byte value, unchanged.
    let binary: Vec<u8> = (0..=255u8).cycle().take(256 * 40 + 7).collect();
    for query in [
        "mode=read",
        "mode=read_n&n=1000",
        "mode=readline",
        "mode=iter",
    ] {
        let j = post_input(&server, query, &binary);
        assert_eq!(j.u64_of("total"), binary.len() as u64, "{query}");
        assert_eq!(j.u64_of("crc32"), u64::from(crc32(&binary)), "{query}");
    }

    // A body bigger than any buffer, in 64 KiB reads.
    let len = 3 * MIB + 17;
    let big = Pattern::to_vec(21, len);
    let j = post_input(&server, "mode=crc", &big);
    assert_eq!(j.u64_of("total"), len);
    assert_eq!(j.u64_of("crc32"), u64::from(crc32(&big)));
}

#[test]
fn wsgi_input_stops_at_content_length() {
    let server = TestServer::start(INPUT_GROUP);
    // read(CONTENT_LENGTH + 1000) gives exactly the body; later reads give b"".
    let j = post_input(&server, "mode=over", b"abcdef");
    assert_eq!(
        pieces(&j),
        vec!["abcdef".to_string(), String::new(), String::new()],
        "{j:?}"
    );
    assert_eq!(j.str_of("after"), "");

    // Two pipelined requests in one write on one connection: the first app must not swallow
    // the second request.
    let mut conn = server.connect();
    let mut bytes = conn.head("POST", "/input?mode=over", &[], 5).into_bytes();
    bytes.extend_from_slice(b"12345");
    bytes.extend_from_slice(conn.head("POST", "/input?mode=read", &[], 3).as_bytes());
    bytes.extend_from_slice(b"xyz");
    bytes.extend_from_slice(conn.head("GET", "/input?mode=read", &[], 0).as_bytes());
    conn.write_raw(&bytes).expect("write pipelined requests");
    let first = conn
        .read_response("POST")
        .expect("first pipelined response");
    assert_status(&server, "first pipelined", &first, 200);
    assert_eq!(
        pieces(&first.json()),
        vec!["12345".to_string(), String::new(), String::new()]
    );
    let second = conn
        .read_response("POST")
        .expect("second pipelined response");
    assert_status(&server, "second pipelined", &second, 200);
    assert_eq!(pieces(&second.json()), vec!["xyz".to_string()]);
    let third = conn.read_response("GET").expect("third pipelined response");
    assert_status(&server, "third pipelined", &third, 200);
    assert_eq!(
        pieces(&third.json()),
        vec![String::new()],
        "GET has no body"
    );
}

#[test]
fn empty_and_zero_length_chunked_bodies() {
    let server = TestServer::start(INPUT_GROUP);
    for query in [
        "mode=read",
        "mode=readline",
        "mode=readlines",
        "mode=iter",
        "mode=read_n&n=10",
    ] {
        // POST with Content-Length: 0.
        let j = post_input(&server, query, b"");
        assert_eq!(j.u64_of("total"), 0, "{query}: {j:?}");
        assert_eq!(j["content_length"].as_str(), Some("0"), "{query}: {j:?}");
        // Chunked, with only the last chunk.
        let path = format!("/chunked?{query}");
        let r = server.request("POST", &path, &[("Transfer-Encoding", "chunked")], b"");
        assert_status(&server, &format!("POST {path} (0-length chunked)"), &r, 200);
        let j = r.json();
        assert_eq!(j.u64_of("total"), 0, "{query}: {j:?}");
        assert_eq!(j.str_of("after"), "");
    }
}

#[test]
fn chunked_request_needs_wsgichunkedrequest() {
    let server = TestServer::start(INPUT_GROUP);
    let chunked = [("Transfer-Encoding", "chunked")];

    // Off (the default): 411 Length Required.
    let r = server.request("POST", "/input?mode=read", &chunked, b"some body");
    assert_status(&server, "chunked POST without WSGIChunkedRequest", &r, 411);

    // On: the de-chunked body, whatever its size, in every reading style.
    let len = 2 * MIB + 333;
    let mut check_crc = Crc32::new();
    check_crc.update(&Pattern::to_vec(9, len));
    let r = server.request(
        "POST",
        "/chunked?mode=crc",
        &chunked,
        &Pattern::to_vec(9, len),
    );
    assert_status(&server, "chunked 2 MiB", &r, 200);
    let j = r.json();
    assert_eq!(j.u64_of("total"), len, "{j:?}");
    assert_eq!(j.u64_of("crc32"), u64::from(check_crc.value()));
    assert!(
        j["content_length"].is_null(),
        "no CONTENT_LENGTH for a chunked body: {j:?}"
    );

    let text = "alpha\nbeta\n\ngamma";
    for (query, want) in [
        ("mode=readline", lines_of(text)),
        ("mode=iter", lines_of(text)),
        ("mode=read", vec![text.to_string()]),
        (
            "mode=read_n&n=4",
            text.as_bytes()
                .chunks(4)
                .map(|c| String::from_utf8(c.to_vec()).expect("ascii"))
                .collect(),
        ),
    ] {
        let path = format!("/chunked?{query}");
        let r = server.request("POST", &path, &chunked, text.as_bytes());
        assert_status(&server, &format!("POST {path}"), &r, 200);
        assert_eq!(pieces(&r.json()), want, "{query}");
    }
}

/// A request blocked in wsgi.input.read() on a slow client must not hold the GIL: another
/// request to the same daemon process (threads=2) completes promptly meanwhile.
#[test]
fn blocked_input_read_releases_the_gil() {
    let server = TestServer::start(
        "WSGIDaemonProcess gil processes=1 threads=2\n\
         WSGIScriptAlias /input @APPS@/input.wsgi process-group=gil\n\
         WSGIScriptAlias /whoami @APPS@/whoami.wsgi process-group=gil\n",
    );
    let pid = get_json(&server, "/whoami").u64_of("pid");
    let since = server.error_log().len();
    let mut slow = server.connect();
    let total = 1000usize;
    slow.write_raw(
        slow.head(
            "POST",
            "/input?mode=crc&announce=gil-slow-upload",
            &[],
            total as u64,
        )
        .as_bytes(),
    )
    .expect("send head");
    slow.write_raw(&[b'a'; 10]).expect("first 10 bytes");
    // The app is now inside read(), waiting for the rest.
    expect_line(&server, since, &["input-reading-started gil-slow-upload"]);
    thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let j = get_json(&server, "/whoami");
    let took = started.elapsed();
    assert_eq!(j.u64_of("pid"), pid, "processes=1: the same daemon process");
    assert!(
        took < Duration::from_secs(2),
        "a request took {took:?} while another thread of the process was blocked reading \
         wsgi.input: the GIL is held during the read"
    );

    thread::sleep(Duration::from_secs(1));
    slow.write_raw(&vec![b'a'; total - 10]).expect("the rest");
    let r = slow
        .read_response("POST")
        .expect("the slow upload's response");
    assert_status(&server, "slow upload", &r, 200);
    let j = r.json();
    assert_eq!(j.u64_of("total"), total as u64);
    assert_eq!(j.u64_of("pid"), pid);
}

// ---- the response ----------------------------------------------------------------------------

const RESPONSES: &str = "WSGIDaemonProcess resp processes=1 threads=4\n\
     SetEnv MARKER_DIR @SCRATCH@\n\
     WSGIScriptAlias /resp @APPS@/responses.wsgi process-group=resp\n\
     WSGIScriptAlias /env @APPS@/environ.wsgi process-group=resp\n\
     WSGIScriptAlias /input @APPS@/input.wsgi process-group=resp\n\
     WSGIScriptAlias /stream @APPS@/stream.wsgi process-group=resp\n\
     WSGIScriptAlias /hello @APPS@/hello.wsgi process-group=resp\n";

fn start_responses(scratch: &ScratchDir) -> TestServer {
    TestServer::start(&RESPONSES.replace("@SCRATCH@", &scratch.path().display().to_string()))
}

#[test]
fn start_response_and_exc_info_rules() {
    let scratch = ScratchDir::new("exc");
    let server = start_responses(&scratch);

    // exc_info before anything was sent: the new status and headers replace the old.
    let r = server.get("/resp/exc_before");
    assert_status(&server, "exc_info before the headers", &r, 500);
    assert_eq!(r.reason, "Handled Error");
    assert_eq!(r.text(), "error page");

    // exc_info after the headers went out: start_response re-raises, the response is cut
    // short (never made to look complete: mod_wsgi 4.9 ends the chunked body normally, so
    // that part is left out in reference mode), and the traceback is logged.
    let since = server.error_log().len();
    match server.try_request("GET", "/resp/exc_after", &[], b"") {
        Err(e) if e.is_incomplete() => {}
        Err(e) => panic!("exc_info after the headers: want an incomplete response, got {e}"),
        Ok(r) if reference_mode() => assert_eq!(r.text(), "first part "),
        Ok(r) => panic!(
            "exc_info after the headers: the response looked complete: {r:?}\n{}",
            server.error_log()
        ),
    }
    expect_line(
        &server,
        since,
        &["ValueError: late failure after the headers"],
    );

    // start_response twice without exc_info (PEP 3333: a fatal error; wsgiref raises
    // "Headers already set!", while mod_wsgi 4.9 lets the second call win, so that case is
    // ours alone), no start_response at all, a str in the body: errors before any header
    // was sent are a 500 and a log line.
    for (path, phrase) in [
        ("/resp/twice", ""),
        ("/resp/no_start", ""),
        ("/resp/not_bytes", "TypeError"),
    ] {
        if path == "/resp/twice" && reference_mode() {
            continue;
        }
        let since = server.error_log().len();
        let r = server.get(path);
        assert_status(&server, path, &r, 500);
        assert!(
            !r.text().contains("should not be seen") && !r.text().contains("body without"),
            "{path}: {r:?}"
        );
        expect_line(&server, since, &["responses.wsgi"]);
        expect_line(&server, since, &[phrase]);
    }

    // The group carries on.
    let r = server.get("/resp/generator");
    assert_status(&server, "after the errors", &r, 200);
}

#[test]
fn write_callable_generators_and_close() {
    let scratch = ScratchDir::new("close");
    let server = start_responses(&scratch);
    for (path, body) in [
        ("/resp/generator", "one two three"),
        ("/resp/write", "written returned"),
        ("/resp/write_only", "abcdef"),
        ("/resp/empty", ""),
        ("/resp/close?marker=c1", "closing body"),
    ] {
        let r = server.get(path);
        assert_status(&server, path, &r, 200);
        assert_eq!(r.text(), body, "{path}");
    }
    let r = server.get("/resp/write_only");
    assert_eq!(r.header("Content-Length"), Some("6"));
    let r = server.get("/resp/custom_status");
    assert_status(&server, "custom status", &r, 299);
    assert_eq!(r.reason, "Made Up");

    wait_marker(&scratch, "c1", "a completed response", &server);

    // An iterable that raises before its first chunk: 500, and still closed.
    let since = server.error_log().len();
    let r = server.get("/resp/raise_first?marker=c2");
    assert_status(&server, "raise before the first chunk", &r, 500);
    wait_marker(&scratch, "c2", "an iterable raising at once", &server);
    expect_line(
        &server,
        since,
        &["RuntimeError: boom before the first chunk"],
    );

    // A list-like custom iterable returned after reading the input.
    let r = server.request("POST", "/input?mode=read&marker=c3", &[], b"body");
    assert_status(&server, "input with close()", &r, 200);
    wait_marker(&scratch, "c3", "input.wsgi's reply", &server);
}

#[test]
fn iterable_raising_mid_response_is_cut_and_closed() {
    let scratch = ScratchDir::new("mid");
    let server = start_responses(&scratch);
    let since = server.error_log().len();
    match server.try_request("GET", "/resp/raise_mid?marker=c4", &[], b"") {
        Err(HttpError::Incomplete { status, .. }) => assert_eq!(status, 200),
        Err(e) => panic!("want an incomplete 200, got {e}"),
        // mod_wsgi 4.9 ends the chunked body normally (a **beyond** item of ours).
        Ok(r) if reference_mode() => assert_eq!(r.text(), "partial body"),
        Ok(r) => panic!("an iterable that raised gave a complete-looking response: {r:?}"),
    }
    wait_marker(&scratch, "c4", "an iterable raising mid-way", &server);
    expect_line(&server, since, &["RuntimeError: boom mid-iteration"]);
    expect_line(&server, since, &["Traceback (most recent call last)"]);
    let r = server.get("/hello");
    assert_status(&server, "after the cut response", &r, 200);
}

#[test]
fn content_length_is_honoured_and_enforced() {
    let scratch = ScratchDir::new("cl");
    let server = start_responses(&scratch);
    // The app declares 5 and yields more: the client gets exactly 5, and the keep-alive
    // connection is still in step (the next response parses).
    let mut conn = server.connect();
    let r = conn
        .request("GET", "/resp/cl5", &[], b"")
        .expect("GET /resp/cl5");
    assert_status(&server, "/resp/cl5", &r, 200);
    assert_eq!(r.header("Content-Length"), Some("5"));
    assert_eq!(r.text(), "Hello");
    let r = conn
        .request("GET", "/resp/generator", &[], b"")
        .unwrap_or_else(|e| panic!("the connection is out of step after a too-long body: {e}"));
    assert_status(&server, "after /resp/cl5", &r, 200);
    assert_eq!(r.text(), "one two three");
    let r = conn
        .request("GET", "/hello", &[], b"")
        .expect("third request");
    assert_eq!(r.text(), "Hello World!");

    // Declares 10, sends 5: the client sees an incomplete response, and the connection is
    // closed rather than left hanging.
    let mut conn = server.connect();
    conn.set_read_timeout(Duration::from_secs(10));
    match conn.request("GET", "/resp/cl_short", &[], b"") {
        Err(HttpError::Incomplete {
            status, received, ..
        }) => {
            assert_eq!(status, 200);
            assert_eq!(received, 5);
        }
        // Apache may not have flushed anything yet when the shortfall is found: then the
        // connection closes before the status line, which is just as incomplete.
        Err(e) if e.is_no_response() => {}
        Err(e) => panic!("want an incomplete response (connection closed), got {e}"),
        Ok(r) => panic!("a body short of its Content-Length looked complete: {r:?}"),
    }
}

#[test]
fn head_requests_keep_headers_and_drop_the_body() {
    let scratch = ScratchDir::new("head");
    let server = start_responses(&scratch);
    let mut conn = server.connect();
    // A streamed response (no Content-Length).
    let r = conn
        .request("HEAD", "/resp/stream_head", &[], b"")
        .expect("HEAD streamed");
    assert_status(&server, "HEAD /resp/stream_head", &r, 200);
    assert_eq!(r.header("X-Streamed"), Some("yes"));
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
    // Had a body been sent, this response would not parse.
    let r = conn
        .request("GET", "/resp/generator", &[], b"")
        .unwrap_or_else(|e| panic!("after HEAD of a streamed response: {e}"));
    assert_eq!(r.text(), "one two three");
    // With Content-Length: the header is kept, no body follows.
    let r = conn
        .request("HEAD", "/stream?bytes=1000000", &[], b"")
        .expect("HEAD with Content-Length");
    assert_status(&server, "HEAD /stream", &r, 200);
    assert_eq!(r.header("Content-Length"), Some("1000000"), "{r:?}");
    let r = conn
        .request("GET", "/resp/write", &[], b"")
        .unwrap_or_else(|e| panic!("after HEAD with Content-Length: {e}"));
    assert_eq!(r.text(), "written returned");
    let j = conn.request("HEAD", "/env", &[], b"").expect("HEAD /env");
    assert_eq!(j.status, 200);
    let r = conn.request("GET", "/env", &[], b"").expect("GET /env");
    assert_eq!(env(&r.json(), "REQUEST_METHOD"), Some("GET"));
}

#[test]
fn invalid_status_and_headers_are_500_with_a_log_line() {
    let scratch = ScratchDir::new("badhdr");
    let server = start_responses(&scratch);
    for (path, token) in [
        ("/resp/bad_crlf_value", "crlf-token-1"),
        ("/resp/bad_lf_name", "crlf-token-2"),
        ("/resp/bad_nonlatin", "nonlatin-token-"),
        ("/resp/bad_status", "status-token"),
    ] {
        let since = server.error_log().len();
        let r = server.get(path);
        assert_status(&server, path, &r, 500);
        assert!(
            r.header("Injected").is_none() && !r.text().contains("should not be seen"),
            "{path}: a split header reached the client: {r:?}"
        );
        let log = {
            wait_until(LOG_WAIT, || {
                server.error_log_since(since).contains("responses.wsgi")
            });
            server.error_log_since(since)
        };
        assert!(
            log.to_ascii_lowercase().contains("header")
                || log.to_ascii_lowercase().contains("status"),
            "{path}: no log line about the bad header/status:\n{log}"
        );
        if !reference_mode() {
            assert!(
                log.contains(token),
                "{path}: the log line should show the value ({token}):\n{log}"
            );
        }
    }
    let r = server.get("/hello");
    assert_status(&server, "after the bad headers", &r, 200);
}

#[test]
fn headers_pass_through_set_cookie_kept_separate() {
    let scratch = ScratchDir::new("cookies");
    let server = start_responses(&scratch);
    let r = server.get("/resp/cookies");
    assert_status(&server, "/resp/cookies", &r, 200);
    assert_eq!(
        r.header_all("Set-Cookie"),
        vec![
            "a=1; Path=/",
            "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly",
            "c=3"
        ],
        "{r:?}"
    );
    assert_eq!(r.header("X-Other"), Some("between"));
    // A latin-1 header value goes out as its single byte (0xE9), not as UTF-8.
    let r = server.get("/resp/latin1_header");
    assert_status(&server, "/resp/latin1_header", &r, 200);
    assert_eq!(
        r.header("X-Latin"),
        Some("caf\u{FFFD}"),
        "one byte 0xE9 (shown lossily), not UTF-8's two: {r:?}"
    );
}

#[test]
fn location_is_handled_as_mod_cgi_does() {
    let scratch = ScratchDir::new("location");
    let server = start_responses(&scratch);
    // 200 + a local Location: Apache serves that path instead (internal redirect).
    let r = server.get("/resp/local_redirect");
    assert_status(&server, "local redirect", &r, 200);
    assert!(r.header("Location").is_none(), "{r:?}");
    let j = r.json();
    assert_eq!(env(&j, "SCRIPT_NAME"), Some("/env"));
    assert_eq!(env(&j, "PATH_INFO"), Some("/after-redirect"));
    assert_eq!(env(&j, "QUERY_STRING"), Some("from=redirect"));
    assert_eq!(env(&j, "REQUEST_METHOD"), Some("GET"));
    // A POST becomes a GET without a body.
    let r = server.request("POST", "/resp/local_redirect", &[], b"ignored body");
    assert_status(&server, "local redirect of a POST", &r, 200);
    let j = r.json();
    assert_eq!(env(&j, "REQUEST_METHOD"), Some("GET"), "{:?}", j["env"]);
    assert_eq!(j.str_of("body"), "");
    // Any other status passes through with its Location.
    let r = server.get("/resp/local_302");
    assert_status(&server, "302 with a local Location", &r, 302);
    assert!(
        r.header("Location").is_some_and(|l| l.ends_with("/env/y")),
        "{r:?}"
    );
    let r = server.get("/resp/abs_redirect");
    assert_status(&server, "302 with an absolute Location", &r, 302);
    assert_eq!(r.header("Location"), Some("http://example.com/elsewhere"));
}

// ---- wsgi.file_wrapper -------------------------------------------------------------------------

#[test]
fn file_wrapper_streams_64mib_in_bounded_memory() {
    let server = TestServer::start(
        "WSGIDaemonProcess files processes=1 threads=2\n\
         WSGIScriptAlias /fw @APPS@/filewrapper.wsgi process-group=files\n\
         WSGIScriptAlias /memory @APPS@/memory.wsgi process-group=files\n",
    );
    let len = 64 * MIB;
    let dir = server.root().join("data");
    fs::create_dir_all(&dir).expect("mkdir data");
    let file = dir.join("big.bin");
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(fs::File::create(&file).expect("create big.bin"));
        let mut pattern = Pattern::new(11, len);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = pattern.fill(&mut buf);
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).expect("write big.bin");
        }
    }
    let before = get_json(&server, "/memory");
    let daemon = before.u64_of("pid");
    for cl in ["1", "0"] {
        let mut check = PatternCheck::new(11, len);
        let started = Instant::now();
        let s = server
            .stream(
                "GET",
                &format!("/fw?path={}&cl={cl}", file.display()),
                &[],
                Body::Empty,
                |c| check.feed(c),
            )
            .unwrap_or_else(|e| {
                panic!("64 MiB file_wrapper (cl={cl}): {e}\n{}", server.error_log())
            });
        assert_eq!(s.status, 200, "{s:?}");
        if cl == "1" {
            assert_eq!(s.header("Content-Length"), Some(len.to_string().as_str()));
        }
        check.finish().expect("the file arrives unchanged");
        eprintln!(
            "64 MiB through wsgi.file_wrapper (cl={cl}) in {:?}",
            started.elapsed()
        );
    }
    let after = get_json(&server, "/memory");
    assert_eq!(after.u64_of("pid"), daemon, "the same daemon process");
    assert!(
        after.u64_of("hwm_kib") < 65536,
        "the daemon peaked at {} KiB serving a 64 MiB file: it was read into memory",
        after.u64_of("hwm_kib")
    );
}

#[test]
fn file_wrapper_with_file_likes_and_close() {
    let scratch = ScratchDir::new("fw");
    let server = TestServer::start(&format!(
        "WSGIDaemonProcess fwl processes=1 threads=2\n\
         SetEnv MARKER_DIR {}\n\
         WSGIScriptAlias /fw @APPS@/filewrapper.wsgi process-group=fwl\n",
        scratch.path().display()
    ));
    // A file-like without fileno().
    let r = server.get("/fw?kind=bytesio");
    assert_status(&server, "BytesIO", &r, 200);
    let mut want: Vec<u8> = (0..=255u8).cycle().take(256 * 390).collect();
    want.extend_from_slice(b"tail");
    assert_eq!(r.body.len(), want.len());
    assert!(r.body == want, "BytesIO body differs");
    // read()/close() only; the wrapper's close() calls the file-like's.
    let r = server.get("/fw?kind=reader&marker=fw1");
    assert_status(&server, "reader", &r, 200);
    assert_eq!(r.text(), "reader body ".repeat(1000));
    wait_marker(&scratch, "fw1", "file_wrapper's close()", &server);
    // A real file, Content-Length left out.
    let script = server.apps_dir().join("filewrapper.wsgi");
    let r = server.get(&format!("/fw?path={}&cl=0", script.display()));
    assert_status(&server, "small file", &r, 200);
    assert_eq!(r.body, fs::read(&script).expect("read the script"));
}

// ---- clients that go away ------------------------------------------------------------------------

const ONE_THREAD: &str = "WSGIDaemonProcess one processes=1 threads=1\n\
     SetEnv MARKER_DIR @SCRATCH@\n\
     WSGIScriptAlias /resp @APPS@/responses.wsgi process-group=one\n\
     WSGIScriptAlias /whoami @APPS@/whoami.wsgi process-group=one\n";

/// After the client went away, the only thread of the group must serve again.
fn assert_thread_freed(server: &TestServer, pid: u64) {
    let started = Instant::now();
    let r = server.try_request("GET", "/whoami", &[], b"");
    match r {
        Ok(r) if r.status == 200 => {
            assert_eq!(r.json().u64_of("pid"), pid, "the same daemon process");
        }
        other => panic!(
            "the group's only thread was not freed: {:?} after {:?}\n--- error_log ---\n{}",
            other.map(|r| r.status),
            started.elapsed(),
            server.error_log()
        ),
    }
}

#[test]
fn client_gone_mid_download_closes_iterable_and_frees_thread() {
    let scratch = ScratchDir::new("dl");
    let server =
        TestServer::start(&ONE_THREAD.replace("@SCRATCH@", &scratch.path().display().to_string()));
    let pid = get_json(&server, "/whoami").u64_of("pid");
    let mut conn = server.connect();
    conn.send("GET", "/resp/endless?marker=dl1", &[], b"")
        .expect("send");
    let mut got = 0usize;
    while got < MIB as usize {
        let piece = conn.read_some(65536).expect("read the download");
        assert!(!piece.is_empty(), "the server closed after {got} bytes");
        got += piece.len();
    }
    conn.abort();
    wait_marker(&scratch, "dl1", "a download the client abandoned", &server);
    assert_thread_freed(&server, pid);
}

#[test]
fn client_gone_mid_upload_closes_iterable_and_frees_thread() {
    let scratch = ScratchDir::new("ul");
    let server =
        TestServer::start(&ONE_THREAD.replace("@SCRATCH@", &scratch.path().display().to_string()));
    let pid = get_json(&server, "/whoami").u64_of("pid");
    let since = server.error_log().len();
    let mut conn = server.connect();
    conn.write_raw(
        conn.head(
            "POST",
            "/resp/upload?marker=ul1&announce=abandoned-upload",
            &[],
            100 * MIB,
        )
        .as_bytes(),
    )
    .expect("send head");
    let block = Pattern::to_vec(2, MIB);
    conn.write_raw(&block).expect("first MiB");
    expect_line(&server, since, &["upload-reading-started abandoned-upload"]);
    conn.write_raw(&block[..65536]).expect("a little more");
    thread::sleep(Duration::from_millis(200));
    conn.abort();
    wait_marker(&scratch, "ul1", "an upload the client abandoned", &server);
    assert_thread_freed(&server, pid);
}

// ---- the error log -------------------------------------------------------------------------------

const LOGS: &str = "WSGIDaemonProcess logsgrp processes=1 threads=2\n\
     WSGIScriptAlias /logs @APPS@/logs.wsgi process-group=logsgrp\n";

#[test]
fn stdout_stderr_wsgi_errors_and_logging_reach_the_error_log() {
    let server = TestServer::start(LOGS);
    let since = server.error_log().len();
    let r = server.get("/logs?tag=T22");
    assert_status(&server, "/logs", &r, 200);
    let pid = r
        .text()
        .strip_prefix("pid=")
        .and_then(|p| p.parse::<u32>().ok())
        .expect("pid=N");
    let pid_part = format!("[pid {pid}");
    for what in [
        "stdout-line T22",
        "stderr-line T22",
        "errors-line T22",
        "errors-lines-a T22",
        "errors-lines-b T22",
        "logging-warning T22",
        "logging-error T22",
    ] {
        let mut parts = vec![what, pid_part.as_str()];
        parts.extend(group_part("logsgrp"));
        expect_line(&server, since, &parts);
    }
    // One log line per line: no line holds two of them.
    let log = server.error_log_since(since);
    assert!(
        !log.lines()
            .any(|l| l.contains("errors-lines-a T22") && l.contains("errors-lines-b T22")),
        "writelines() lines were merged:\n{log}"
    );
}

#[test]
fn app_exception_logs_the_full_traceback_with_the_group() {
    let server = TestServer::start(LOGS);
    let since = server.error_log().len();
    let r = server.get("/logs?tag=T23&raise=1");
    assert_status(&server, "/logs?raise=1", &r, 500);
    assert!(
        !r.text().contains("deep-T23"),
        "the traceback reached the client"
    );
    let last = expect_line(&server, since, &["KeyError: 'deep-T23'"]);
    let log = server.error_log_since(since);
    let lines: Vec<&str> = log.lines().collect();
    let end = lines
        .iter()
        .position(|l| l.contains("KeyError: 'deep-T23'"))
        .expect("the exception line");
    let tb: Vec<&str> = lines[..end].iter().rev().take(30).copied().collect();
    for frame in [
        "Traceback (most recent call last)",
        "in application",
        "in level_one",
        "in level_two",
        "logs.wsgi",
    ] {
        assert!(
            tb.iter().any(|l| l.contains(frame)),
            "the traceback lacks {frame:?}:\n{log}"
        );
    }
    // Every line of it says which group (and Apache's [pid …]).
    for l in tb
        .iter()
        .filter(|l| l.contains("in level_"))
        .chain([&last.as_str()])
    {
        assert!(l.contains("[pid "), "no [pid …] in {l:?}");
        for g in group_part("logsgrp") {
            assert!(l.contains(g), "traceback line without the group: {l:?}");
        }
    }
}

// ---- limits on the request head -------------------------------------------------------------------

#[test]
fn big_header_and_many_headers() {
    let server = TestServer::start(
        "LimitRequestFieldSize 65536\n\
         LimitRequestFields 2000\n\
         WSGIDaemonProcess heads processes=1 threads=2\n\
         WSGIScriptAlias /env @APPS@/environ.wsgi process-group=heads\n",
    );
    let big: String = (0..40 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let r = server.request("GET", "/env", &[("X-Big", big.as_str())], b"");
    assert_status(&server, "a 40 KiB header", &r, 200);
    let j = r.json();
    assert_eq!(env(&j, "HTTP_X_BIG").map(str::len), Some(big.len()));
    assert!(
        env(&j, "HTTP_X_BIG") == Some(big.as_str()),
        "HTTP_X_BIG differs"
    );

    let owned: Vec<(String, String)> = (0..1000)
        .map(|i| (format!("X-H-{i:04}"), format!("value-{i:04}")))
        .collect();
    let headers: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r = server.request("GET", "/env", &headers, b"");
    assert_status(&server, "1000 headers", &r, 200);
    let j = r.json();
    let missing: Vec<String> = (0..1000)
        .filter(|i| env(&j, &format!("HTTP_X_H_{i:04}")) != Some(format!("value-{i:04}").as_str()))
        .map(|i| format!("HTTP_X_H_{i:04}"))
        .collect();
    assert!(
        missing.is_empty(),
        "{} headers missing: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

// ---- scripts: reloading, callable, preloading --------------------------------------------------------

fn reload_script(version: &str) -> String {
    format!(
        "import os\n\
         VERSION = {version:?}\n\
         \n\
         def application(environ, start_response):\n\
         \x20   body = ('%s pid=%d reloading=%s' % (VERSION, os.getpid(),\n\
         \x20           environ.get('mod_wsgi.script_reloading'))).encode('ascii')\n\
         \x20   start_response('200 OK', [('Content-Type', 'text/plain'),\n\
         \x20                             ('Content-Length', str(len(body)))])\n\
         \x20   return [body]\n"
    )
}

/// (version, pid, reloading) of a reload_script response.
fn reload_reply(server: &TestServer, path: &str) -> (String, u64, String) {
    let r = server.get(path);
    assert_status(server, path, &r, 200);
    let text = r.text();
    let mut parts = text.split(' ');
    let version = parts.next().unwrap_or("").to_string();
    let pid = parts
        .next()
        .and_then(|p| p.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad reply {text:?}"));
    let reloading = parts
        .next()
        .and_then(|p| p.strip_prefix("reloading="))
        .unwrap_or("")
        .to_string();
    (version, pid, reloading)
}

/// Polls until the script answers with `version` from a process other than `old_pid`; every
/// answer on the way must be a 200 (the restart is graceful).
fn wait_for_new_code(server: &TestServer, path: &str, version: &str, old_pid: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (v, pid, _) = reload_reply(server, path);
        if v == version && pid != old_pid {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "still {v} from pid {pid} (old pid {old_pid}) 20 s after the change\n--- error_log ---\n{}",
            server.error_log()
        );
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn script_reloading_restarts_the_daemon_with_new_code() {
    let server = TestServer::start_with_files(
        "WSGIDaemonProcess rel processes=1 threads=2\n\
         WSGIScriptAlias /app @ROOT@/reload/app.wsgi process-group=rel\n\
         <Directory @ROOT@/reload>\n\
             Require all granted\n\
         </Directory>\n",
        &[("reload/app.wsgi", reload_script("v1").as_str())],
    );
    let script = server.root().join("reload/app.wsgi");
    let (v, first, reloading) = reload_reply(&server, "/app");
    assert_eq!(v, "v1");
    assert_eq!(reloading, "1", "mod_wsgi.script_reloading (default On)");
    for _ in 0..3 {
        assert_eq!(
            reload_reply(&server, "/app").1,
            first,
            "no change, no restart"
        );
    }

    // Rewrite: a new process serves the new code.
    fs::write(&script, reload_script("v2")).expect("rewrite");
    set_mtime(&script, SystemTime::now() + Duration::from_secs(2));
    let second = wait_for_new_code(&server, "/app", "v2", first);
    assert!(
        wait_until(Duration::from_secs(15), || !pid_alive(first as u32)),
        "the old daemon process {first} is still alive"
    );

    // Touch: the same code, but still a restart.
    set_mtime(&script, SystemTime::now() + Duration::from_secs(4));
    let third = wait_for_new_code(&server, "/app", "v2", second);
    assert_ne!(third, first);
}

#[test]
fn script_reloading_off_keeps_the_old_code() {
    let server = TestServer::start_with_files(
        "WSGIDaemonProcess norel processes=1 threads=2\n\
         WSGIScriptAlias /app @ROOT@/reload/app.wsgi process-group=norel\n\
         <Directory @ROOT@/reload>\n\
             Require all granted\n\
             WSGIScriptReloading Off\n\
         </Directory>\n",
        &[("reload/app.wsgi", reload_script("v1").as_str())],
    );
    let script = server.root().join("reload/app.wsgi");
    let (v, pid, reloading) = reload_reply(&server, "/app");
    assert_eq!((v.as_str(), reloading.as_str()), ("v1", "0"));
    fs::write(&script, reload_script("v2")).expect("rewrite");
    set_mtime(&script, SystemTime::now() + Duration::from_secs(2));
    for _ in 0..6 {
        thread::sleep(Duration::from_millis(400));
        let (v, p, _) = reload_reply(&server, "/app");
        assert_eq!(
            (v.as_str(), p),
            ("v1", pid),
            "WSGIScriptReloading Off reloaded"
        );
    }
}

#[test]
fn callable_object_from_directive_option_and_htaccess() {
    let callable = app_source("callable.wsgi");
    let server = TestServer::start_with_files(
        "WSGIDaemonProcess calls processes=1 threads=2\n\
         Alias /ht/ @ROOT@/ht/\n\
         Alias /plain/ @ROOT@/plain/\n\
         <Directory @ROOT@/ht>\n\
             Options ExecCGI\n\
             AllowOverride FileInfo\n\
             AddHandler wsgi-script .wsgi\n\
             WSGIProcessGroup calls\n\
             Require all granted\n\
         </Directory>\n\
         <Directory @ROOT@/plain>\n\
             Options ExecCGI\n\
             AddHandler wsgi-script .wsgi\n\
             WSGIProcessGroup calls\n\
             Require all granted\n\
         </Directory>\n\
         WSGIScriptAlias /opt @APPS@/callable.wsgi process-group=calls callable-object=app2\n\
         WSGIScriptAlias /dir @APPS@/callable.wsgi process-group=calls\n\
         <Location /dir>\n\
             WSGICallableObject app2\n\
         </Location>\n",
        &[
            ("ht/callable.wsgi", callable.as_str()),
            ("ht/.htaccess", "WSGICallableObject app2\n"),
            ("plain/callable.wsgi", callable.as_str()),
        ],
    );
    for (path, want) in [
        ("/ht/callable.wsgi", "callable=app2"),
        ("/plain/callable.wsgi", "callable=application"),
        ("/opt", "callable=app2"),
        ("/dir", "callable=app2"),
    ] {
        let r = server.get(path);
        assert_status(&server, path, &r, 200);
        assert_eq!(r.text(), want, "{path}");
    }
}

#[test]
fn import_script_preloads_at_daemon_start() {
    let scratch = ScratchDir::new("preload");
    scratch.write("preload.wsgi", app_source("preload.wsgi"));
    let dir = scratch.path().display().to_string();
    let server = TestServer::start(&format!(
        "WSGIDaemonProcess pre processes=1 threads=2\n\
         WSGIImportScript {dir}/preload.wsgi process-group=pre application-group=%{{GLOBAL}}\n\
         WSGIScriptAlias /preload {dir}/preload.wsgi process-group=pre application-group=%{{GLOBAL}}\n\
         <Directory {dir}>\n\
             Require all granted\n\
         </Directory>\n"
    ));
    // No request yet: the daemon imported the script when it started.
    let marker = scratch
        .wait_for_file("preload-marker", Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!(
                "WSGIImportScript did not import the script at daemon start\n--- error_log ---\n{}",
                server.error_log()
            )
        });
    let pid: u64 = marker
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("marker {marker:?}"));
    assert_eq!(
        proc_info(pid as u32).map(|p| p.ppid),
        Some(server.pid()),
        "the importer is a daemon process of this Apache"
    );
    let r = server.get("/preload");
    assert_status(&server, "/preload", &r, 200);
    assert_eq!(
        r.text(),
        format!("pid={pid} imports=1"),
        "the request used the preloaded module (imported once)"
    );
}

/// As mod_wsgi: a WSGIScriptAlias naming both process-group= and application-group=
/// preloads its script when the group's daemons start; with process-group= alone, or with
/// WSGIScriptAliasMatch, the script loads at the first request.
#[test]
fn script_alias_with_both_groups_preloads_its_script() {
    let eager = ScratchDir::new("alias-preload");
    let lazy = ScratchDir::new("alias-lazy");
    let matched = ScratchDir::new("alias-match");
    for dir in [&eager, &lazy, &matched] {
        dir.write("preload.wsgi", app_source("preload.wsgi"));
    }
    let (e, l, m) = (
        eager.path().display(),
        lazy.path().display(),
        matched.path().display(),
    );
    let server = TestServer::start(&format!(
        "WSGIDaemonProcess eager processes=1 threads=2\n\
         WSGIDaemonProcess lazy processes=1 threads=2\n\
         WSGIDaemonProcess matched processes=1 threads=2\n\
         WSGIScriptAlias /eager {e}/preload.wsgi process-group=eager application-group=%{{GLOBAL}}\n\
         WSGIScriptAlias /again {e}/preload.wsgi process-group=eager application-group=%{{GLOBAL}}\n\
         WSGIScriptAlias /lazy {l}/preload.wsgi process-group=lazy\n\
         WSGIScriptAliasMatch ^/matched {m}/preload.wsgi process-group=matched application-group=%{{GLOBAL}}\n\
         <Directory {e}>\n    Require all granted\n</Directory>\n\
         <Directory {l}>\n    Require all granted\n</Directory>\n\
         <Directory {m}>\n    Require all granted\n</Directory>\n"
    ));
    let marker = eager
        .wait_for_file("preload-marker", Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!(
                "the aliased script was not preloaded\n--- error_log ---\n{}",
                server.error_log()
            )
        });
    let pid = marker.trim().to_string();
    // Each daemon logs its start once its preloads are done.
    for group in ["lazy", "matched"] {
        assert!(
            server.wait_for_log(
                &format!("Starting process '{group}'"),
                Duration::from_secs(15)
            ),
            "{group} did not start\n{}",
            server.error_log()
        );
    }
    assert!(lazy
        .wait_for_file("preload-marker", Duration::ZERO)
        .is_none());
    assert!(matched
        .wait_for_file("preload-marker", Duration::ZERO)
        .is_none());
    for path in ["/eager", "/again"] {
        let r = server.get(path);
        assert_status(&server, path, &r, 200);
        assert_eq!(
            r.text(),
            format!("pid={pid} imports=1"),
            "{path}: imported once, at start"
        );
    }
    for path in ["/lazy", "/matched"] {
        let r = server.get(path);
        assert_status(&server, path, &r, 200);
        assert!(r.text().ends_with("imports=1"), "{path}: {}", r.text());
    }
}

// ---- python-home, python-path ---------------------------------------------------------------------

fn module_file(j: &Json, name: &str) -> Option<String> {
    j["modules"][name].as_str().map(str::to_string)
}

#[test]
fn python_path_option_and_wsgipythonpath_default() {
    let server = TestServer::start_with_files(
        "WSGIPythonPath @ROOT@/pylib-global\n\
         WSGIDaemonProcess own processes=1 threads=2 python-path=@ROOT@/pylib\n\
         WSGIDaemonProcess dflt processes=1 threads=2\n\
         WSGIScriptAlias /own @APPS@/pyenv.wsgi process-group=own\n\
         WSGIScriptAlias /dflt @APPS@/pyenv.wsgi process-group=dflt\n",
        &[
            ("pylib/mod_wsgi_rs_pathmod.py", "VALUE = 'own'\n"),
            (
                "pylib-global/mod_wsgi_rs_globalmod.py",
                "VALUE = 'global'\n",
            ),
        ],
    );
    let root = server.root().display().to_string();
    let j = get_json(&server, "/own?modules=mod_wsgi_rs_pathmod");
    assert_eq!(
        module_file(&j, "mod_wsgi_rs_pathmod"),
        Some(format!("{root}/pylib/mod_wsgi_rs_pathmod.py")),
        "{j:?}"
    );
    // mod_wsgi 4.9 applies WSGIPythonPath to embedded mode only; SPEC §4 and README make it
    // the daemons' default too, so this part is ours alone.
    if reference_mode() {
        return;
    }
    let j = get_json(&server, "/dflt?modules=mod_wsgi_rs_globalmod");
    assert_eq!(
        module_file(&j, "mod_wsgi_rs_globalmod"),
        Some(format!("{root}/pylib-global/mod_wsgi_rs_globalmod.py")),
        "WSGIPythonPath is the default python-path: {j:?}"
    );
}

fn assert_from_venv(j: &Json, venv: &Path, what: &str) {
    let venv = venv.display().to_string();
    let six = module_file(j, "six");
    assert!(
        six.as_deref()
            .is_some_and(|f| f.starts_with(&format!("{venv}/"))),
        "{what}: six must come from the virtualenv {venv}, came from {six:?}\n\
         sys.prefix={:?} sys.path={:?}",
        j["prefix"],
        j["path"]
    );
    assert!(
        j["path"].as_array().is_some_and(|p| p
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.starts_with(&venv)))),
        "{what}: no virtualenv entry in sys.path: {:?}",
        j["path"]
    );
}

#[test]
fn python_home_selects_a_virtualenv() {
    let venv = require_venv!(&["six"]);
    let server = TestServer::start(&format!(
        "WSGIDaemonProcess venv processes=1 threads=2 python-home={}\n\
         WSGIDaemonProcess sys processes=1 threads=2\n\
         WSGIScriptAlias /venv @APPS@/pyenv.wsgi process-group=venv\n\
         WSGIScriptAlias /sys @APPS@/pyenv.wsgi process-group=sys\n",
        venv.display()
    ));
    let j = get_json(&server, "/venv?modules=six");
    assert_from_venv(&j, &venv, "python-home=");
    let j = get_json(&server, "/sys?modules=six");
    assert!(
        !module_file(&j, "six").is_some_and(|f| f.starts_with(&venv.display().to_string())),
        "a group without python-home used the virtualenv: {j:?}"
    );
}

#[test]
fn wsgipythonhome_is_the_default_python_home() {
    let venv = require_venv!(&["six"]);
    let server = TestServer::start(&format!(
        "WSGIPythonHome {}\n\
         WSGIDaemonProcess dflthome processes=1 threads=2\n\
         WSGIScriptAlias /venv @APPS@/pyenv.wsgi process-group=dflthome\n",
        venv.display()
    ));
    let j = get_json(&server, "/venv?modules=six");
    assert_from_venv(&j, &venv, "WSGIPythonHome");
}

// ---- application groups ------------------------------------------------------------------------------

#[test]
fn application_group_is_reported() {
    let server = TestServer::start(
        "WSGIDaemonProcess ag processes=1 threads=2\n\
         WSGIScriptAlias /ag1 @APPS@/whoami.wsgi process-group=ag\n\
         WSGIScriptAlias /ag2 @APPS@/whoami.wsgi process-group=ag application-group=%{GLOBAL}\n\
         WSGIScriptAlias /ag3 @APPS@/whoami.wsgi process-group=ag\n\
         WSGIScriptAlias /ag4 @APPS@/whoami.wsgi process-group=ag application-group=%{SERVER}\n\
         WSGIScriptAlias /AG5 @APPS@/whoami.wsgi process-group=ag\n\
         WSGIScriptAlias /ag6 @APPS@/whoami.wsgi process-group=ag\n\
         <Location /ag3>\n\
             WSGIApplicationGroup custom-app-group\n\
         </Location>\n\
         <Location /ag6>\n\
             SetEnv APPGRP from-env\n\
             WSGIApplicationGroup %{ENV:APPGRP}\n\
         </Location>\n",
    );
    let server_form = format!("127.0.0.1:{}", server.port());
    for (path, want) in [
        ("/ag1", format!("{server_form}|/ag1")),
        ("/ag2", String::new()),
        ("/ag3", "custom-app-group".to_string()),
        ("/ag4", server_form.clone()),
        ("/AG5", format!("{server_form}|/ag5")),
        ("/ag6", "from-env".to_string()),
    ] {
        let j = get_json(&server, path);
        assert_eq!(j.str_of("application_group"), want, "{path}: {j:?}");
    }
}

// ---- wsgiref.validate -------------------------------------------------------------------------------

#[test]
fn wsgiref_validator_finds_nothing() {
    let scratch = ScratchDir::new("validated");
    let server = TestServer::start(&format!(
        "WSGIDaemonProcess val processes=1 threads=4\n\
         SetEnv MARKER_DIR {}\n\
         WSGIScriptAlias /validated @APPS@/validated.wsgi process-group=val\n\
         <Location /validated/read>\n\
             WSGIChunkedRequest On\n\
         </Location>\n\
         Listen 127.0.0.1:@PORT2@\n\
         <VirtualHost 127.0.0.1:@PORT2@>\n\
             ServerName root.example\n\
             WSGIScriptAlias / @APPS@/validated.wsgi process-group=val\n\
         </VirtualHost>\n",
        scratch.path().display()
    ));
    let since = server.error_log().len();
    let check = |what: &str, r: &Response, status: u16| {
        assert_eq!(
            r.status,
            status,
            "{what}: {r:?}\n--- error_log ---\n{}",
            server.error_log_since(since)
        );
    };

    let r = server.get("/validated/env");
    check("env", &r, 200);
    let j = r.json();
    assert_eq!(
        (j.str_of("script_name"), j.str_of("path_info")),
        ("/validated", "/env")
    );
    for (path, path_info) in [("/", "/"), ("/env", "/env")] {
        let r = http_request(
            server.addr2(),
            "GET",
            path,
            &[("Host", "root.example")],
            b"",
        )
        .unwrap_or_else(|e| panic!("GET {path} on the / mount: {e}"));
        check(&format!("{path} on the / mount"), &r, 200);
        let j = r.json();
        assert_eq!(
            (j.str_of("script_name"), j.str_of("path_info")),
            ("", path_info)
        );
    }

    let text = "first line\nsecond line\nthird\n";
    let r = server.request("POST", "/validated/input", &[], text.as_bytes());
    check("input", &r, 200);
    assert_eq!(
        pieces(&r.json()),
        vec!["first line\n", "seco", "nd li", "ne\n", "third\n"]
    );
    let r = server.request("POST", "/validated/iter", &[], text.as_bytes());
    check("iter", &r, 200);
    assert_eq!(r.json()["lines"].as_array().map(<[Json]>::len), Some(3));
    let data = Pattern::to_vec(5, 300 * 1024 + 1);
    for chunked in [false, true] {
        let headers: &[(&str, &str)] = if chunked {
            &[("Transfer-Encoding", "chunked")]
        } else {
            &[]
        };
        let r = server.request("POST", "/validated/read", headers, &data);
        check(&format!("read (chunked: {chunked})"), &r, 200);
        let j = r.json();
        assert_eq!(j.u64_of("total"), data.len() as u64);
        assert_eq!(j.u64_of("crc32"), u64::from(crc32(&data)));
    }
    let r = server.request("POST", "/validated/read", &[], b"");
    check("read (empty)", &r, 200);
    assert_eq!(r.json().u64_of("total"), 0);

    for (path, body) in [
        ("/validated/write", "written returned"),
        ("/validated/generator", "one two"),
        ("/validated/empty", ""),
        ("/validated/errors", "logged"),
        ("/validated/close", "closing"),
    ] {
        let r = server.get(path);
        check(path, &r, 200);
        assert_eq!(r.text(), body, "{path}");
    }
    wait_marker(&scratch, "validated-closed", "validated /close", &server);
    let r = server.get("/validated/file");
    check("file", &r, 200);
    let source = fs::read(server.apps_dir().join("validated.wsgi")).expect("source");
    assert_eq!(r.body, source);
    assert_eq!(
        r.header("Content-Length"),
        Some(source.len().to_string().as_str())
    );
    let r = server.get("/validated/exc");
    check("exc_info", &r, 500);
    assert_eq!(r.text(), "replaced by exc_info");
    let r = server.get("/validated/cookies");
    check("cookies", &r, 200);
    assert_eq!(r.header_all("Set-Cookie"), vec!["a=1", "b=2"]);
    let r = server.get("/validated/redirect");
    check("redirect", &r, 302);
    assert_eq!(r.header("Location"), Some("http://example.com/validated"));
    for path in ["/validated/generator", "/validated/file", "/validated/env"] {
        let r = server.request("HEAD", path, &[], b"");
        check(&format!("HEAD {path}"), &r, 200);
    }
    let r = server.request("OPTIONS", "/validated/env", &[], b"");
    check("OPTIONS", &r, 200);

    expect_line(&server, since, &["validated errors line"]);
    // Give a late validator complaint (an iterator collected without close()) time to land.
    thread::sleep(Duration::from_millis(500));
    let log = server.error_log_since(since);
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("Warning")
                || l.contains("AssertionError")
                || l.contains("garbage collected")
                || l.contains("Traceback")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "wsgiref.validate complained:\n{}\n--- error_log (new part) ---\n{log}",
        bad.join("\n")
    );
}
