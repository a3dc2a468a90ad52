//! Self-tests of the integration-test harness (tests/common), none of which needs the module:
//! plain Apache started and stopped from a throwaway ServerRoot, the HTTP client against a
//! scripted in-process server (chunked, truncated, interim and streamed responses), the
//! Rust/Python pattern generators agreeing byte for byte, and the test apps themselves run
//! under Python's wsgiref.

#[macro_use]
mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

#[test]
fn plain_apache_serves_static_files_and_stops_cleanly() {
    let index = "<html>index of the harness self-test</html>\n";
    let data = "plain text served by Apache without mod_wsgi_rs\n";
    let mut server = TestServer::start_without_module_with_files(
        "# no fragment: static files only\n",
        &[("htdocs/index.html", index), ("htdocs/data.txt", data)],
    );
    let conf = server.conf_path().display().to_string();
    assert!(server.pid() > 0);
    assert!(pid_alive(server.pid()));

    let r = server.get("/data.txt");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), data);
    assert_eq!(r.header("Content-Type"), Some("text/plain"), "{r:?}");
    assert_eq!(
        r.header("Content-Length"),
        Some(data.len().to_string().as_str())
    );

    let r = server.get("/");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), index);

    let r = server.request("HEAD", "/data.txt", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());

    let r = server.get("/no-such-file.txt");
    assert_eq!(r.status, 404, "{r:?}");
    // LogLevel info logs the miss (AH00128), so the error log is live and readable.
    server.expect_log("no-such-file.txt", Duration::from_secs(5));
    let log = server.error_log();
    assert!(log.contains("resuming normal operations"), "{log}");

    // The server's processes: the parent and at least one child, all naming our httpd.conf.
    let procs = server.processes();
    assert!(procs.iter().any(|p| p.pid == server.pid()), "{procs:?}");
    assert!(procs.len() >= 2, "expected parent + children: {procs:?}");
    assert!(!processes_matching(&conf).is_empty());
    for p in &procs {
        assert!(
            rss_kib(p.pid).is_some() && hwm_kib(p.pid).is_some(),
            "{p:?}"
        );
    }

    // Graceful restart keeps the same parent and keeps serving.
    let parent = server.pid();
    server.graceful();
    assert_eq!(server.pid(), parent);
    assert_eq!(server.get("/data.txt").text(), data);

    let report = server.stop();
    assert!(!report.forced, "{report:?}");
    assert!(report.survivors.is_empty(), "{report:?}");
    assert!(!pid_alive(parent));
    for p in &procs {
        assert!(!p.still_alive(), "process survived the stop: {p:?}");
    }
    assert!(
        processes_matching(&conf).is_empty(),
        "{:?}",
        processes_matching(&conf)
    );
    assert!(TcpStream::connect_timeout(&server.addr(), Duration::from_millis(300)).is_err());
    assert!(server.socket_files().is_empty());
    eprintln!("stopped in {:?}", report.elapsed);
}

#[test]
fn config_test_reports_syntax_ok_and_errors() {
    let (ok, out) = config_test_with("", false);
    assert!(ok, "{out}");
    assert!(out.contains("Syntax OK"), "{out}");
    let (ok, out) = config_test_with("NoSuchDirectiveAnywhere on\n", false);
    assert!(!ok, "{out}");
    assert!(
        out.contains("Invalid command 'NoSuchDirectiveAnywhere'"),
        "{out}"
    );
}

#[test]
fn two_servers_run_side_by_side() {
    let a = TestServer::start_without_module_with_files("", &[("htdocs/who.txt", "a")]);
    let b = TestServer::start_without_module_with_files("", &[("htdocs/who.txt", "b")]);
    assert_ne!(a.port(), b.port());
    assert_ne!(a.root(), b.root());
    assert_eq!(a.get("/who.txt").text(), "a");
    assert_eq!(b.get("/who.txt").text(), "b");
    // Both stopped by Drop.
}

// ---- the HTTP client against a scripted server ---------------------------------------------

/// What the scripted server does with one connection: (stream, request head).
type Handler = Box<dyn FnOnce(&mut TcpStream, &[u8]) + Send>;

/// Serves one connection per script entry: reads the request head (and a Content-Length
/// body), then runs the script's handler on the stream.
fn scripted_server(handlers: Vec<Handler>) -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        for handler in handlers {
            let (mut stream, _) = listener.accept().expect("accept");
            let head = read_head(&mut stream);
            handler(&mut stream, &head);
        }
    });
    (addr, handle)
}

fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    head
}

fn content_length(head: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(head);
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

#[test]
fn client_decodes_and_detects_incomplete_bodies() {
    let handlers: Vec<Handler> = vec![
        // 1: chunked, with an extension and a trailer.
        Box::new(|s, head| {
            assert!(head.starts_with(b"GET /chunked HTTP/1.1\r\n"));
            let text = String::from_utf8_lossy(head);
            assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
            assert!(text.contains("\r\nX-Test: 1\r\n"), "{text}");
            s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n\
                  5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            )
            .expect("write");
        }),
        // 2: chunked, closed after the first chunk.
        Box::new(|s, _| {
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .expect("write");
        }),
        // 3: Content-Length 10, only 4 bytes.
        Box::new(|s, _| {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")
                .expect("write");
        }),
        // 4: closed without a response.
        Box::new(|_, _| {}),
        // 5: 100 Continue, then a close-delimited body.
        Box::new(|s, _| {
            s.write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 201 Created\r\nX-A: b\r\n\r\nuntil close",
            )
            .expect("write");
        }),
        // 6: Content-Length body complete.
        Box::new(|s, _| {
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nabc")
                .expect("write");
        }),
    ];
    let (addr, server) = scripted_server(handlers);

    let r =
        http_request(addr, "GET", "/chunked", &[("X-Test", "1")], b"").expect("chunked response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    assert_eq!(r.header_all("set-cookie"), vec!["a=1", "b=2"]);

    let e =
        http_request(addr, "GET", "/", &[], b"").expect_err("truncated chunked must be an error");
    assert!(e.is_incomplete(), "{e}");
    match e {
        HttpError::Incomplete {
            status,
            received,
            expected,
            ..
        } => {
            assert_eq!((status, received, expected), (200, 5, None));
        }
        other => panic!("{other}"),
    }

    let e = http_request(addr, "GET", "/", &[], b"")
        .expect_err("short Content-Length must be an error");
    match e {
        HttpError::Incomplete {
            status,
            received,
            expected,
            ..
        } => {
            assert_eq!((status, received, expected), (200, 4, Some(10)));
        }
        other => panic!("{other}"),
    }

    let e = http_request(addr, "GET", "/", &[], b"").expect_err("no response must be an error");
    assert!(e.is_no_response(), "{e}");

    let r = http_request(addr, "GET", "/", &[], b"").expect("interim 100 then 201");
    assert_eq!(r.status, 201);
    assert_eq!(r.reason, "Created");
    assert_eq!(r.header("x-a"), Some("b"));
    assert_eq!(r.text(), "until close");

    let r = http_request(addr, "GET", "/", &[], b"").expect("503 is a response, not an error");
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "abc");

    server.join().expect("scripted server");
}

#[test]
fn client_streams_a_generated_body_while_reading_the_echo() {
    const LEN: u64 = 8 * 1024 * 1024 + 12345;
    let handlers: Vec<Handler> = vec![
        // A streaming echo with chunked response: answers each 32 KiB as soon as it arrives,
        // so the exchange only completes if the client sends and reads at the same time.
        Box::new(|s, head| {
            let len = content_length(head);
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .expect("write");
            let mut buf = vec![0u8; 32768];
            let mut left = len;
            while left > 0 {
                let n = s
                    .read(&mut buf[..left.min(32768) as usize])
                    .expect("read body");
                assert!(n > 0, "client stopped sending with {left} bytes left");
                s.write_all(format!("{n:x}\r\n").as_bytes()).expect("write");
                s.write_all(&buf[..n]).expect("write");
                s.write_all(b"\r\n").expect("write");
                left -= n as u64;
            }
            s.write_all(b"0\r\n\r\n").expect("write");
        }),
        // A chunked request body: the server collects the raw chunked stream and answers with
        // its de-chunked length.
        Box::new(|s, head| {
            let text = String::from_utf8_lossy(head).to_string();
            assert!(text.contains("Transfer-Encoding: chunked"), "{text}");
            assert!(
                !text.to_ascii_lowercase().contains("content-length"),
                "{text}"
            );
            let mut reader = BufReader::new(s.try_clone().expect("clone"));
            let mut total = 0u64;
            let mut check = PatternCheck::new(3, 300_000);
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("size line");
                let size = u64::from_str_radix(line.trim(), 16).expect("hex size");
                let mut data = vec![0u8; size as usize + 2];
                reader.read_exact(&mut data).expect("chunk");
                assert!(data.ends_with(b"\r\n"));
                if size == 0 {
                    break;
                }
                check.feed(&data[..size as usize]);
                total += size;
            }
            check
                .finish()
                .expect("chunked request body matches the pattern");
            let body = total.to_string();
            s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .expect("write");
        }),
    ];
    let (addr, server) = scripted_server(handlers);

    let mut check = PatternCheck::new(42, LEN);
    let mut pieces = 0u64;
    let s = http_stream(
        addr,
        "POST",
        "/echo",
        &[],
        Body::Pattern { seed: 42, len: LEN },
        |chunk| {
            pieces += 1;
            check.feed(chunk);
        },
    )
    .expect("streamed echo");
    assert_eq!(s.status, 200);
    assert_eq!(s.sent, LEN);
    assert_eq!(s.body_len, LEN);
    assert!(s.send_error.is_none(), "{:?}", s.send_error);
    check.finish().expect("echo matches the pattern");
    assert!(pieces > 1);

    let r = http_stream(
        addr,
        "POST",
        "/chunked-upload",
        &[("Transfer-Encoding", "chunked")],
        Body::Pattern {
            seed: 3,
            len: 300_000,
        },
        |_| {},
    )
    .expect("chunked upload");
    assert_eq!(r.status, 200);
    assert_eq!(r.sent, 300_000);
    server.join().expect("scripted server");

    // The checker notices a flipped byte, a short body and an extra byte.
    let mut good = Pattern::to_vec(9, 200_000);
    let mut c = PatternCheck::new(9, 200_000);
    c.feed(&good);
    assert!(c.finish().is_ok());
    good[131_073] ^= 1;
    let mut c = PatternCheck::new(9, 200_000);
    for piece in good.chunks(7777) {
        c.feed(piece);
    }
    assert_eq!(c.mismatch_at(), Some(131_073));
    let mut c = PatternCheck::new(9, 200_000);
    c.feed(&Pattern::to_vec(9, 199_999));
    assert!(c.finish().is_err());
    let mut c = PatternCheck::new(9, 10);
    c.feed(&Pattern::to_vec(9, 11));
    assert_eq!(c.mismatch_at(), Some(10));
}

// ---- the Python side of the pattern and the apps -------------------------------------------

#[test]
fn rust_and_python_patterns_agree() {
    for (seed, len) in [
        (1u64, 65536u64 * 3 + 5),
        (7, 200_000),
        (42, 1000),
        (0, 70000),
    ] {
        let script = format!(
            "import importlib.machinery, sys\n\
             m = importlib.machinery.SourceFileLoader('stream_app', {path:?}).load_module()\n\
             sys.stdout.buffer.write(b''.join(m.pattern_chunks({seed}, {len})))\n",
            path = apps_source_dir().join("stream.wsgi").display().to_string(),
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected = Pattern::to_vec(seed, len);
        assert_eq!(out.stdout.len(), expected.len(), "seed {seed}");
        let first_diff = out.stdout.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!(
            first_diff, None,
            "seed {seed}: Python and Rust patterns differ"
        );
        let mut c = PatternCheck::new(seed, len);
        c.feed(&out.stdout);
        c.finish().expect("checker agrees");
    }
}

/// Python's wsgiref serving every tests/apps script at /<name>.wsgi (killed on drop).
struct WsgirefServer {
    child: Child,
    addr: SocketAddr,
}

impl WsgirefServer {
    fn start() -> WsgirefServer {
        let script = format!(
            r#"
import importlib.machinery, os, sys, traceback
from wsgiref.simple_server import make_server, WSGIRequestHandler
APPS = {apps:?}
cache = {{}}
def load(name):
    if name not in cache:
        path = os.path.join(APPS, name)
        cache[name] = importlib.machinery.SourceFileLoader(name.replace('.', '_'), path).load_module()
    return cache[name]
def dispatch(environ, start_response):
    name = environ['PATH_INFO'].strip('/').split('/')[0]
    if not name.endswith('.wsgi') or not os.path.exists(os.path.join(APPS, name)):
        start_response('404 Not Found', [('Content-Type', 'text/plain')])
        return [b'no such app']
    callable_name = environ.get('QUERY_STRING', '') if name == 'callable.wsgi' else 'application'
    app = getattr(load(name), callable_name or 'application', None)
    if app is None:
        start_response('500 Internal Server Error', [('Content-Type', 'text/plain')])
        return [b'no application']
    return app(environ, start_response)
class Quiet(WSGIRequestHandler):
    def log_message(self, *a): pass
httpd = make_server('127.0.0.1', 0, dispatch, handler_class=Quiet)
print(httpd.server_port, flush=True)
httpd.serve_forever()
"#,
            apps = apps_source_dir().display().to_string()
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("port line");
        let port: u16 = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("wsgiref did not start: {line:?} {err}")
        });
        WsgirefServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for WsgirefServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn test_apps_behave_under_wsgiref() {
    let server = WsgirefServer::start();
    let addr = server.addr;

    let r = http_request(addr, "GET", "/hello.wsgi", &[], b"").expect("hello");
    assert_eq!((r.status, r.text().as_str()), (200, "Hello World!"));
    assert_eq!(r.header("content-type"), Some("text/plain"));

    let r = http_request(addr, "GET", "/whoami.wsgi/a/b?x=1", &[], b"").expect("whoami");
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(j.u64_of("pid"), server.child.id() as u64);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!(j.u64_of("uid"), uid as u64);
    assert_eq!(j.u64_of("euid"), uid as u64);
    assert_eq!(j.u64_of("gid"), gid as u64);
    assert_eq!(j["setuid0_refused"].as_bool(), Some(!is_root()));
    assert!(j["process_group"].is_null(), "not under mod_wsgi: {j:?}");
    assert_eq!(j.str_of("path_info"), "/whoami.wsgi/a/b");
    assert_eq!(j.str_of("query_string"), "x=1");
    let _groups = j.u64_list_of("groups");

    // A streamed pattern, with and without Content-Length.
    for (query, len, with_cl) in [
        ("bytes=3000000&seed=5", 3_000_000u64, true),
        ("bytes=1048579&cl=0", 1_048_579, false),
    ] {
        let seed = if query.contains("seed=5") { 5 } else { 1 };
        let mut check = PatternCheck::new(seed, len);
        let s = http_stream(
            addr,
            "GET",
            &format!("/stream.wsgi?{query}"),
            &[],
            Body::Empty,
            |c| check.feed(c),
        )
        .expect("stream");
        assert_eq!(s.status, 200);
        assert_eq!(s.header("content-length").is_some(), with_cl, "{s:?}");
        check.finish().expect("stream.wsgi body");
    }

    // The echo, streamed both ways.
    let len = 2 * 1024 * 1024 + 17;
    let mut check = PatternCheck::new(11, len);
    let s = http_stream(
        addr,
        "POST",
        "/echo.wsgi",
        &[],
        Body::Pattern { seed: 11, len },
        |c| check.feed(c),
    )
    .expect("echo");
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-length"), Some(len.to_string().as_str()));
    check.finish().expect("echo.wsgi body");

    let r = http_request(addr, "GET", "/memory.wsgi", &[], b"").expect("memory");
    let j = r.json();
    assert_eq!(j.u64_of("pid"), server.child.id() as u64);
    assert!(
        j.u64_of("hwm_kib") >= j.u64_of("rss_kib") && j.u64_of("rss_kib") > 0,
        "{j:?}"
    );
    // VmHWM only grows: what /proc shows now is at least what the app reported.
    assert!(hwm_kib(server.child.id()).expect("VmHWM") >= j.u64_of("hwm_kib"));

    let r = http_request(addr, "GET", "/error.wsgi", &[], b"").expect("error");
    assert_eq!(r.status, 500);
    let r = http_request(addr, "GET", "/noapp.wsgi", &[], b"").expect("noapp");
    assert_eq!(r.status, 500);
    let r = http_request(addr, "GET", "/callable.wsgi", &[], b"").expect("callable");
    assert_eq!(r.text(), "callable=application");
    let r = http_request(addr, "GET", "/callable.wsgi?app2", &[], b"").expect("callable app2");
    assert_eq!(r.text(), "callable=app2");
}

#[test]
fn users_and_processes_are_visible() {
    let me = std::process::id();
    let info = proc_info(me).expect("own /proc entry");
    assert_eq!(info.pid, me);
    assert!(!info.cmdline.is_empty());
    assert!(pids_of_user(info.uid).contains(&me));
    assert!(rss_kib(me).expect("VmRSS") > 0);
    assert!(hwm_kib(me).expect("VmHWM") >= rss_kib(me).expect("VmRSS") / 2);
    let root = lookup_user("root").expect("root exists");
    assert_eq!((root.uid, root.gid), (0, 0));
    assert!(lookup_user("nosuchuser_xyz").is_none());
    assert_eq!(group_gid("root"), Some(0));
    assert!(group_list("root", 0).contains(&0));
    assert_eq!(lookup_uid(0).map(|u| u.name), Some("root".to_string()));
}
