//! Real frameworks, unchanged, in a daemon group (SPEC §8: "Real frameworks (Flask, Django)
//! run unchanged"): Flask and Django installed from PyPI into a virtualenv that the group
//! selects with python-home=, serving routes, form POSTs, 20 MiB multipart uploads (checked
//! on the server side against the CRC-32 the client computed), JSON, cookies, redirects,
//! 404s and app errors, with processes=1 threads=4.
//!
//! The virtualenv is made once per machine (`ensure_venv`: /tmp/mod_wsgi_rs-venv-<hash>,
//! readable by all, under a lock so parallel tests wait for one another; up to 5 minutes the
//! first time). Without PyPI the tests skip loudly.

#[macro_use]
mod common;

use common::*;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

const FRAMEWORKS: &[&str] = &["flask", "django"];
const LOG_WAIT: Duration = Duration::from_secs(10);
const UPLOAD_LEN: u64 = 20 * 1024 * 1024;

fn assert_status(server: &TestServer, what: &str, r: &Response, status: u16) {
    assert_eq!(
        r.status,
        status,
        "{what}: {r:?}\n--- error_log ---\n{}",
        server.error_log()
    );
}

fn json(text: &str) -> Json {
    Json::parse(text).unwrap_or_else(|e| panic!("bad expected JSON {text:?}: {e}"))
}

/// `j` with every object's keys sorted, so that equality ignores key order.
fn canon(j: &Json) -> Json {
    match j {
        Json::Obj(items) => {
            let mut items: Vec<(String, Json)> =
                items.iter().map(|(k, v)| (k.clone(), canon(v))).collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Obj(items)
        }
        Json::Arr(items) => Json::Arr(items.iter().map(canon).collect()),
        other => other.clone(),
    }
}

/// Asserts two JSON values are equal whatever the order of object keys.
fn assert_json_eq(got: &Json, want: &str, what: &str) {
    assert_eq!(canon(got), canon(&json(want)), "{what}");
}

fn start(group: &str, prefix: &str, app: &str, venv: &Path) -> TestServer {
    TestServer::start(&format!(
        "WSGIDaemonProcess {group} processes=1 threads=4 python-home={venv}\n\
         WSGIScriptAlias /{prefix} @APPS@/{app} process-group={group} application-group=%{{GLOBAL}}\n",
        venv = venv.display()
    ))
}

/// A multipart/form-data body: text fields, then one file field.
fn multipart(boundary: &str, fields: &[(&str, &str)], file: (&str, &str, &[u8])) -> Vec<u8> {
    let mut body = Vec::with_capacity(file.2.len() + 1024);
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    let (name, filename, data) = file;
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// Everything both frameworks must do the same way, under /`prefix`.
fn exercise(server: &TestServer, prefix: &str, name: &str, venv: &Path) {
    let venv_s = venv.display().to_string();
    let p = |rest: &str| format!("/{prefix}{rest}");

    // The framework really comes from the virtualenv.
    let r = server.get(&p("/"));
    assert_status(server, "index", &r, 200);
    assert_eq!(r.text(), format!("Hello from {name}"));
    let r = server.get(&p("/info"));
    assert_status(server, "info", &r, 200);
    let info = r.json();
    let file_key = format!("{}_file", name.to_ascii_lowercase());
    assert!(
        info.str_of(&file_key).starts_with(&format!("{venv_s}/")),
        "{name} was not imported from the virtualenv {venv_s}: {info:?}"
    );

    // A route with a converter, a UTF-8 query string and SCRIPT_NAME honoured.
    let r = server.get(&p("/items/42?a=1&a=2&b=%C3%A9+x"));
    assert_status(server, "item", &r, 200);
    let j = r.json();
    assert_eq!(j.u64_of("id"), 42);
    assert_eq!(j.str_of("path"), p("/items/42"));
    assert_json_eq(
        &j["args"],
        r#"{"a": ["1", "2"], "b": ["\u00e9 x"]}"#,
        "query args",
    );
    assert!(
        j.str_of("url").starts_with(&format!(
            "http://127.0.0.1:{}{}",
            server.port(),
            p("/items/42")
        )),
        "{j:?}"
    );

    // A urlencoded form POST.
    let r = server.request(
        "POST",
        &p("/form"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"name=J%C3%B6rg&tags=a&tags=b&empty=",
    );
    assert_status(server, "form", &r, 200);
    assert_json_eq(
        &r.json()["fields"],
        r#"{"name": ["J\u00f6rg"], "tags": ["a", "b"], "empty": [""]}"#,
        "form fields",
    );

    // A 20 MiB multipart upload, checked on the server side.
    let data = Pattern::to_vec(77, UPLOAD_LEN);
    let crc = crc32(&data);
    let boundary = "----mod_wsgi_rs-boundary-7MA4YWxkTrZu0gW";
    let crc_s = crc.to_string();
    let body = multipart(
        boundary,
        &[("note", "twenty mebibytes"), ("crc32", crc_s.as_str())],
        ("file", "big.bin", &data),
    );
    drop(data);
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let started = Instant::now();
    let r = server.request(
        "POST",
        &p("/upload"),
        &[("Content-Type", content_type.as_str())],
        &body,
    );
    assert_status(server, "20 MiB upload", &r, 200);
    let j = r.json();
    eprintln!("{name}: 20 MiB multipart upload in {:?}", started.elapsed());
    assert_eq!(j.u64_of("size"), UPLOAD_LEN, "{j:?}");
    assert_eq!(j.u64_of("crc32"), u64::from(crc), "{j:?}");
    assert_eq!(j["ok"].as_bool(), Some(true), "server-side check: {j:?}");
    assert_eq!(j.str_of("filename"), "big.bin");
    assert_eq!(j.str_of("note"), "twenty mebibytes");
    assert_eq!(j.str_of("sha256").len(), 64);

    // JSON in, JSON out.
    let r = server.request(
        "POST",
        &p("/json"),
        &[("Content-Type", "application/json")],
        br#"{"numbers": [1, 2, 3.5], "name": "caf\u00e9"}"#,
    );
    assert_status(server, "json", &r, 200);
    let j = r.json();
    assert_eq!(j["total"], Json::Num(6.5));
    assert_eq!(j["received"]["name"].as_str(), Some("café"));

    // Cookies: two Set-Cookie headers, kept apart; sent back, read back.
    let r = server.get(&p("/cookie/set"));
    assert_status(server, "cookie/set", &r, 200);
    let cookies = r.header_all("Set-Cookie");
    assert_eq!(cookies.len(), 2, "{r:?}");
    assert!(cookies[0].starts_with("flavour=oatmeal"), "{cookies:?}");
    assert!(
        cookies[1].starts_with("colour=blue") && cookies[1].contains("HttpOnly"),
        "{cookies:?}"
    );
    let r = server.request(
        "GET",
        &p("/cookie/get"),
        &[("Cookie", "flavour=oatmeal; colour=blue")],
        b"",
    );
    assert_status(server, "cookie/get", &r, 200);
    assert_json_eq(
        &r.json()["cookies"],
        r#"{"flavour": "oatmeal", "colour": "blue"}"#,
        "cookies",
    );

    // A redirect to the app's root, which includes the mount point.
    let r = server.get(&p("/redirect"));
    assert_status(server, "redirect", &r, 302);
    let location = r.header("Location").unwrap_or("").to_string();
    assert!(
        location.ends_with(&p("/")),
        "Location {location:?} should name {}",
        p("/")
    );
    let r = server.get(&p("/"));
    assert_status(server, "following the redirect", &r, 200);

    // A 404 from the framework, and an app error: 500, traceback in the log.
    let r = server.get(&p("/no/such/page"));
    assert_status(server, "404", &r, 404);
    let since = server.error_log().len();
    let r = server.get(&p("/boom"));
    assert_status(server, "boom", &r, 500);
    let marker = format!("{}-boom", name.to_ascii_lowercase());
    assert!(!r.text().contains(&marker), "the error reached the client");
    assert!(
        wait_until(LOG_WAIT, || {
            let log = server.error_log_since(since);
            log.contains(&marker) && log.contains("Traceback")
        }),
        "no traceback with {marker:?} in the error log:\n{}",
        server.error_log_since(since)
    );

    // threads=4: eight concurrent requests all succeed.
    let addr = server.addr();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let path = p(&format!("/items/{i}"));
            thread::spawn(move || http_request(addr, "GET", &path, &[], b"").map(|r| r.status))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().expect("client thread") {
            Ok(200) => {}
            other => panic!(
                "concurrent request {i}: {other:?}\n--- error_log ---\n{}",
                server.error_log()
            ),
        }
    }
}

#[test]
fn flask_app_in_a_virtualenv() {
    let venv = require_venv!(FRAMEWORKS);
    let server = start("flask", "flask", "flask_app.wsgi", &venv);
    exercise(&server, "flask", "Flask", &venv);
}

#[test]
fn django_app_in_a_virtualenv() {
    let venv = require_venv!(FRAMEWORKS);
    let server = start("django", "django", "django_app.wsgi", &venv);
    exercise(&server, "django", "Django", &venv);
    // Django's CSRF middleware is live: a POST to a protected view without a token is 403.
    let r = server.request(
        "POST",
        "/django/protected",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"a=1",
    );
    assert_status(&server, "CSRF-protected POST without a token", &r, 403);
    let j = server.get("/django/info").json();
    assert_eq!(j.str_of("script_name"), "/django");
    assert_eq!(j.str_of("path_info"), "/info");
}
