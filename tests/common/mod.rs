//! Integration-test harness: renders `apache-conf/tests/base.conf.in` into a throwaway
//! ServerRoot, runs the real `/usr/sbin/apache2` on a free 127.0.0.1 port, talks HTTP/1.1 to it
//! with a small std-only client, reads its error log, inspects its processes through /proc, and
//! always stops what it started (also from `Drop`, also when an assertion failed).
//!
//! No crates beyond std and `libc`. Nothing here touches the module's code: the tests see it
//! only as an Apache would, through httpd.conf, HTTP and the error log.
//!
//! Environment knobs:
//! - `MOD_WSGI_RS_SO`: the module to load (default `<crate>/target/debug/libmod_wsgi_rs.so`).
//! - `MOD_WSGI_RS_APACHE`: the httpd binary (default `/usr/sbin/apache2`).
//! - `MOD_WSGI_RS_LOGLEVEL`: Apache's LogLevel for the test servers (default `info`).
//! - `MOD_WSGI_RS_KEEP=1`: keep every ServerRoot (by default it is removed after a clean stop
//!   of a passing test, and kept when the test panicked).

#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Where every test ServerRoot is created.
pub const TESTS_DIR: &str = "/tmp/mod_wsgi_rs-tests";
/// How long `start`, `graceful` and `stop` may take.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Read/write timeout of the HTTP client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The Apache worker user/group used when the tests run as root.
pub const APACHE_USER: &str = "www-data";
pub const APACHE_GROUP: &str = "www-data";

const BASE_CONF: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/apache-conf/tests/base.conf.in"
));
const READY_PHRASE: &str = "resuming normal operations";

static ROOT_COUNTER: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------------
// Paths, names, users
// ---------------------------------------------------------------------------------------------

/// The crate directory (where Cargo.toml is).
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/apps` in the source tree.
pub fn apps_source_dir() -> PathBuf {
    manifest_dir().join("tests").join("apps")
}

/// The source text of one app in `tests/apps` (for tests that place a copy elsewhere).
pub fn app_source(name: &str) -> String {
    let path = apps_source_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The httpd binary.
pub fn apache_bin() -> PathBuf {
    std::env::var_os("MOD_WSGI_RS_APACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/apache2"))
}

/// The module under test: `$MOD_WSGI_RS_SO`, else `<crate>/target/debug/libmod_wsgi_rs.so`.
pub fn module_so() -> PathBuf {
    let path = match std::env::var_os("MOD_WSGI_RS_SO") {
        Some(p) => PathBuf::from(p),
        None => manifest_dir().join("target/debug/libmod_wsgi_rs.so"),
    };
    if std::env::var_os("MOD_WSGI_RS_SO").is_none() {
        warn_if_stale(&path);
    }
    if !path.is_file() {
        panic!(
            "the module {} does not exist: run `cargo build` first \
             (or point MOD_WSGI_RS_SO at the .so to test)",
            path.display()
        );
    }
    path.canonicalize().unwrap_or(path)
}

/// `cargo test` does not rebuild a cdylib-only crate's .so: say so loudly (once) when the
/// module is older than its sources.
fn warn_if_stale(so: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    fn newest(path: &Path) -> Option<std::time::SystemTime> {
        let meta = fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        fs::read_dir(path)
            .ok()?
            .flatten()
            .filter_map(|e| newest(&e.path()))
            .max()
    }
    ONCE.call_once(|| {
        let Some(built) = fs::metadata(so).and_then(|m| m.modified()).ok() else {
            return;
        };
        let dir = manifest_dir();
        let sources = ["src", "include", "build.rs", "Cargo.toml"]
            .iter()
            .filter_map(|p| newest(&dir.join(p)))
            .max();
        if sources.is_some_and(|s| s > built) {
            let _ = writeln!(
                io::stderr(),
                "\nWARNING: {} is older than the sources: run `cargo build` first \
                 (cargo test does not rebuild the module)\n",
                so.display()
            );
        }
    });
}

/// The running test's name (libtest names each test's thread after it), cut to what is safe
/// in a path; `t` when there is no useful name.
pub fn current_test_name() -> String {
    let raw = thread::current().name().unwrap_or("").to_string();
    let last = raw.rsplit("::").next().unwrap_or("").to_string();
    if last.is_empty() || last == "main" {
        return "t".to_string();
    }
    last
}

fn path_safe_name() -> String {
    let mut s: String = current_test_name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // Keep socket paths (ServerRoot/run/wsgi.<…>.sock) well under the 107-byte limit.
    s.truncate(24);
    s
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints a loud SKIPPED line straight to the process's stderr (not through libtest's output
/// capture, so it shows without --nocapture) and appends it to `TESTS_DIR/skipped.log`.
pub fn skip(reason: &str) {
    let line = format!("SKIPPED {}: {}", current_test_name(), reason);
    let banner = "*".repeat(line.len().min(100));
    let _ = writeln!(io::stderr(), "\n{banner}\n{line}\n{banner}");
    let _ = fs::create_dir_all(TESTS_DIR);
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(TESTS_DIR).join("skipped.log"))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Returns from the test (after a loud SKIPPED line) unless it runs as root.
/// (Test files declare `#[macro_use] mod common;`.)
#[allow(unused_macros)]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            $crate::common::skip("needs root (run make test as root)");
            return;
        }
    };
}

/// `let bob = require_user!("bob");` — the user's passwd entry, or a loud skip and return.
#[allow(unused_macros)]
macro_rules! require_user {
    ($name:expr) => {
        match $crate::common::lookup_user($name) {
            Some(user) => user,
            None => {
                $crate::common::skip(&format!(
                    "needs user '{}' (make test creates users bob and joe)",
                    $name
                ));
                return;
            }
        }
    };
}

/// One passwd entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// # Safety
/// `p` is null or points to a NUL-terminated string.
unsafe fn c_string(p: *const libc::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated, by this function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn passwd_to_user(pw: &libc::passwd) -> UserInfo {
    // SAFETY: getpwnam_r/getpwuid_r filled `pw` with null or NUL-terminated strings that live
    // in the caller's buffer, which outlives this call.
    let s = |p: *const libc::c_char| unsafe { c_string(p) };
    UserInfo {
        name: s(pw.pw_name),
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        home: s(pw.pw_dir),
        shell: s(pw.pw_shell),
    }
}

/// The passwd entry of `name` (through NSS, as initgroups sees it).
pub fn lookup_user(name: &str) -> Option<UserInfo> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: all-zero bytes are a valid `passwd` (null pointers, zero ids).
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(passwd_to_user(&pw))
}

/// The passwd entry of `uid`.
pub fn lookup_uid(uid: u32) -> Option<UserInfo> {
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: all-zero bytes are a valid `passwd`.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(passwd_to_user(&pw))
}

/// gid of the group called `name`.
pub fn group_gid(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 65536];
    // SAFETY: all-zero bytes are a valid `group`.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(gr.gr_gid)
}

/// Name of the group `gid`.
pub fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 65536];
    // SAFETY: all-zero bytes are a valid `group`.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || gr.gr_name.is_null() {
        return None;
    }
    // SAFETY: gr_name is a NUL-terminated string inside buf.
    Some(
        unsafe { CStr::from_ptr(gr.gr_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// What `initgroups(user, gid)` would install: getgrouplist, sorted, without duplicates.
pub fn group_list(user: &str, gid: u32) -> Vec<u32> {
    let cname = CString::new(user).expect("user name without NUL");
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: groups has room for `count` entries; count is updated by the call.
        let rc =
            unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count as usize);
            groups.sort_unstable();
            groups.dedup();
            return groups;
        }
        n = count.max(n * 2);
    }
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// One process, as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    /// Real and effective uid / gid.
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    /// One-letter state (R, S, D, Z, …).
    pub state: char,
    /// `Name:` from status (the comm).
    pub name: String,
    /// argv joined by spaces (empty for zombies and kernel threads).
    pub cmdline: String,
    /// Start time in clock ticks since boot: with pid, identifies the process across reuse.
    pub start_time: u64,
}

impl ProcInfo {
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
    /// Still the same live (non-zombie) process?
    pub fn still_alive(&self) -> bool {
        matches!(proc_info(self.pid), Some(p) if p.start_time == self.start_time && !p.is_zombie())
    }
}

/// Reads /proc/<pid>; None when it is gone.
pub fn proc_info(pid: u32) -> Option<ProcInfo> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let status = fs::read_to_string(dir.join("status")).ok()?;
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let cmdline = fs::read(dir.join("cmdline")).unwrap_or_default();
    let mut info = ProcInfo {
        pid,
        ppid: 0,
        uid: 0,
        euid: 0,
        gid: 0,
        egid: 0,
        state: '?',
        name: String::new(),
        cmdline: cmdline
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        start_time: 0,
    };
    for line in status.lines() {
        let (key, value) = match line.split_once(':') {
            Some(kv) => kv,
            None => continue,
        };
        let fields: Vec<&str> = value.split_whitespace().collect();
        match key {
            "Name" => info.name = value.trim().to_string(),
            "State" => info.state = fields.first().and_then(|s| s.chars().next()).unwrap_or('?'),
            "PPid" => info.ppid = fields.first().and_then(|s| s.parse().ok()).unwrap_or(0),
            "Uid" => {
                info.uid = fields.first().and_then(|s| s.parse().ok()).unwrap_or(0);
                info.euid = fields.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            }
            "Gid" => {
                info.gid = fields.first().and_then(|s| s.parse().ok()).unwrap_or(0);
                info.egid = fields.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            }
            _ => {}
        }
    }
    // stat: "pid (comm) state ppid … starttime(22nd field) …"; comm may contain spaces.
    if let Some(close) = stat.rfind(')') {
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // rest[0] is field 3 (state), so field 22 is rest[19].
        info.start_time = rest.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
    }
    Some(info)
}

/// Every process /proc lists (zombies included).
pub fn all_processes() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                if let Some(info) = proc_info(pid) {
                    out.push(info);
                }
            }
        }
    }
    out
}

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_info(pid), Some(p) if !p.is_zombie())
}

/// Live processes whose real uid is `uid`.
pub fn pids_of_user(uid: u32) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|p| p.uid == uid && !p.is_zombie())
        .map(|p| p.pid)
        .collect()
}

/// Live processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<ProcInfo> {
    all_processes()
        .into_iter()
        .filter(|p| !p.is_zombie() && p.cmdline.contains(needle))
        .collect()
}

/// Live descendants of `pid` (children, grandchildren, …), not `pid` itself.
pub fn descendants(pid: u32) -> Vec<ProcInfo> {
    let all = all_processes();
    let mut wanted: HashSet<u32> = HashSet::from([pid]);
    let mut out: Vec<ProcInfo> = Vec::new();
    loop {
        let before = out.len();
        for p in &all {
            if wanted.contains(&p.ppid) && !wanted.contains(&p.pid) {
                wanted.insert(p.pid);
                if !p.is_zombie() {
                    out.push(p.clone());
                }
            }
        }
        if out.len() == before {
            break;
        }
    }
    out
}

fn status_field_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field_kib(pid, "VmRSS")
}

/// RssShmem of `pid` in KiB: the shared-memory pages it has mapped.
pub fn shmem_kib(pid: u32) -> Option<u64> {
    status_field_kib(pid, "RssShmem")
}

/// VmHWM (peak RSS) of `pid` in KiB.
pub fn hwm_kib(pid: u32) -> Option<u64> {
    status_field_kib(pid, "VmHWM")
}

fn send_signal(pid: u32, sig: libc::c_int) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; pid is a positive process id.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// ServerRoot and httpd.conf
// ---------------------------------------------------------------------------------------------

fn set_mode(path: &Path, mode: u32) {
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
}

fn mkdir_mode(path: &Path, mode: u32) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    set_mode(path, mode);
}

fn copy_tree(from: &Path, to: &Path) {
    mkdir_mode(to, 0o755);
    let entries = match fs::read_dir(from) {
        Ok(e) => e,
        Err(_) => return,
    };
    for entry in entries.flatten() {
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ft = match entry.file_type() {
            Ok(ft) => ft,
            Err(_) => continue,
        };
        if ft.is_dir() {
            copy_tree(&src, &dst);
        } else if ft.is_file() {
            fs::copy(&src, &dst).unwrap_or_else(|e| panic!("cannot copy {}: {e}", src.display()));
            set_mode(&dst, 0o644);
        }
    }
}

const MIME_TYPES: &str = "\
text/html\thtml htm
text/plain\ttxt
text/css\tcss
application/json\tjson
application/javascript\tjs
application/octet-stream\tbin
image/png\tpng
";

/// Makes a fresh ServerRoot `TESTS_DIR/<test>-<pid>-<n>` with conf, logs, run, htdocs and apps
/// (a copy of tests/apps), everything readable by all (0755 dirs, 0644 files), plus `files`
/// (paths relative to the root, created with their parent directories).
fn make_server_root(files: &[(&str, &str)]) -> PathBuf {
    // Sticky and world-writable like /tmp: root and non-root runs can share it.
    mkdir_mode(Path::new(TESTS_DIR), 0o1777);
    let n = ROOT_COUNTER.fetch_add(1, Ordering::SeqCst);
    let root =
        Path::new(TESTS_DIR).join(format!("{}-{}-{}", path_safe_name(), std::process::id(), n));
    if root.exists() {
        let _ = fs::remove_dir_all(&root);
    }
    mkdir_mode(&root, 0o755);
    for sub in ["conf", "logs", "run", "htdocs"] {
        mkdir_mode(&root.join(sub), 0o755);
    }
    copy_tree(&apps_source_dir(), &root.join("apps"));
    fs::write(root.join("conf/mime.types"), MIME_TYPES).expect("write mime.types");
    set_mode(&root.join("conf/mime.types"), 0o644);
    for (rel, contents) in files {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            mkdir_mode(parent, 0o755);
        }
        fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        set_mode(&path, 0o644);
    }
    root
}

fn log_level() -> String {
    std::env::var("MOD_WSGI_RS_LOGLEVEL").unwrap_or_else(|_| "info".to_string())
}

fn substitute(text: &str, root: &Path, port: u16, port2: u16) -> String {
    let root_s = root.display().to_string();
    text.replace("@APPS@", &format!("{root_s}/apps"))
        .replace("@ROOT@", &root_s)
        .replace("@SERVER_ROOT@", &root_s)
        .replace("@PORT2@", &port2.to_string())
        .replace("@PORT@", &port.to_string())
}

/// Renders base.conf.in with `fragment`. Without the module, the `LoadModule wsgi_module` line
/// and every other `WSGI…` directive of the base config are commented out. A `@PORT2@` in the
/// fragment becomes some other free port (see `render_config_ports` to choose it).
pub fn render_config(root: &Path, port: u16, fragment: &str, with_module: bool) -> String {
    render_config_ports(
        root,
        port,
        free_port_other_than(port),
        fragment,
        with_module,
    )
}

/// `render_config` with the port that `@PORT2@` stands for: a fragment that needs a second
/// port (two `<VirtualHost>`s of one ServerName on two ports, say) writes
/// `Listen 127.0.0.1:@PORT2@` itself; the base config listens on `@PORT@` only.
pub fn render_config_ports(
    root: &Path,
    port: u16,
    port2: u16,
    fragment: &str,
    with_module: bool,
) -> String {
    assert_eq!(
        BASE_CONF.matches("@FRAGMENT@").count(),
        1,
        "base.conf.in must hold the fragment placeholder exactly once (not in a comment)"
    );
    let module = if with_module {
        module_so().display().to_string()
    } else {
        String::from("(not loaded)")
    };
    let mut base = String::new();
    for line in BASE_CONF.lines() {
        let t = line.trim_start();
        if !with_module && (t.starts_with("LoadModule wsgi_module") || t.starts_with("WSGI")) {
            base.push_str("# harness: module not loaded: ");
        }
        base.push_str(line);
        base.push('\n');
    }
    let (if_root, user, group) = if is_root() {
        ("", APACHE_USER, APACHE_GROUP)
    } else {
        ("# not root, so no: ", APACHE_USER, APACHE_GROUP)
    };
    let base = base
        .replace("@MODULE_SO@", &module)
        .replace("@IF_ROOT@", if_root)
        .replace("@USER@", user)
        .replace("@GROUP@", group)
        .replace("@LOGLEVEL@", &log_level());
    let base = substitute(&base, root, port, port2);
    let fragment = substitute(fragment, root, port, port2);
    base.replace("@FRAGMENT@", &fragment)
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A free port that is not `port` (for `@PORT2@`).
fn free_port_other_than(port: u16) -> u16 {
    loop {
        let p = free_port();
        if p != port {
            return p;
        }
    }
}

/// Runs apache2 with `args` in a clean environment, stdout+stderr to `out_file`, waiting at
/// most `timeout`. Returns (exit ok, combined output).
fn run_apache(args: &[&str], out_file: &Path, timeout: Duration) -> (bool, String) {
    let out =
        fs::File::create(out_file).unwrap_or_else(|e| panic!("create {}: {e}", out_file.display()));
    let err = out.try_clone().expect("dup output file");
    let mut cmd = Command::new(apache_bin());
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    for var in ["RUST_BACKTRACE", "RUST_LOG"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} {:?}: {e}", apache_bin().display(), args));
    let deadline = Instant::now() + timeout;
    let ok = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.success(),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
        }
    };
    let output = fs::read_to_string(out_file).unwrap_or_default();
    (ok, output)
}

/// `MOD_WSGI_RS_REFERENCE=1`: the module under test is the reference mod_wsgi (point
/// `MOD_WSGI_RS_SO` at Debian's /usr/lib/apache2/modules/mod_wsgi.so), so the checks of what
/// only mod_wsgi_rs promises (WSGIRS ids, the SPEC's **beyond** items) are left out. This keeps
/// the tests themselves honest: what they expect of mod_wsgi's behaviour, mod_wsgi does.
pub fn reference_mode() -> bool {
    std::env::var_os("MOD_WSGI_RS_REFERENCE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The stable-id prefix our log lines and directive errors carry (none in reference mode).
pub fn our_id() -> Option<&'static str> {
    if reference_mode() {
        None
    } else {
        Some("WSGIRS")
    }
}

fn keep_roots() -> bool {
    std::env::var_os("MOD_WSGI_RS_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Writes `fragment` into a fresh ServerRoot's httpd.conf (module loaded) and runs
/// `apache2 -t -f …`. Returns (exit status ok, combined output).
pub fn config_test(fragment: &str) -> (bool, String) {
    config_test_with(fragment, true)
}

/// `config_test`, choosing whether the module is loaded.
pub fn config_test_with(fragment: &str, with_module: bool) -> (bool, String) {
    let root = make_server_root(&[]);
    let conf = root.join("conf/httpd.conf");
    fs::write(
        &conf,
        render_config(&root, free_port(), fragment, with_module),
    )
    .expect("write httpd.conf");
    let conf_s = conf.display().to_string();
    let (ok, output) = run_apache(
        &["-t", "-f", &conf_s],
        &root.join("logs/apache2-t.out"),
        Duration::from_secs(30),
    );
    if !keep_roots() && !thread::panicking() {
        let _ = fs::remove_dir_all(&root);
    }
    (ok, output)
}

// ---------------------------------------------------------------------------------------------
// TestServer
// ---------------------------------------------------------------------------------------------

/// What `stop` saw.
#[derive(Debug, Default, Clone)]
pub struct StopReport {
    /// The parent had to be SIGKILLed (it did not exit within STOP_TIMEOUT).
    pub forced: bool,
    /// Processes of this server (seen before the stop) still alive 2 s after the parent had
    /// gone; they have been SIGKILLed since.
    pub survivors: Vec<ProcInfo>,
    /// Output of `apache2 -k stop`.
    pub output: String,
    pub elapsed: Duration,
}

/// One running Apache with its own ServerRoot and port. Stopped by `stop` or on drop.
pub struct TestServer {
    name: String,
    root: PathBuf,
    conf: PathBuf,
    port: u16,
    /// What `@PORT2@` stood for in the fragment (Apache listens there only if it says so).
    port2: u16,
    with_module: bool,
    fragment: String,
    parent_pid: u32,
    stopped: bool,
    clean_stop: bool,
}

impl TestServer {
    /// Starts Apache with the module loaded and `fragment` appended to the base config
    /// (`@APPS@`, `@ROOT@`, `@PORT@` substituted). Panics with the error log on failure.
    pub fn start(fragment: &str) -> TestServer {
        Self::launch(fragment, true, &[])
    }

    /// `start`, after writing `files` (path relative to the ServerRoot, contents).
    pub fn start_with_files(fragment: &str, files: &[(&str, &str)]) -> TestServer {
        Self::launch(fragment, true, files)
    }

    /// Starts Apache WITHOUT the module (harness self-tests, comparisons).
    pub fn start_without_module(fragment: &str) -> TestServer {
        Self::launch(fragment, false, &[])
    }

    /// `start_without_module` with extra files.
    pub fn start_without_module_with_files(fragment: &str, files: &[(&str, &str)]) -> TestServer {
        Self::launch(fragment, false, files)
    }

    fn launch(fragment: &str, with_module: bool, files: &[(&str, &str)]) -> TestServer {
        if with_module {
            module_so(); // panics early with "run `cargo build` first"
        }
        let root = make_server_root(files);
        let conf = root.join("conf/httpd.conf");
        let mut last_failure = String::new();
        for attempt in 0..6 {
            let port = free_port();
            let port2 = free_port_other_than(port);
            fs::write(
                &conf,
                render_config_ports(&root, port, port2, fragment, with_module),
            )
            .expect("write httpd.conf");
            let _ = fs::remove_file(root.join("logs/httpd.pid"));
            let log_len_before = fs::metadata(root.join("logs/error_log"))
                .map(|m| m.len())
                .unwrap_or(0);
            let mut server = TestServer {
                name: current_test_name(),
                root: root.clone(),
                conf: conf.clone(),
                port,
                port2,
                with_module,
                fragment: fragment.to_string(),
                parent_pid: 0,
                stopped: true,     // nothing to stop until the parent is known
                clean_stop: false, // so a failed attempt's drop keeps the ServerRoot
            };
            let conf_s = conf.display().to_string();
            let (ok, output) = run_apache(
                &["-f", &conf_s, "-k", "start"],
                &root.join(format!("logs/apache2-start-{attempt}.out")),
                Duration::from_secs(30),
            );
            let new_log = || {
                let log = server.error_log();
                log.get(log_len_before as usize..).unwrap_or("").to_string()
            };
            if !ok {
                let log = new_log();
                if output.contains("Address already in use")
                    || log.contains("Address already in use")
                {
                    last_failure = format!("port {port} in use:\n{output}");
                    continue;
                }
                panic!(
                    "apache2 -k start failed for {} (attempt {attempt}):\n--- output ---\n{output}\n--- error_log ---\n{log}\n--- httpd.conf: {} ---",
                    server.name,
                    conf.display()
                );
            }
            match server.wait_ready(log_len_before) {
                Ok(pid) => {
                    server.parent_pid = pid;
                    server.stopped = false;
                    return server;
                }
                Err(why) => {
                    let log = new_log();
                    // Stop whatever did come up before retrying or panicking.
                    server.kill_everything();
                    if log.contains("Address already in use") && attempt < 5 {
                        last_failure = why;
                        continue;
                    }
                    panic!(
                        "Apache did not come up for {}: {why}\n--- start output ---\n{output}\n--- error_log ---\n{log}\n--- httpd.conf: {} ---",
                        server.name,
                        conf.display()
                    );
                }
            }
        }
        panic!("could not start Apache on a free port: {last_failure}");
    }

    /// Waits until the pid file names a live process, the port accepts, and (at LogLevel
    /// notice or more verbose) the error log says "resuming normal operations".
    fn wait_ready(&self, log_offset: u64) -> Result<u32, String> {
        let verbose = !matches!(
            log_level().split_whitespace().next().unwrap_or(""),
            "warn" | "error" | "crit" | "alert" | "emerg"
        );
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen_pid = None;
        loop {
            let log = self.error_log();
            let new_log = log.get(log_offset as usize..).unwrap_or("");
            if new_log.contains("Configuration Failed") || new_log.contains("AH00016") {
                return Err("the error log says Configuration Failed".into());
            }
            if let Some(pid) = self.read_pid_file() {
                seen_pid = Some(pid);
                if !pid_alive(pid) {
                    return Err(format!("the parent (pid {pid}) exited during startup"));
                }
                let port_ok =
                    TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)).is_ok();
                if port_ok && (!verbose || new_log.contains(READY_PHRASE)) {
                    return Ok(pid);
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready within {:?} (pid file: {:?}, port {})",
                    START_TIMEOUT, seen_pid, self.port
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn read_pid_file(&self) -> Option<u32> {
        fs::read_to_string(self.root.join("logs/httpd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The test name this server was started for.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `<root>/apps`, the copy of tests/apps (what `@APPS@` expands to).
    pub fn apps_dir(&self) -> PathBuf {
        self.root.join("apps")
    }
    /// `<root>/run`, where WSGISocketPrefix puts the sockets.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
    /// The port `@PORT2@` stood for in the fragment (Apache listens there only when the
    /// fragment has `Listen 127.0.0.1:@PORT2@`).
    pub fn port2(&self) -> u16 {
        self.port2
    }
    /// 127.0.0.1:`port2()`; talk to it with `http_request(server.addr2(), …)`.
    pub fn addr2(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port2))
    }
    /// The Apache parent's pid.
    pub fn pid(&self) -> u32 {
        self.parent_pid
    }
    pub fn is_running(&self) -> bool {
        !self.stopped && pid_alive(self.parent_pid)
    }

    /// The whole error log (lossy UTF-8).
    pub fn error_log(&self) -> String {
        fs::read(self.root.join("logs/error_log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The access log (format: `%h "%r" %>s %b %D pid=%P`).
    pub fn access_log(&self) -> String {
        fs::read(self.root.join("logs/access_log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// How many times `needle` occurs in the error log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.error_log().matches(needle).count()
    }

    /// Polls the error log until it contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.error_log().contains(needle))
    }

    /// `wait_for_log`, panicking with the whole error log when the phrase never shows up.
    pub fn expect_log(&self, needle: &str, timeout: Duration) {
        if !self.wait_for_log(needle, timeout) {
            panic!(
                "error log of {} never contained {:?} within {:?}\n--- error_log ---\n{}",
                self.name,
                needle,
                timeout,
                self.error_log()
            );
        }
    }

    /// Every live process of this server: the parent, its descendants (Apache children and
    /// daemon processes), and anything else whose command line names this httpd.conf.
    pub fn processes(&self) -> Vec<ProcInfo> {
        let mut out: Vec<ProcInfo> = Vec::new();
        let mut seen = HashSet::new();
        if self.parent_pid != 0 {
            if let Some(p) = proc_info(self.parent_pid) {
                if !p.is_zombie() {
                    seen.insert(p.pid);
                    out.push(p);
                }
            }
            for p in descendants(self.parent_pid) {
                if seen.insert(p.pid) {
                    out.push(p);
                }
            }
        }
        for p in processes_matching(&self.conf.display().to_string()) {
            if seen.insert(p.pid) {
                out.push(p);
            }
        }
        out
    }

    /// UNIX socket files under `<root>/run` (recursively).
    pub fn socket_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.flatten() {
                    match e.file_type() {
                        Ok(ft) if ft.is_dir() => walk(&e.path(), out),
                        Ok(ft) if ft.is_socket() => out.push(e.path()),
                        _ => {}
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.run_dir(), &mut out);
        out
    }

    /// Rewrites httpd.conf with a new fragment (same port); takes effect at the next
    /// `graceful`/`restart`.
    pub fn rewrite_config(&mut self, fragment: &str) {
        self.fragment = fragment.to_string();
        fs::write(
            &self.conf,
            render_config_ports(
                &self.root,
                self.port,
                self.port2,
                fragment,
                self.with_module,
            ),
        )
        .expect("rewrite httpd.conf");
    }

    fn signal_and_wait_ready(&mut self, verb: &str) {
        assert!(!self.stopped, "{verb} on a stopped server");
        let before = self.log_count(READY_PHRASE);
        let conf_s = self.conf.display().to_string();
        let (ok, output) = run_apache(
            &["-f", &conf_s, "-k", verb],
            &self.root.join(format!("logs/apache2-{verb}.out")),
            Duration::from_secs(30),
        );
        if !ok {
            panic!(
                "apache2 -k {verb} failed:\n{output}\n--- error_log ---\n{}",
                self.error_log()
            );
        }
        let ready = wait_until(START_TIMEOUT, || {
            self.log_count(READY_PHRASE) > before
                && pid_alive(self.parent_pid)
                && TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)).is_ok()
        });
        if !ready {
            panic!(
                "Apache did not resume within {:?} after -k {verb}\n--- error_log ---\n{}",
                START_TIMEOUT,
                self.error_log()
            );
        }
    }

    /// `apache2 -k graceful`, then waits until Apache logs "resuming normal operations" again.
    pub fn graceful(&mut self) {
        self.signal_and_wait_ready("graceful");
    }

    /// `apache2 -k restart`, then waits like `graceful`.
    pub fn restart(&mut self) {
        self.signal_and_wait_ready("restart");
    }

    /// `apache2 -k stop`; waits (≤ STOP_TIMEOUT) for the parent to exit, then ≤ 2 s for every
    /// process of this server seen before the stop. Whatever is left is SIGKILLed and reported.
    pub fn stop(&mut self) -> StopReport {
        let mut report = StopReport::default();
        if self.stopped {
            return report;
        }
        let started = Instant::now();
        let before = self.processes();
        let conf_s = self.conf.display().to_string();
        let (_, output) = run_apache(
            &["-f", &conf_s, "-k", "stop"],
            &self.root.join("logs/apache2-stop.out"),
            Duration::from_secs(30),
        );
        report.output = output;
        let parent = self.parent_pid;
        if !wait_until(STOP_TIMEOUT, || !pid_alive(parent)) {
            report.forced = true;
            send_signal(parent, libc::SIGKILL);
            wait_until(Duration::from_secs(2), || !pid_alive(parent));
        }
        wait_until(Duration::from_secs(2), || {
            before.iter().all(|p| !p.still_alive())
        });
        report.survivors = before.iter().filter(|p| p.still_alive()).cloned().collect();
        for p in processes_matching(&self.conf.display().to_string()) {
            if !report.survivors.iter().any(|s| s.pid == p.pid) {
                report.survivors.push(p);
            }
        }
        for p in &report.survivors {
            send_signal(p.pid, libc::SIGKILL);
        }
        report.elapsed = started.elapsed();
        self.stopped = true;
        self.clean_stop = !report.forced && report.survivors.is_empty();
        report
    }

    /// Last resort: SIGKILL the parent and everything of this root.
    fn kill_everything(&mut self) {
        let mut victims = self.processes();
        if let Some(pid) = self.read_pid_file() {
            if let Some(p) = proc_info(pid) {
                victims.push(p.clone());
                victims.extend(descendants(pid));
            }
        }
        for p in &victims {
            send_signal(p.pid, libc::SIGKILL);
        }
        self.stopped = true;
    }

    // ---- HTTP -------------------------------------------------------------------------------

    /// GET `path`; panics on a transport error.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// One request; panics (with the error log) on a transport error, not on any status.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        match self.try_request(method, path, headers, body) {
            Ok(r) => r,
            Err(e) => panic!(
                "{method} {path} on {} failed: {e}\n--- error_log ---\n{}",
                self.name,
                self.error_log()
            ),
        }
    }

    /// One request, transport errors (incomplete body, no response, timeout) returned.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, HttpError> {
        http_request(self.addr(), method, path, headers, body)
    }

    /// Streaming form: sends `body` from a thread while the response is read, feeding each
    /// piece of the response body to `on_chunk`.
    pub fn stream(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
        on_chunk: impl FnMut(&[u8]),
    ) -> Result<Streamed, HttpError> {
        http_stream(self.addr(), method, path, headers, body, on_chunk)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !self.stopped {
            let report = self.stop();
            if report.forced || !report.survivors.is_empty() {
                let _ = writeln!(
                    io::stderr(),
                    "WARNING {}: Apache at {} did not stop cleanly (forced: {}, survivors killed: {:?})",
                    self.name,
                    self.root.display(),
                    report.forced,
                    report.survivors.iter().map(|p| (p.pid, &p.cmdline)).collect::<Vec<_>>()
                );
            }
        }
        if self.clean_stop && !thread::panicking() && !keep_roots() {
            let _ = fs::remove_dir_all(&self.root);
        } else if thread::panicking() {
            let _ = writeln!(
                io::stderr(),
                "{}: ServerRoot kept for inspection: {}",
                self.name,
                self.root.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// A complete response.
#[derive(Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
    /// Every header called `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body parsed as JSON; panics with the body when it is not.
    pub fn json(&self) -> Json {
        Json::parse(&self.text()).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.text();
        let shown: String = text.chars().take(2000).collect();
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("reason", &self.reason)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("body", &shown)
            .finish()
    }
}

/// Result of a streamed exchange (the body went to the closure).
#[derive(Debug, Clone)]
pub struct Streamed {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    /// Bytes of response body received (after de-chunking).
    pub body_len: u64,
    /// Bytes of request body written.
    pub sent: u64,
    /// Why sending stopped early, if it did (e.g. the server answered and closed first).
    pub send_error: Option<String>,
}

impl Streamed {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A transport-level failure, distinguishable from any HTTP status.
#[derive(Debug)]
pub enum HttpError {
    /// connect/write/read failed before a response started.
    Io {
        during: &'static str,
        error: io::Error,
    },
    /// The connection closed (or was reset) before a status line arrived.
    NoResponse { detail: String },
    /// A read timed out (IO_TIMEOUT).
    Timeout { during: &'static str, received: u64 },
    /// Not HTTP as we know it.
    Malformed(String),
    /// The connection ended before the body was complete: before Content-Length bytes, or
    /// before the chunked terminator.
    Incomplete {
        status: u16,
        received: u64,
        expected: Option<u64>,
        detail: String,
    },
}

impl HttpError {
    pub fn is_incomplete(&self) -> bool {
        matches!(self, HttpError::Incomplete { .. })
    }
    pub fn is_no_response(&self) -> bool {
        matches!(self, HttpError::NoResponse { .. })
    }
    pub fn is_timeout(&self) -> bool {
        matches!(self, HttpError::Timeout { .. })
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Io { during, error } => write!(f, "I/O error during {during}: {error}"),
            HttpError::NoResponse { detail } => write!(f, "connection closed before any response: {detail}"),
            HttpError::Timeout { during, received } => {
                write!(f, "timed out ({IO_TIMEOUT:?}) during {during} after {received} body bytes")
            }
            HttpError::Malformed(m) => write!(f, "malformed response: {m}"),
            HttpError::Incomplete { status, received, expected, detail } => write!(
                f,
                "incomplete response (status {status}): got {received} body bytes, expected {}: {detail}",
                expected.map(|e| e.to_string()).unwrap_or_else(|| "more (chunked)".into())
            ),
        }
    }
}

impl std::error::Error for HttpError {}

/// A request body.
pub enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// `len` bytes of `Pattern::new(seed, len)`, generated while sending.
    Pattern {
        seed: u64,
        len: u64,
    },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::Pattern { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One request on a fresh connection; body collected in memory.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, HttpError> {
    let mut collected = Vec::new();
    let body = if body.is_empty() {
        Body::Empty
    } else {
        Body::Bytes(body.to_vec())
    };
    let s = http_stream(addr, method, path, headers, body, |chunk| {
        collected.extend_from_slice(chunk)
    })?;
    Ok(Response {
        status: s.status,
        reason: s.reason,
        headers: s.headers,
        body: collected,
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes `body` (chunked when `chunked`), returning the bytes of body written.
fn write_body(stream: &mut TcpStream, body: Body, chunked: bool, sent: &mut u64) -> io::Result<()> {
    let mut send = |stream: &mut TcpStream, data: &[u8]| -> io::Result<()> {
        if chunked {
            stream.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
            stream.write_all(data)?;
            stream.write_all(b"\r\n")?;
        } else {
            stream.write_all(data)?;
        }
        *sent += data.len() as u64;
        Ok(())
    };
    match body {
        Body::Empty => {}
        Body::Bytes(b) => {
            for piece in b.chunks(65536) {
                send(stream, piece)?;
            }
        }
        Body::Pattern { seed, len } => {
            let mut pattern = Pattern::new(seed, len);
            let mut buf = vec![0u8; 65536];
            loop {
                let n = pattern.fill(&mut buf);
                if n == 0 {
                    break;
                }
                send(stream, &buf[..n])?;
            }
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n")?;
    }
    stream.flush()
}

/// One request on a fresh connection (`Connection: close` unless given). The request body is
/// written by a thread while this thread reads the response and hands its body, piece by
/// piece, to `on_chunk`. A `Transfer-Encoding: chunked` request header makes the body go out
/// chunked; otherwise Content-Length is added (unless given).
pub fn http_stream(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
    mut on_chunk: impl FnMut(&[u8]),
) -> Result<Streamed, HttpError> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|error| {
        HttpError::Io {
            during: "connect",
            error,
        }
    })?;
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);

    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str(&format!("Host: 127.0.0.1:{}\r\n", addr.port()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("connection") {
        head.push_str("Connection: close\r\n");
    }
    let body_methods = matches!(method, "POST" | "PUT" | "PATCH");
    if !chunked && !has("content-length") && (!body.is_empty() || body_methods) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");

    let mut writer = stream.try_clone().map_err(|error| HttpError::Io {
        during: "clone socket",
        error,
    })?;
    writer
        .write_all(head.as_bytes())
        .map_err(|error| HttpError::Io {
            during: "send request head",
            error,
        })?;
    let sender = if body.is_empty() && !chunked {
        None
    } else {
        Some(thread::spawn(move || {
            let mut sent = 0u64;
            let result = write_body(&mut writer, body, chunked, &mut sent);
            (sent, result.err().map(|e| e.to_string()))
        }))
    };

    let result = read_response(&stream, method, &mut on_chunk);
    // Unblock a sender the server no longer reads from, then collect it.
    let _ = stream.shutdown(Shutdown::Both);
    let (sent, send_error) = match sender {
        Some(handle) => handle
            .join()
            .unwrap_or((0, Some("sender thread panicked".into()))),
        None => (0, None),
    };
    let (status, reason, headers, body_len) = result?;
    Ok(Streamed {
        status,
        reason,
        headers,
        body_len,
        sent,
        send_error,
    })
}

type Head = (u16, String, Vec<(String, String)>, u64);

const MAX_LINE: usize = 65536;

fn read_line_limited<R: BufRead>(reader: &mut R) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if n >= MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-line",
        ));
    }
    while matches!(line.last(), Some(b'\n') | Some(b'\r')) {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

fn read_response(
    stream: &TcpStream,
    method: &str,
    on_chunk: &mut dyn FnMut(&[u8]),
) -> Result<Head, HttpError> {
    let mut reader = BufReader::with_capacity(65536, stream);
    read_response_from(&mut reader, method, on_chunk)
}

/// `read_response` on a reader that outlives one response (keep-alive connections).
fn read_response_from<R: BufRead>(
    reader: &mut R,
    method: &str,
    on_chunk: &mut dyn FnMut(&[u8]),
) -> Result<Head, HttpError> {
    let mut reader = reader;
    // Status line and headers, skipping interim 1xx responses.
    let (status, reason, headers) = loop {
        let line = match read_line_limited(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => {
                return Err(HttpError::NoResponse {
                    detail: "EOF before the status line".into(),
                })
            }
            Err(e) if is_timeout(&e) => {
                return Err(HttpError::Timeout {
                    during: "status line",
                    received: 0,
                })
            }
            Err(e) => {
                return Err(HttpError::NoResponse {
                    detail: e.to_string(),
                })
            }
        };
        let mut parts = line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(HttpError::Malformed(format!("status line {line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HttpError::Malformed(format!("status line {line:?}")))?;
        let reason = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let line = match read_line_limited(&mut reader) {
                Ok(Some(l)) => l,
                Ok(None) => {
                    return Err(HttpError::Incomplete {
                        status,
                        received: 0,
                        expected: None,
                        detail: "EOF inside the response headers".into(),
                    })
                }
                Err(e) if is_timeout(&e) => {
                    return Err(HttpError::Timeout {
                        during: "headers",
                        received: 0,
                    })
                }
                Err(e) => {
                    return Err(HttpError::Incomplete {
                        status,
                        received: 0,
                        expected: None,
                        detail: e.to_string(),
                    })
                }
            };
            if line.is_empty() {
                break;
            }
            match line.split_once(':') {
                Some((k, v)) => headers.push((k.trim().to_string(), v.trim().to_string())),
                None => return Err(HttpError::Malformed(format!("header line {line:?}"))),
            }
        }
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        break (status, reason, headers);
    };

    let no_body = method.eq_ignore_ascii_case("HEAD")
        || status == 204
        || status == 304
        || (100..200).contains(&status);
    if no_body {
        return Ok((status, reason, headers, 0));
    }
    let chunked = find_header(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let content_length: Option<u64> = match find_header(&headers, "content-length") {
        Some(v) => Some(
            v.trim()
                .parse()
                .map_err(|_| HttpError::Malformed(format!("Content-Length {v:?}")))?,
        ),
        None => None,
    };
    let mut received: u64 = 0;
    let mut buf = vec![0u8; 65536];
    let incomplete = |received: u64, expected: Option<u64>, detail: String| HttpError::Incomplete {
        status,
        received,
        expected,
        detail,
    };

    if chunked {
        loop {
            let size_line = match read_line_limited(&mut reader) {
                Ok(Some(l)) => l,
                Ok(None) => {
                    return Err(incomplete(
                        received,
                        None,
                        "EOF before the chunked terminator".into(),
                    ))
                }
                Err(e) if is_timeout(&e) => {
                    return Err(HttpError::Timeout {
                        during: "chunk size",
                        received,
                    })
                }
                Err(e) => {
                    return Err(incomplete(
                        received,
                        None,
                        format!("reading chunk size: {e}"),
                    ))
                }
            };
            let hex = size_line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(hex, 16)
                .map_err(|_| HttpError::Malformed(format!("chunk size line {size_line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    match read_line_limited(&mut reader) {
                        Ok(Some(l)) if l.is_empty() => {
                            return Ok((status, reason, headers, received))
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) => {
                            return Err(incomplete(
                                received,
                                None,
                                "EOF inside the chunked trailer".into(),
                            ))
                        }
                        Err(e) if is_timeout(&e) => {
                            return Err(HttpError::Timeout {
                                during: "trailer",
                                received,
                            })
                        }
                        Err(e) => {
                            return Err(incomplete(received, None, format!("reading trailer: {e}")))
                        }
                    }
                }
            }
            let mut left = size;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                match reader.read(&mut buf[..want]) {
                    Ok(0) => {
                        return Err(incomplete(
                            received,
                            None,
                            format!("EOF inside a chunk ({left} bytes missing)"),
                        ))
                    }
                    Ok(n) => {
                        on_chunk(&buf[..n]);
                        received += n as u64;
                        left -= n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if is_timeout(&e) => {
                        return Err(HttpError::Timeout {
                            during: "chunk data",
                            received,
                        })
                    }
                    Err(e) => {
                        return Err(incomplete(received, None, format!("reading chunk: {e}")))
                    }
                }
            }
            match read_line_limited(&mut reader) {
                Ok(Some(l)) if l.is_empty() => {}
                Ok(Some(l)) => {
                    return Err(HttpError::Malformed(format!(
                        "no CRLF after chunk data: {l:?}"
                    )))
                }
                Ok(None) => return Err(incomplete(received, None, "EOF after chunk data".into())),
                Err(e) if is_timeout(&e) => {
                    return Err(HttpError::Timeout {
                        during: "chunk CRLF",
                        received,
                    })
                }
                Err(e) => {
                    return Err(incomplete(
                        received,
                        None,
                        format!("reading chunk CRLF: {e}"),
                    ))
                }
            }
        }
    } else if let Some(length) = content_length {
        while received < length {
            let want = (length - received).min(buf.len() as u64) as usize;
            match reader.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(incomplete(
                        received,
                        Some(length),
                        "EOF before Content-Length bytes".into(),
                    ))
                }
                Ok(n) => {
                    on_chunk(&buf[..n]);
                    received += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => {
                    return Err(HttpError::Timeout {
                        during: "body",
                        received,
                    })
                }
                Err(e) => return Err(incomplete(received, Some(length), e.to_string())),
            }
        }
        Ok((status, reason, headers, received))
    } else {
        // Delimited by the connection closing.
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok((status, reason, headers, received)),
                Ok(n) => {
                    on_chunk(&buf[..n]);
                    received += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => {
                    return Err(HttpError::Timeout {
                        during: "body",
                        received,
                    })
                }
                Err(e) => return Err(incomplete(received, None, e.to_string())),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic byte pattern (identical to tests/apps/stream.wsgi)
// ---------------------------------------------------------------------------------------------

pub const PATTERN_BLOCK: usize = 65536;

/// A deterministic stream of `len` bytes:
/// `base` = 8192 xorshift64 outputs (x ^= x<<13; x ^= x>>7; x ^= x<<17), little-endian,
/// from x = (seed * 0x9E3779B97F4A7C15) | 1; chunk i (65536 bytes) = base rotated left by
/// (i * 7919) % 65536; the stream is chunk 0, 1, … truncated to `len`.
#[derive(Clone)]
pub struct Pattern {
    base: Vec<u8>,
    len: u64,
    pos: u64,
}

impl Pattern {
    pub fn new(seed: u64, len: u64) -> Pattern {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut base = Vec::with_capacity(PATTERN_BLOCK);
        for _ in 0..PATTERN_BLOCK / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            base.extend_from_slice(&x.to_le_bytes());
        }
        Pattern { base, len, pos: 0 }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The longest contiguous run of expected bytes starting at `pos`, at most `max` long.
    pub fn segment_at(&self, pos: u64, max: usize) -> &[u8] {
        if pos >= self.len {
            return &[];
        }
        let b = PATTERN_BLOCK as u64;
        let i = pos / b;
        let o = pos % b;
        let r = (i * 7919) % b;
        let start = ((o + r) % b) as usize;
        let n = (b - o)
            .min(b - start as u64)
            .min(max as u64)
            .min(self.len - pos) as usize;
        &self.base[start..start + n]
    }

    /// The byte at `pos`.
    pub fn byte_at(&self, pos: u64) -> u8 {
        self.segment_at(pos, 1)[0]
    }

    /// Writes the next bytes into `buf`; 0 at the end.
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let mut filled = 0;
        while filled < buf.len() && self.pos < self.len {
            let seg = self.segment_at(self.pos, buf.len() - filled);
            let n = seg.len();
            buf[filled..filled + n].copy_from_slice(seg);
            filled += n;
            self.pos += n as u64;
        }
        filled
    }

    /// The whole stream in memory (small lengths only).
    pub fn to_vec(seed: u64, len: u64) -> Vec<u8> {
        let mut p = Pattern::new(seed, len);
        let mut out = vec![0u8; len as usize];
        let n = p.fill(&mut out);
        out.truncate(n);
        out
    }
}

/// Compares a body arriving piece by piece against `Pattern::new(seed, len)`.
pub struct PatternCheck {
    pattern: Pattern,
    received: u64,
    mismatch_at: Option<u64>,
}

impl PatternCheck {
    pub fn new(seed: u64, len: u64) -> PatternCheck {
        PatternCheck {
            pattern: Pattern::new(seed, len),
            received: 0,
            mismatch_at: None,
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        let mut i = 0;
        while i < data.len() && self.mismatch_at.is_none() {
            let seg = self.pattern.segment_at(self.received, data.len() - i);
            if seg.is_empty() {
                // More bytes than expected.
                self.mismatch_at = Some(self.received);
                break;
            }
            let got = &data[i..i + seg.len()];
            if got != seg {
                let k = got.iter().zip(seg).position(|(a, b)| a != b).unwrap_or(0);
                self.mismatch_at = Some(self.received + k as u64);
                break;
            }
            i += seg.len();
            self.received += seg.len() as u64;
        }
        if self.mismatch_at.is_some() {
            self.received += (data.len() - i) as u64;
        }
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Offset of the first byte that differed (or the first extra byte).
    pub fn mismatch_at(&self) -> Option<u64> {
        self.mismatch_at
    }

    /// Ok when exactly the whole pattern arrived.
    pub fn finish(&self) -> Result<(), String> {
        if let Some(at) = self.mismatch_at {
            return Err(format!(
                "body differs from the pattern at byte {at} (of {})",
                self.pattern.len()
            ));
        }
        if self.received != self.pattern.len() {
            return Err(format!(
                "got {} bytes, expected {}",
                self.received,
                self.pattern.len()
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal JSON (what the test apps print)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

static JSON_NULL: Json = Json::Null;

impl Json {
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at byte {}", p.i));
        }
        Ok(v)
    }
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Num(n) if n.fract() == 0.0 => Some(*n as i64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }
    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }
    /// `obj["key"]` as u64; panics naming the key when absent or not a number.
    pub fn u64_of(&self, key: &str) -> u64 {
        self[key]
            .as_u64()
            .unwrap_or_else(|| panic!("JSON field {key:?} is not an unsigned integer in {self:?}"))
    }
    /// `obj["key"]` as a string; panics naming the key.
    pub fn str_of(&self, key: &str) -> &str {
        self[key]
            .as_str()
            .unwrap_or_else(|| panic!("JSON field {key:?} is not a string in {self:?}"))
    }
    /// `obj["key"]` as a list of u64; panics naming the key.
    pub fn u64_list_of(&self, key: &str) -> Vec<u64> {
        self[key]
            .as_array()
            .unwrap_or_else(|| panic!("JSON field {key:?} is not an array in {self:?}"))
            .iter()
            .map(|v| {
                v.as_u64()
                    .unwrap_or_else(|| panic!("JSON field {key:?} holds a non-integer"))
            })
            .collect()
    }
}

impl std::ops::Index<&str> for Json {
    type Output = Json;
    fn index(&self, key: &str) -> &Json {
        self.get(key).unwrap_or(&JSON_NULL)
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    fn eat(&mut self, lit: &str) -> Result<(), String> {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(format!("expected {lit:?} at byte {}", self.i))
        }
    }
    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            None => Err("unexpected end".into()),
            Some(b'n') => self.eat("null").map(|_| Json::Null),
            Some(b't') => self.eat("true").map(|_| Json::Bool(true)),
            Some(b'f') => self.eat("false").map(|_| Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(format!("expected , or ] at byte {}", self.i)),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(items));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    self.eat(":")?;
                    let v = self.value()?;
                    items.push((k, v));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(items));
                        }
                        _ => return Err(format!("expected , or }} at byte {}", self.i)),
                    }
                }
            }
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let text =
                    std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                text.parse::<f64>()
                    .map(Json::Num)
                    .map_err(|_| format!("bad number {text:?} at byte {start}"))
            }
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.eat("\"")?;
        let mut out = String::new();
        loop {
            let c = *self.s.get(self.i).ok_or("unterminated string")?;
            self.i += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hex = std::str::from_utf8(
                                self.s.get(self.i..self.i + 4).ok_or("short \\u")?,
                            )
                            .map_err(|e| e.to_string())?;
                            let mut code =
                                u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                            self.i += 4;
                            if (0xD800..0xDC00).contains(&code)
                                && self.s[self.i..].starts_with(b"\\u")
                            {
                                let hex2 = std::str::from_utf8(
                                    self.s.get(self.i + 2..self.i + 6).ok_or("short \\u")?,
                                )
                                .map_err(|e| e.to_string())?;
                                let low =
                                    u32::from_str_radix(hex2, 16).map_err(|e| e.to_string())?;
                                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                                self.i += 6;
                            }
                            out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                        }
                        _ => return Err(format!("bad escape at byte {}", self.i)),
                    }
                }
                _ => {
                    // Copy one UTF-8 sequence.
                    let start = self.i - 1;
                    let mut end = self.i;
                    while end < self.s.len() && (self.s[end] & 0xC0) == 0x80 {
                        end += 1;
                    }
                    out.push_str(&String::from_utf8_lossy(&self.s[start..end]));
                    self.i = end;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Keep-alive connections (several requests on one TCP connection, raw bytes, early close)
// ---------------------------------------------------------------------------------------------

/// One TCP connection to the server that stays open across requests (HTTP/1.1 keep-alive):
/// no `Connection: close` is added. Also lets a test write raw bytes (a slow upload, a
/// pipelined pair of requests), read part of a response, and drop the connection mid-way.
pub struct KeepAlive {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    port: u16,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> io::Result<KeepAlive> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let _ = stream.set_nodelay(true);
        let reader = BufReader::with_capacity(65536, stream.try_clone()?);
        Ok(KeepAlive {
            stream,
            reader,
            port: addr.port(),
        })
    }

    /// Read timeout for what follows (IO_TIMEOUT by default).
    pub fn set_read_timeout(&self, timeout: Duration) {
        let _ = self.stream.set_read_timeout(Some(timeout));
    }

    /// The request head as `http_stream` writes it, except that no `Connection` header is
    /// added; Content-Length is added for a body (or for POST/PUT/PATCH) unless given, or
    /// when `Transfer-Encoding` is given.
    pub fn head(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body_len: u64,
    ) -> String {
        let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !has("host") {
            head.push_str(&format!("Host: 127.0.0.1:{}\r\n", self.port));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let body_methods = matches!(method, "POST" | "PUT" | "PATCH");
        if !has("content-length") && !has("transfer-encoding") && (body_len > 0 || body_methods) {
            head.push_str(&format!("Content-Length: {body_len}\r\n"));
        }
        head.push_str("\r\n");
        head
    }

    /// Writes bytes as they are.
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes one request (head and body) without reading anything.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let mut bytes = self
            .head(method, path, headers, body.len() as u64)
            .into_bytes();
        bytes.extend_from_slice(body);
        self.write_raw(&bytes)
    }

    /// Reads the next response; `method` tells whether a body follows (HEAD has none).
    pub fn read_response(&mut self, method: &str) -> Result<Response, HttpError> {
        let mut body = Vec::new();
        let (status, reason, headers, _) =
            read_response_from(&mut self.reader, method, &mut |c| body.extend_from_slice(c))?;
        Ok(Response {
            status,
            reason,
            headers,
            body,
        })
    }

    /// `send` then `read_response`.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, HttpError> {
        self.send(method, path, headers, body)
            .map_err(|error| HttpError::Io {
                during: "send request",
                error,
            })?;
        self.read_response(method)
    }

    /// Up to `max` raw bytes (head and body alike) as they arrive; empty at EOF.
    pub fn read_some(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; max];
        let n = self.reader.read(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// True when the server has closed the connection (EOF within `wait`); false when it is
    /// still open (the read timed out) or unexpected data arrived.
    pub fn closed_by_server(&mut self, wait: Duration) -> bool {
        self.set_read_timeout(wait);
        let mut byte = [0u8; 1];
        match self.reader.read(&mut byte) {
            Ok(0) => true,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    /// Closes both directions now (what a client that goes away does).
    pub fn abort(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl TestServer {
    /// A keep-alive connection to this server; panics when it cannot connect.
    pub fn connect(&self) -> KeepAlive {
        KeepAlive::connect(self.addr())
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.addr()))
    }

    /// The error log from byte `offset` on (what was logged since `error_log().len()`).
    pub fn error_log_since(&self, offset: usize) -> String {
        let log = self.error_log();
        log.get(offset..).unwrap_or("").to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch directories (world-writable: daemons write marker files there)
// ---------------------------------------------------------------------------------------------

/// A fresh directory under TESTS_DIR, mode 0777 so that daemon processes of any user can
/// leave marker files in it. Exists before Apache starts (unlike the ServerRoot), so a
/// fragment may name it. Removed on drop unless the test panicked or MOD_WSGI_RS_KEEP is set.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        mkdir_mode(Path::new(TESTS_DIR), 0o1777);
        let n = ROOT_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = Path::new(TESTS_DIR).join(format!(
            "scratch-{}-{tag}-{}-{n}",
            path_safe_name(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        mkdir_mode(&path, 0o777);
        ScratchDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
    /// Writes a file readable by all.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        set_mode(&path, 0o644);
        path
    }
    /// Polls until `name` exists and is not empty (a writer may have created it but not yet
    /// written it); returns its contents.
    pub fn wait_for_file(&self, name: &str, timeout: Duration) -> Option<String> {
        let path = self.path.join(name);
        let mut contents = None;
        wait_until(timeout, || {
            contents = fs::read(&path)
                .ok()
                .filter(|b| !b.is_empty())
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            contents.is_some()
        });
        contents
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if thread::panicking() {
            let _ = writeln!(io::stderr(), "scratch dir kept: {}", self.path.display());
        } else if !keep_roots() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRC-32 (the same as Python's zlib.crc32)
// ---------------------------------------------------------------------------------------------

/// Incremental CRC-32 (IEEE 802.3, reflected, as zlib).
#[derive(Clone)]
pub struct Crc32 {
    table: [u32; 256],
    crc: u32,
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32 {
    pub fn new() -> Crc32 {
        let mut table = [0u32; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        Crc32 {
            table,
            crc: 0xFFFF_FFFF,
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.crc;
        for &b in data {
            c = self.table[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
        self.crc = c;
    }
    pub fn value(&self) -> u32 {
        self.crc ^ 0xFFFF_FFFF
    }
}

/// `zlib.crc32(data)`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(data);
    c.value()
}

// ---------------------------------------------------------------------------------------------
// Virtualenvs with packages from PyPI, shared by every test of a run
// ---------------------------------------------------------------------------------------------

/// The system CPython the module embeds (daemons run the venv made from it).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Runs `cmd` (output to `log`), waiting at most `timeout`; Err with the output's tail.
pub fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> Result<(), String> {
    let out = fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let output = fs::read_to_string(log).unwrap_or_default();
    let tail: String = {
        let lines: Vec<&str> = output.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    };
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!("{what} failed ({s}):\n{tail}")),
        None => Err(format!("{what} did not finish within {timeout:?}:\n{tail}")),
    }
}

fn chmod_readable_tree(path: &Path) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if meta.file_type().is_symlink() {
        return;
    }
    let mode = meta.permissions().mode();
    if meta.is_dir() {
        set_mode(path, mode | 0o555);
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                chmod_readable_tree(&e.path());
            }
        }
    } else {
        let extra = if mode & 0o100 != 0 { 0o555 } else { 0o444 };
        set_mode(path, mode | extra);
    }
}

/// A virtualenv made with `/usr/bin/python3 -m venv` holding `packages` from PyPI, readable
/// by every user: `/tmp/mod_wsgi_rs-venv-<hash of the package list>`. Made once per machine
/// (a `.mod_wsgi_rs-ready` file marks a finished one) under an exclusive lock, so parallel
/// tests and test binaries wait for one another instead of racing. Err (with pip's output)
/// when it cannot be made, e.g. PyPI is unreachable: callers `skip` loudly. A failure is
/// remembered for the rest of this test process, so later tests skip at once.
pub fn ensure_venv(packages: &[&str]) -> Result<PathBuf, String> {
    use std::collections::hash_map::DefaultHasher;
    use std::collections::HashMap;
    use std::hash::{Hash, Hasher};
    use std::os::unix::io::AsRawFd;
    use std::sync::Mutex;

    static FAILED: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

    let mut hasher = DefaultHasher::new();
    // The interpreter's real file (python3.11, …) too: a new Python gets a new virtualenv.
    let python = fs::canonicalize(SYSTEM_PYTHON).unwrap_or_else(|_| PathBuf::from(SYSTEM_PYTHON));
    ("mod_wsgi_rs venv v1", &python, packages).hash(&mut hasher);
    let dir = PathBuf::from(format!("/tmp/mod_wsgi_rs-venv-{:016x}", hasher.finish()));
    let key = dir.display().to_string();
    if let Some(why) = FAILED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Err(why.clone());
    }
    let ready = dir.join(".mod_wsgi_rs-ready");
    let lock_path = PathBuf::from(format!("{key}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    // Whoever runs the tests next (root or not) must be able to take the lock too.
    set_mode(&lock_path, 0o666);
    // SAFETY: flock on a descriptor we own; it is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "flock {}: {}",
            lock_path.display(),
            io::Error::last_os_error()
        ));
    }
    if ready.is_file() {
        return Ok(dir);
    }
    // Another test of this process may have failed while this one waited for the lock.
    if let Some(why) = FAILED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Err(why.clone());
    }
    let made = (|| -> Result<(), String> {
        let _ = fs::remove_dir_all(&dir);
        let _ = writeln!(
            io::stderr(),
            "making virtualenv {} with {packages:?} from PyPI (once per machine) …",
            dir.display()
        );
        let log = PathBuf::from(format!("{key}.log"));
        let mut venv = Command::new(SYSTEM_PYTHON);
        venv.args(["-m", "venv"]).arg(&dir);
        run_logged(venv, &log, Duration::from_secs(120))?;
        let mut pip = Command::new(dir.join("bin/python"));
        pip.args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--timeout",
            "30",
            "--retries",
            "2",
        ])
        .args(packages)
        .env("PIP_NO_CACHE_DIR", "1");
        run_logged(pip, &log, Duration::from_secs(300))?;
        chmod_readable_tree(&dir);
        set_mode(Path::new(&dir), 0o755);
        fs::write(&ready, packages.join("\n")).map_err(|e| e.to_string())?;
        set_mode(&ready, 0o644);
        Ok(())
    })();
    match made {
        Ok(()) => Ok(dir),
        Err(why) => {
            let _ = fs::remove_dir_all(&dir);
            FAILED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(key, why.clone());
            Err(why)
        }
    }
}

/// `let venv = require_venv!(&["six"]);` — the virtualenv, or a loud skip and return.
#[allow(unused_macros)]
macro_rules! require_venv {
    ($packages:expr) => {
        match $crate::common::ensure_venv($packages) {
            Ok(dir) => dir,
            Err(why) => {
                $crate::common::skip(&format!(
                    "cannot make a virtualenv with {:?} from PyPI: {}",
                    $packages, why
                ));
                return;
            }
        }
    };
}

/// A Request frame (see src/wire.rs) as an Apache worker would send it, with the given origin
/// secret: for tests that talk to a daemon socket directly.
pub fn forged_request(secret: &[u8], group: &str, script: &str) -> Vec<u8> {
    let mut payload = Vec::new();
    let mut pair = |k: &[u8], v: &[u8]| {
        payload.extend_from_slice(&(k.len() as u32).to_le_bytes());
        payload.extend_from_slice(k);
        payload.extend_from_slice(&(v.len() as u32).to_le_bytes());
        payload.extend_from_slice(v);
    };
    pair(b"", secret);
    pair(b"REQUEST_METHOD", b"GET");
    pair(b"SCRIPT_FILENAME", script.as_bytes());
    pair(b"mod_wsgi.process_group", group.as_bytes());
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// The pids of the daemon processes of `group`, from their "Starting process '<group>'" lines
/// (Apache's `[pid N:tid M]` prefix), oldest first.
pub fn started_pids(server: &TestServer, group: &str) -> Vec<u32> {
    let needle = format!("Starting process '{group}'");
    server
        .error_log()
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| {
            l.split("[pid ")
                .nth(1)?
                .split([':', ']'])
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The started daemons of `group` that are still alive and still children of this Apache
/// (so a recycled pid is never taken for ours).
pub fn live_daemons(server: &TestServer, group: &str) -> Vec<u32> {
    let parent = server.pid();
    let mut pids: Vec<u32> = started_pids(server, group)
        .into_iter()
        .filter(|&pid| matches!(proc_info(pid), Some(p) if !p.is_zombie() && p.ppid == parent))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILL, for a daemon or Apache child of ours.
pub fn kill9(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Turns for the tests of one test file: the ones that load the machine or measure latency run
/// alone (`alone()`), every other takes a shared turn (`shared()`), so that no test's load is
/// another's noise when libtest runs them in parallel. (Each test file is its own crate, so
/// each has its own lock.)
static TURNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

pub fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    TURNS.write().unwrap_or_else(|p| p.into_inner())
}

pub fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    TURNS.read().unwrap_or_else(|p| p.into_inner())
}
