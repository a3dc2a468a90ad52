//! Randomised robustness tests ("fuzzing" without cargo-fuzz, which needs a nightly toolchain):
//! a seeded PRNG, structure-aware generators and, for each target, properties that must hold
//! for every input: no panic, results consistent with a small model written from SPEC.md and
//! the module docs, and error messages that keep the `WSGIRS####:` contract. No ffi here.
//!
//! Targets: the directive parsers (`config`), the template expander and group selection
//! (`route`), the wire codec and frame reader (`wire`), the origin check, the daemon side of a
//! connection (`daemon::connection`, over a real socketpair) and the proxy (`proxy::forward`,
//! against a fake daemon speaking garbage).
//!
//! - `make fuzz` runs every `fuzz_*` test (ignored otherwise) for `FUZZ_SECONDS` each
//!   (default 10) from a random seed, printed first; `FUZZ_SEED=0x… make fuzz` replays a run,
//!   and `FUZZ_CASE=0x…` (the case seed a crash prints) re-runs that one input.
//! - `make test` runs the `quick_*` versions: a fixed seed, 2,000 inputs each (150 for the two
//!   socket targets), well under a second in all.
//! - A crash found becomes a `regression_*` test at the end of this file (ignored while the bug
//!   is open, with the bug in its ignore reason).

#![forbid(unsafe_code)]
// A failed unwrap in a test is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::daemon_process::{
    parse_daemon_process, split_raw_args, Account, AccountLookup, DaemonOption, DaemonProcessError,
    GroupId, ProcessGroupSpec,
};
use crate::config::process_group::GroupTemplate;
use crate::config::restrict::RestrictList;
use crate::config::script_alias::{parse_on_off, parse_script_alias, ScriptAliasOptions};
use crate::config::{match_prefix, parse_import_script, ImportScript, ImportScriptError};
use crate::daemon::connection::Connection;
use crate::daemon::origin::{check_request, constant_time_eq, OriginError, GROUP_KEY};
use crate::daemon::privileges::Identity;
use crate::daemon::{GroupRuntime, Registry};
use crate::proxy::{self, Client, ClientError, Outcome, ProxyError, Target};
use crate::route::{self, Origin, RequestVars, RouteError, RouteRequest, Variable};
use crate::wire::{self, Kind, WireError};

// ─────────────────────────────────────────────────────────────────────────────────────────────
// The engine: PRNG, budget, replay
// ─────────────────────────────────────────────────────────────────────────────────────────────

/// splitmix64: tiny, fast, and good enough to drive generators.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// 0..n (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Random bytes of a length drawn by `len`.
    fn some_bytes(&mut self, len: impl FnOnce(&mut Rng) -> usize) -> Vec<u8> {
        let n = len(self);
        self.bytes(n)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let word = self.next_u64().to_le_bytes();
            out.extend_from_slice(&word[..(len - out.len()).min(8)]);
        }
        out
    }

    /// A length skewed towards the small and the boundaries: mostly tiny, sometimes up to `max`.
    fn len(&mut self, max: usize) -> usize {
        let n = match self.below(20) {
            0..=9 => self.below(9),
            10..=15 => self.below(257),
            16..=18 => self.below(4097),
            _ => self.below(max + 1),
        };
        n.min(max)
    }
}

/// How big the generated inputs may get: the quick runs in `make test` are debug builds and
/// must stay well under a second in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Quick,
    Full,
}

impl Scale {
    /// The largest body, data or lie a case may allocate.
    fn big(self) -> usize {
        match self {
            Scale::Quick => 16 << 10,
            Scale::Full => 3 << 20,
        }
    }
}

const QUICK_SEED: u64 = 0x5EED_F022_2024_0001;
const QUICK_RUNS: u64 = 2_000;
/// The socket targets cost a socketpair and two threads per case.
const QUICK_SOCKET_RUNS: u64 = 150;

fn parse_u64(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn mix(seed: u64, n: u64) -> u64 {
    Rng::new(seed ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

/// Runs `one` on fresh inputs until the budget is spent; a panic is reported with the seed and
/// the case seed that reproduce it, then re-raised.
fn drive(name: &str, seed: u64, budget: Budget, mut one: impl FnMut(&mut Rng)) -> u64 {
    let watchdog = Watchdog::start(name, seed);
    let start = Instant::now();
    let mut runs = 0u64;
    loop {
        match budget {
            Budget::Runs(max) if runs >= max => break,
            Budget::Time(limit) if start.elapsed() >= limit => break,
            Budget::Case(_) if runs >= 1 => break,
            _ => {}
        }
        let case = match budget {
            Budget::Case(case) => case,
            _ => mix(seed, runs),
        };
        watchdog.starting(case);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| one(&mut Rng::new(case))));
        if let Err(crash) = outcome {
            eprintln!(
                "{name}: CRASH at execution {runs}: replay the run with FUZZ_SEED={seed:#x}, or \
                 just this input with FUZZ_CASE={case:#x} cargo test --release --lib {name} -- \
                 --ignored --nocapture"
            );
            panic::resume_unwind(crash);
        }
        runs += 1;
    }
    runs
}

/// A case that runs this long is hung (every socket wait in the cases gives up sooner).
const CASE_LIMIT: Duration = Duration::from_secs(60);

/// Aborts the test process, naming the case, when one case hangs: `make fuzz` must end.
struct Watchdog {
    current: std::sync::Arc<std::sync::Mutex<Option<(u64, Instant)>>>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    fn start(name: &str, seed: u64) -> Watchdog {
        let current = std::sync::Arc::new(std::sync::Mutex::new(None::<(u64, Instant)>));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (watched, finished, name) = (current.clone(), done.clone(), name.to_string());
        thread::spawn(move || {
            while !finished.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(200));
                let now = *watched.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((case, since)) = now {
                    if since.elapsed() > CASE_LIMIT && !finished.load(Ordering::Relaxed) {
                        eprintln!(
                            "{name}: HANG: one input ran for over {} s: replay with \
                             FUZZ_SEED={seed:#x}, or just it with FUZZ_CASE={case:#x}",
                            CASE_LIMIT.as_secs()
                        );
                        std::process::abort();
                    }
                }
            }
        });
        Watchdog { current, done }
    }

    fn starting(&self, case: u64) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((case, Instant::now()));
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
enum Budget {
    Runs(u64),
    Time(Duration),
    Case(u64),
}

thread_local! {
    /// How often each interesting path was taken in this thread's run: printed with the
    /// summary, so a generator that stopped reaching a path shows.
    static HITS: RefCell<BTreeMap<&'static str, u64>> = const { RefCell::new(BTreeMap::new()) };
}

fn hit(what: &'static str) {
    HITS.with(|h| *h.borrow_mut().entry(what).or_default() += 1);
}

fn take_hits(runs: u64) -> String {
    let hits = HITS.with(|h| std::mem::take(&mut *h.borrow_mut()));
    let shown: Vec<String> = hits
        .iter()
        .map(|(what, n)| format!("{what} {:.0}%", 100.0 * *n as f64 / runs.max(1) as f64))
        .collect();
    shown.join(", ")
}

/// A `make fuzz` target: FUZZ_SECONDS (default 10), FUZZ_SEED (default random), FUZZ_CASE.
fn fuzz(name: &str, one: impl FnMut(&mut Rng)) {
    let seconds = std::env::var("FUZZ_SECONDS")
        .ok()
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .unwrap_or_else(|| panic!("FUZZ_SECONDS={s:?} is not a number of seconds"))
        })
        .unwrap_or(10.0);
    let seed = match std::env::var("FUZZ_SEED") {
        Ok(s) => parse_u64(&s).unwrap_or_else(|| panic!("FUZZ_SEED={s:?} is not a number")),
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            mix(nanos ^ u64::from(std::process::id()), name.len() as u64)
        }
    };
    let budget = match std::env::var("FUZZ_CASE")
        .ok()
        .as_deref()
        .and_then(parse_u64)
    {
        Some(case) => {
            println!("{name}: replaying the single case {case:#x}");
            Budget::Case(case)
        }
        None => {
            println!("{name}: seed {seed:#x} (FUZZ_SEED={seed:#x} replays), {seconds} s");
            Budget::Time(Duration::from_secs_f64(seconds))
        }
    };
    let start = Instant::now();
    let runs = drive(name, seed, budget, one);
    println!(
        "{name}: {runs} executions in {:.1} s (seed {seed:#x}): no crash\n    paths: {}",
        start.elapsed().as_secs_f64(),
        take_hits(runs)
    );
}

/// A `make test` run: fixed seed, fixed count.
fn quick(name: &str, runs: u64, one: impl FnMut(&mut Rng)) {
    drive(name, QUICK_SEED, Budget::Runs(runs), one);
    println!(
        "{name}: {runs} executions: no crash\n    paths: {}",
        take_hits(runs)
    );
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// Generic generators
// ─────────────────────────────────────────────────────────────────────────────────────────────

/// Pieces that tend to matter to our parsers: option syntax, quotes, escapes, templates,
/// whitespace (ASCII and not), numbers at and past every bound, names that exist and do not.
const FRAGMENTS: &[&str] = &[
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\x0b",
    "\x0c",
    "\0",
    "=",
    "==",
    "\"",
    "'",
    "\\",
    "\\\"",
    "\\'",
    "\\\\",
    "#",
    ",",
    ",,",
    ":",
    "::",
    ";",
    "/",
    "//",
    "%",
    "%{",
    "}",
    "{",
    "ENV:",
    "%{ENV:",
    "%{GLOBAL}",
    "%{SERVER}",
    "%{HOST}",
    "%{RESOURCE}",
    "%{GROUP}",
    "%{ENV:PG}",
    "%{ENV:}",
    "%{env:PG}",
    "$",
    "é",
    "ß",
    "日本語",
    "🦀",
    "\u{a0}",
    "\u{2028}",
    "\u{3000}",
    "\u{feff}",
    "\u{fffd}",
    "\u{85}",
    "٣",
    "０",
    "0",
    "00",
    "1",
    "7",
    "8",
    "9",
    "-1",
    "+1",
    "1.5",
    "1e3",
    "0x10",
    "0o17",
    "022",
    "0777",
    "01000",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "9223372036854775808",
    "99999999999999999999999999999",
    "31536000",
    "31536001",
    "65533",
    "65534",
    "65535",
    "65536",
    "8191",
    "8192",
    "32768",
    "1048576",
    "1048577",
    "67108864",
    "67108865",
    "1000000",
    "1000001",
    "On",
    "Off",
    "on",
    "OFF",
    "oN",
    "yes",
    "true",
    "bob",
    "joe",
    "root",
    "staff",
    "nobody",
    "www-data",
    "été",
    "#0",
    "#33",
    "#1001",
    "#50",
    "#",
    "#x",
    "#-1",
    "#4294967296",
    "/",
    "/srv/app",
    "srv/app",
    "/tmp/x y",
    "a",
    "site",
    "bob:1",
    "www.site.com",
    "PG",
    "PATH",
    "HOME",
    "process-group",
    "application-group",
    "callable-object",
    "pass-authorization",
    "Process-Group",
    "python-eggs",
    "stack-size",
    "PROCESSES",
    "Threads",
    "user",
    "threads",
    "processes",
];

fn any_char(rng: &mut Rng) -> char {
    let code = match rng.below(4) {
        0 => rng.below(0x80),
        1 => rng.below(0x800),
        2 => rng.below(0x1_0000),
        _ => rng.below(0x11_0000),
    };
    char::from_u32(code as u32).unwrap_or('\u{fffd}')
}

/// A string of fragments, random characters and digit runs.
fn text(rng: &mut Rng) -> String {
    let mut out = String::new();
    for _ in 0..rng.below(7) {
        match rng.below(12) {
            0..=6 => out.push_str(rng.pick::<&str>(FRAGMENTS)),
            7 => out.push(any_char(rng)),
            8 => out.push(char::from(b' ' + rng.below(95) as u8)),
            9 => {
                for _ in 0..rng.below(30) {
                    out.push(char::from(b'0' + rng.below(10) as u8));
                }
            }
            10 => out.push_str(rng.pick::<&str>(&[" ", "\t", "\n", "\r", "\x0b", "\x0c"])),
            _ => out.push_str(rng.pick(&DaemonOption::ALL).key()),
        }
    }
    out
}

/// A non-empty string without ASCII whitespace (names, keys).
fn word(rng: &mut Rng) -> String {
    let mut w: String = text(rng).chars().filter(|c| !is_space(*c)).collect();
    if w.is_empty() {
        w.push_str(rng.pick::<&str>(&["site", "bob:1", "a", "%{GLOBAL}", "é", "x=y"]));
    }
    w
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn random_case(rng: &mut Rng, s: &str) -> String {
    s.chars()
        .map(|c| {
            if rng.coin() {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

fn shuffle<T>(rng: &mut Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i + 1));
    }
}

/// Flips, overwrites, inserts, deletes, truncates, and rewrites 4-byte lengths.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if at < data.len() => data[at] ^= 1 << rng.below(8),
            1 if at < data.len() => data[at] = rng.next_u64() as u8,
            2 => data.insert(at, rng.next_u64() as u8),
            3 if at < data.len() => {
                data.remove(at);
            }
            4 => data.truncate(at),
            _ if at + 4 <= data.len() => {
                let len = data.len() as u32;
                let lie = *rng.pick(&[0, 1, 4, len, len.wrapping_add(1), 0x8000_0000, u32::MAX]);
                data[at..at + 4].copy_from_slice(&lie.to_le_bytes());
            }
            _ => {}
        }
    }
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// WSGIDaemonProcess: parse_daemon_process, split_raw_args
// ─────────────────────────────────────────────────────────────────────────────────────────────

const USERS: &[(&str, u32, u32, &str)] = &[
    ("root", 0, 0, "/root"),
    ("www-data", 33, 33, "/var/www"),
    ("bob", 1001, 1001, "/home/bob"),
    ("joe", 1002, 1002, "/home/joe"),
    ("été", 1003, 1003, "/home/été"),
];

const GROUPS: &[(&str, u32)] = &[
    ("root", 0),
    ("www-data", 33),
    ("staff", 50),
    ("bob", 1001),
    ("joe", 1002),
    ("équipe", 1004),
];

struct FakeAccounts;

fn account(&(name, uid, gid, home): &(&str, u32, u32, &str)) -> Account {
    Account {
        name: name.into(),
        uid,
        gid,
        home: home.into(),
    }
}

fn group_id(&(name, gid): &(&str, u32)) -> GroupId {
    GroupId {
        name: name.into(),
        gid,
    }
}

impl AccountLookup for FakeAccounts {
    fn user_by_name(&self, name: &str) -> Option<Account> {
        USERS.iter().find(|u| u.0 == name).map(account)
    }
    fn user_by_uid(&self, uid: u32) -> Option<Account> {
        USERS.iter().find(|u| u.1 == uid).map(account)
    }
    fn group_by_name(&self, name: &str) -> Option<GroupId> {
        GROUPS.iter().find(|g| g.0 == name).map(group_id)
    }
    fn group_by_gid(&self, gid: u32) -> Option<GroupId> {
        GROUPS.iter().find(|g| g.1 == gid).map(group_id)
    }
}

/// SPEC §2's rule for each option's value, restated independently of daemon_process.rs.
#[derive(Debug, Clone, Copy)]
enum ValueRule {
    /// A whole number of ASCII digits in min..=max, or 0 when `zero` (off / the default).
    Number {
        min: u64,
        max: u64,
        zero: bool,
    },
    Umask,
    User {
        root_ok: bool,
    },
    Group,
    GroupList,
    AbsPath,
    PathList,
    NonEmpty,
}

const YEAR: u64 = 31_536_000;

fn value_rule(key: &str) -> Option<ValueRule> {
    use ValueRule::*;
    let n = |min, max, zero| Number { min, max, zero };
    Some(match key {
        "processes" => n(1, 1_000_000, false),
        "threads" => n(0, 65_533, false),
        "maximum-requests" | "cpu-time-limit" => n(0, u64::from(u32::MAX), true),
        "inactivity-timeout" | "request-timeout" | "restart-interval" | "startup-timeout"
        | "queue-timeout" | "socket-timeout" => n(0, YEAR, true),
        "graceful-timeout" | "shutdown-timeout" | "deadlock-timeout" | "connect-timeout" => {
            n(0, YEAR, false)
        }
        "listen-backlog" => n(0, 65_535, false),
        "header-buffer-size" => n(8_192, 1_048_576, true),
        "response-buffer-size" => n(65_536, 67_108_864, true),
        "memory-limit" | "virtual-memory-limit" => n(0, i64::MAX as u64, true),
        "umask" => Umask,
        "user" => User { root_ok: false },
        "socket-user" | "script-user" => User { root_ok: true },
        "group" | "script-group" => Group,
        "supplementary-groups" => GroupList,
        "home" | "python-home" | "chroot" => AbsPath,
        "python-path" => PathList,
        "display-name" | "lang" | "locale" => NonEmpty,
        _ => return None,
    })
}

/// The value of a string of ASCII digits, saturating far above any bound (None: not digits).
fn digits_value(v: &str) -> Option<u128> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = v.trim_start_matches('0');
    if significant.len() > 30 {
        return Some(u128::MAX);
    }
    Some(significant.parse::<u128>().unwrap_or(0))
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    Invalid,
    Root,
}

fn model_user(value: &str, root_ok: bool) -> Verdict {
    let found = match value.strip_prefix('#') {
        Some(id) => match digits_value(id) {
            Some(uid) if uid <= u128::from(u32::MAX) => {
                USERS.iter().find(|u| u128::from(u.1) == uid)
            }
            _ => None,
        },
        None => USERS.iter().find(|u| u.0 == value),
    };
    match found {
        None => Verdict::Invalid,
        Some(u) if u.1 == 0 && !root_ok => Verdict::Root,
        Some(_) => Verdict::Fine,
    }
}

fn model_group(value: &str) -> Verdict {
    let found = match value.strip_prefix('#') {
        Some(id) => match digits_value(id) {
            Some(gid) if gid <= u128::from(u32::MAX) => {
                GROUPS.iter().any(|g| u128::from(g.1) == gid)
            }
            _ => false,
        },
        None => GROUPS.iter().any(|g| g.0 == value),
    };
    if found {
        Verdict::Fine
    } else {
        Verdict::Invalid
    }
}

fn model_value(rule: ValueRule, value: &str) -> Verdict {
    let ok = |b: bool| if b { Verdict::Fine } else { Verdict::Invalid };
    match rule {
        ValueRule::Number { min, max, zero } => ok(match digits_value(value) {
            Some(0) if zero => true,
            Some(n) => (u128::from(min)..=u128::from(max)).contains(&n),
            None => false,
        }),
        ValueRule::Umask => {
            let octal = !value.is_empty() && value.bytes().all(|b| (b'0'..=b'7').contains(&b));
            let significant = value.trim_start_matches('0');
            ok(octal
                && significant.len() <= 3
                && u32::from_str_radix(
                    if significant.is_empty() {
                        "0"
                    } else {
                        significant
                    },
                    8,
                )
                .is_ok_and(|m| m <= 0o777))
        }
        ValueRule::User { root_ok } => model_user(value, root_ok),
        ValueRule::Group => model_group(value),
        ValueRule::GroupList => ok(value.is_empty()
            || value
                .split(',')
                .all(|g| !g.is_empty() && model_group(g) == Verdict::Fine)),
        ValueRule::AbsPath => ok(value.starts_with('/')),
        ValueRule::PathList => ok(!value.is_empty()
            && value
                .split(':')
                .all(|p| !p.is_empty() && p.starts_with('/'))),
        ValueRule::NonEmpty => ok(!value.is_empty()),
    }
}

/// The error code (or Ok) SPEC §2 predicts for a whole WSGIDaemonProcess line.
fn model_daemon_process(args: &[&str]) -> Result<(), u16> {
    match args.first() {
        Some(name) if !name.is_empty() => {}
        _ => return Err(101),
    }
    let (mut script_user, mut script_group) = (false, false);
    for token in &args[1..] {
        let Some((key, value)) = token.split_once('=') else {
            return Err(102);
        };
        let Some(rule) = value_rule(key) else {
            return Err(102);
        };
        let code = DaemonOption::from_key(key)
            .expect("every key of the model is an option")
            .code();
        match model_value(rule, value) {
            Verdict::Fine => {}
            Verdict::Invalid => return Err(code),
            Verdict::Root => return Err(124),
        }
        script_user |= key == "script-user";
        script_group |= key == "script-group";
    }
    if script_user && script_group {
        return Err(130);
    }
    Ok(())
}

/// A value for `key`: mostly near the rule (bounds, existing names, absolute paths), sometimes
/// noise.
fn option_value(rng: &mut Rng, key: &str) -> String {
    if rng.one_in(4) {
        return text(rng);
    }
    match value_rule(key) {
        Some(ValueRule::Number { min, max, .. }) => {
            let n = match rng.below(8) {
                0 => min,
                1 => max,
                2 => min.wrapping_sub(1),
                3 => max.wrapping_add(1),
                4 => 0,
                _ => min + rng.next_u64() % (max - min + 1),
            };
            let mut s = n.to_string();
            match rng.below(10) {
                0 => s.insert(0, '0'),
                1 => s.insert(0, '+'),
                2 => s.push(' '),
                3 => s.push_str("00000000000000000000"),
                _ => {}
            }
            s
        }
        Some(ValueRule::Umask) => match rng.below(4) {
            0 => format!("0{:o}", rng.below(0o1001)),
            1 => format!("{:o}", rng.below(0o10000)),
            _ => rng
                .pick(&[
                    "022",
                    "0",
                    "777",
                    "0777",
                    "1000",
                    "8",
                    "00000000000000000000777",
                ])
                .to_string(),
        },
        Some(ValueRule::User { .. }) => match rng.below(3) {
            0 => rng.pick(USERS).0.to_string(),
            1 => format!("#{}", rng.pick(USERS).1),
            _ => rng
                .pick(&["#", "#99999", "#4294967296", "nobody", "#x1", "ROOT"])
                .to_string(),
        },
        Some(ValueRule::Group) => group_value(rng),
        Some(ValueRule::GroupList) => {
            let items: Vec<String> = (0..rng.below(4)).map(|_| group_value(rng)).collect();
            let mut list = items.join(",");
            if rng.one_in(6) {
                list.push(',');
            }
            list
        }
        Some(ValueRule::AbsPath) => path_value(rng),
        Some(ValueRule::PathList) => {
            let items: Vec<String> = (0..1 + rng.below(3)).map(|_| path_value(rng)).collect();
            items.join(":")
        }
        Some(ValueRule::NonEmpty) => {
            if key == "display-name" && rng.coin() {
                "%{GROUP}".into()
            } else {
                text(rng)
            }
        }
        None => text(rng),
    }
}

fn group_value(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => rng.pick(GROUPS).0.to_string(),
        1 => format!("#{}", rng.pick(GROUPS).1),
        _ => rng
            .pick(&["#", "nogroup", "#77", "#99999999999", "STAFF", ""])
            .to_string(),
    }
}

fn path_value(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => format!("/{}", text(rng).replace(':', "")),
        1 => rng
            .pick(&["/", "/srv/app", "/tmp/x y", "/home/été", "//x"])
            .to_string(),
        2 => text(rng).replace(':', ""),
        _ => rng.pick(&["srv/app", "", "./x", "~/x"]).to_string(),
    }
}

/// A WSGIDaemonProcess token: mostly key=value with a known key, sometimes a near miss.
fn daemon_token(rng: &mut Rng) -> String {
    let key = rng.pick(&DaemonOption::ALL).key();
    match rng.below(12) {
        0 => text(rng),
        1 => format!("{}={}", random_case(rng, key), option_value(rng, key)),
        2 => format!(
            "{}={}",
            rng.pick(&[
                "python-eggs",
                "stack-size",
                "cpu-priority",
                "",
                "proc",
                "user "
            ]),
            text(rng)
        ),
        3 => key.to_string(),
        _ => format!("{key}={}", option_value(rng, key)),
    }
}

/// The options that recreate `spec` (one token per key, in a random order).
fn render_spec(rng: &mut Rng, spec: &ProcessGroupSpec) -> Vec<String> {
    let mut out = Vec::new();
    let mut put = |key: &str, value: String| out.push(format!("{key}={value}"));
    let secs = |d: std::time::Duration| d.as_secs().to_string();
    let path = |p: &PathBuf| p.to_str().expect("generated paths are UTF-8").to_string();
    let zero_or_omit = rng.coin();
    if spec.multiprocess {
        put("processes", spec.processes.to_string());
    }
    put("threads", spec.threads.to_string());
    if let Some(u) = &spec.user {
        put("user", u.name.clone());
    }
    if let Some(g) = &spec.group {
        put("group", format!("#{}", g.gid));
    }
    if let Some(list) = &spec.supplementary_groups {
        let names: Vec<&str> = list.iter().map(|g| g.name.as_str()).collect();
        put("supplementary-groups", names.join(","));
    }
    if let Some(p) = &spec.home {
        put("home", path(p));
    }
    if let Some(d) = &spec.display_name {
        put("display-name", d.clone());
    }
    if let Some(p) = &spec.python_home {
        put("python-home", path(p));
    }
    if !spec.python_path.is_empty() {
        let all: Vec<String> = spec.python_path.iter().map(path).collect();
        put("python-path", all.join(":"));
    }
    if let Some(m) = spec.umask {
        put("umask", format!("{m:o}"));
    }
    if let Some(l) = &spec.lang {
        put("lang", l.clone());
    }
    if let Some(l) = &spec.locale {
        put("locale", l.clone());
    }
    if let Some(p) = &spec.chroot {
        put("chroot", path(p));
    }
    put("maximum-requests", spec.maximum_requests.to_string());
    for (key, value) in [
        ("inactivity-timeout", spec.inactivity_timeout),
        ("request-timeout", spec.request_timeout),
        ("restart-interval", spec.restart_interval),
        ("startup-timeout", spec.startup_timeout),
        ("socket-timeout", spec.socket_timeout),
        ("queue-timeout", spec.queue_timeout),
    ] {
        match value {
            Some(d) => put(key, secs(d)),
            None if zero_or_omit => put(key, "0".into()),
            None => {}
        }
    }
    put("graceful-timeout", secs(spec.graceful_timeout));
    put("shutdown-timeout", secs(spec.shutdown_timeout));
    put("deadlock-timeout", secs(spec.deadlock_timeout));
    put("connect-timeout", secs(spec.connect_timeout));
    put("listen-backlog", spec.listen_backlog.to_string());
    put("header-buffer-size", spec.header_buffer_size.to_string());
    put(
        "response-buffer-size",
        spec.response_buffer_size.to_string(),
    );
    for (key, value) in [
        ("memory-limit", spec.memory_limit),
        ("virtual-memory-limit", spec.virtual_memory_limit),
        ("cpu-time-limit", spec.cpu_time_limit),
    ] {
        match value {
            Some(n) => put(key, n.to_string()),
            None if zero_or_omit => put(key, "0".into()),
            None => {}
        }
    }
    if let Some(u) = &spec.socket_user {
        put("socket-user", format!("#{}", u.uid));
    }
    if let Some(u) = &spec.script_user {
        put("script-user", u.name.clone());
    }
    if let Some(g) = &spec.script_group {
        put("script-group", g.name.clone());
    }
    shuffle(rng, &mut out);
    out
}

/// How `split_raw_args` (Apache's ap_getword_conf) reads back one word, or None when no quoting
/// can carry it (a word ending in a backslash that needs quotes: `\"` would escape the quote).
fn quote_word(w: &str) -> Option<String> {
    if !w.is_empty() && !w.contains(is_space) && !w.starts_with(['"', '\'']) {
        Some(w.to_string())
    } else if w.ends_with('\\') {
        None
    } else {
        Some(format!("\"{}\"", w.replace('"', "\\\"")))
    }
}

/// An option token as written on a directive line (the key is never quoted).
fn quote_option(token: &str) -> Option<String> {
    match token.split_once('=') {
        Some((key, value)) if !key.contains(is_space) => {
            Some(format!("{key}={}", quote_word(value)?))
        }
        Some(_) => None,
        None if !token.is_empty() && !token.contains(is_space) => Some(token.to_string()),
        None => None,
    }
}

fn spaces(rng: &mut Rng) -> String {
    (0..1 + rng.below(3))
        .map(|_| *rng.pick(&[" ", " ", "\t", "  ", "\x0b", "\x0c", "\r", "\n"]))
        .collect()
}

/// Joins words into a directive line; None when a word cannot be written.
fn join_line(rng: &mut Rng, positional: &[String], options: &[String]) -> Option<String> {
    let mut line = if rng.coin() {
        spaces(rng)
    } else {
        String::new()
    };
    for (i, w) in positional.iter().enumerate() {
        if i > 0 {
            line.push_str(&spaces(rng));
        }
        line.push_str(&quote_word(w)?);
    }
    for t in options {
        line.push_str(&spaces(rng));
        line.push_str(&quote_option(t)?);
    }
    if rng.coin() {
        line.push_str(&spaces(rng));
    }
    Some(line)
}

fn check_daemon_error(args: &[&str], err: &DaemonProcessError) {
    let msg = err.to_string();
    let id = format!("WSGIRS{:04}: ", err.code());
    assert!(
        msg.starts_with(&id),
        "{msg:?} does not start with {id:?} ({args:?})"
    );
    assert!(
        msg.contains("WSGIDaemonProcess"),
        "{msg:?} does not name the directive"
    );
    if !matches!(err, DaemonProcessError::MissingName) {
        assert!(
            msg.contains(&format!("'{}'", args[0])),
            "{msg:?} does not name the group {:?}",
            args[0]
        );
    }
    match err {
        DaemonProcessError::InvalidValue { option, value, .. } => {
            let got = format!("Got '{}={value}'", option.key());
            assert!(msg.contains(&got), "{msg:?} does not quote {got:?}");
            assert!((103..=137).contains(&err.code()));
        }
        DaemonProcessError::InvalidOption { token, .. } => {
            assert!(
                msg.contains(&format!("Got '{token}'")),
                "{msg:?} hides the token"
            );
        }
        _ => {}
    }
}

fn check_spec_invariants(args: &[&str], spec: &ProcessGroupSpec) {
    assert_eq!(spec.name, args[0]);
    assert_eq!(
        spec.multiprocess,
        args[1..].iter().any(|t| t.starts_with("processes=")),
        "multiprocess must mean processes= was given: {args:?}"
    );
    assert!((1..=1_000_000).contains(&spec.processes));
    assert!(spec.threads <= 65_533);
    assert!((8_192..=1_048_576).contains(&spec.header_buffer_size));
    assert!((65_536..=67_108_864).contains(&spec.response_buffer_size));
    assert!(spec.umask.is_none_or(|m| m <= 0o777));
    assert!(
        spec.user.as_ref().is_none_or(|u| u.uid != 0),
        "root accepted: {args:?}"
    );
    assert!(!(spec.script_user.is_some() && spec.script_group.is_some()));
    for d in [
        spec.inactivity_timeout,
        spec.request_timeout,
        spec.restart_interval,
        spec.startup_timeout,
        spec.socket_timeout,
        spec.queue_timeout,
    ]
    .into_iter()
    .flatten()
    {
        assert!(
            d.as_secs() >= 1 && d.as_secs() <= YEAR,
            "{d:?} from {args:?}"
        );
    }
    for p in spec
        .python_path
        .iter()
        .chain(&spec.home)
        .chain(&spec.python_home)
        .chain(&spec.chroot)
    {
        assert!(p.is_absolute(), "{p:?} from {args:?}");
    }
    for limit in [
        spec.memory_limit,
        spec.virtual_memory_limit,
        spec.cpu_time_limit,
    ] {
        assert_ne!(limit, Some(0));
    }
}

fn daemon_process_case(rng: &mut Rng) {
    let name = if rng.one_in(20) {
        String::new()
    } else {
        word(rng)
    };
    let mut owned = vec![name];
    for _ in 0..rng.below(7) {
        owned.push(daemon_token(rng));
    }
    if rng.one_in(30) {
        owned.clear();
    }
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let got = parse_daemon_process(&args, &FakeAccounts);

    // Same answer twice, and the answer SPEC §2 predicts.
    assert_eq!(got, parse_daemon_process(&args, &FakeAccounts));
    assert_eq!(
        got.as_ref().map(|_| ()).map_err(DaemonProcessError::code),
        model_daemon_process(&args),
        "{args:?} → {got:?}"
    );
    let spec = match got {
        Err(e) => {
            hit(if e.code() == 102 {
                "bad option"
            } else {
                "bad value"
            });
            return check_daemon_error(&args, &e);
        }
        Ok(spec) => spec,
    };
    hit("parsed");
    check_spec_invariants(&args, &spec);

    // The spec re-parsed from its own options (any order) is the same spec.
    let rendered = render_spec(rng, &spec);
    let mut again: Vec<&str> = vec![&spec.name];
    again.extend(rendered.iter().map(String::as_str));
    assert_eq!(
        parse_daemon_process(&again, &FakeAccounts).as_ref(),
        Ok(&spec),
        "re-parsing {again:?} (from {args:?})"
    );

    // And so is the directive line those options make, read back by split_raw_args.
    if let Some(line) = join_line(rng, &owned[..1], &rendered) {
        let words = split_raw_args(&line, 1);
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        assert_eq!(words, again, "split_raw_args({line:?})");
        assert_eq!(parse_daemon_process(&words, &FakeAccounts), Ok(spec));
        hit("line round trip");
    }
}

/// Random raw lines for split_raw_args: no panic, bounded output, and re-joining its words
/// gives the same words; then the words go through parse_daemon_process as httpd does.
fn split_raw_args_case(rng: &mut Rng) {
    let raw = if rng.coin() {
        text(rng) + &text(rng) + &text(rng)
    } else {
        let mut parts: Vec<String> = (0..rng.below(6)).map(|_| daemon_token(rng)).collect();
        parts.insert(0, word(rng));
        let mut line = String::new();
        for p in parts {
            line.push_str(&p);
            line.push_str(&spaces(rng));
        }
        line
    };
    let positional = *rng.pick(&[0, 1, 2, 3, usize::MAX]);
    let words = split_raw_args(&raw, positional);
    assert!(words.len() <= raw.len(), "{raw:?} → {words:?}");
    if raw.chars().all(is_space) {
        assert!(words.is_empty());
    }
    let fixed = positional.min(words.len());
    let (first, rest) = words.split_at(fixed);
    if rest.iter().all(|t| !t.is_empty()) {
        if let Some(line) = join_line(rng, first, rest) {
            assert_eq!(
                split_raw_args(&line, positional),
                words,
                "{raw:?} → {line:?}"
            );
            hit("re-joined");
        }
    }
    let words = split_raw_args(&raw, 1);
    let args: Vec<&str> = words.iter().map(String::as_str).collect();
    match parse_daemon_process(&args, &FakeAccounts) {
        Ok(spec) => {
            hit("parsed");
            check_spec_invariants(&args, &spec);
        }
        Err(e) => check_daemon_error(&args, &e),
    }
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// WSGIScriptAlias, On|Off flags, WSGIImportScript, match_prefix
// ─────────────────────────────────────────────────────────────────────────────────────────────

const ALIAS_KEYS: [&str; 4] = [
    "process-group",
    "application-group",
    "callable-object",
    "pass-authorization",
];

fn flag_value(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => {
            let base = *rng.pick(&["on", "off"]);
            random_case(rng, base)
        }
        1 => rng
            .pick(&["On", "Off", "1", "0", "yes", "o n", "onn", "", "ON\0", "İN"])
            .to_string(),
        _ => text(rng),
    }
}

fn alias_token(rng: &mut Rng) -> String {
    let key = *rng.pick(&ALIAS_KEYS);
    let value = if key == "pass-authorization" {
        flag_value(rng)
    } else if rng.one_in(8) {
        String::new()
    } else {
        text(rng)
    };
    match rng.below(10) {
        0 => text(rng),
        1 => format!("{}={value}", random_case(rng, key)),
        2 => format!(
            "{}={value}",
            rng.pick(&["", "processgroup", "python-path", "x"])
        ),
        _ => format!("{key}={value}"),
    }
}

/// SPEC §4: two non-empty words, then key=value options, last one wins.
fn model_script_alias(args: &[&str]) -> Result<ScriptAliasOptions, u16> {
    let [location, file, options @ ..] = args else {
        return Err(150);
    };
    if location.is_empty() || file.is_empty() {
        return Err(151);
    }
    let mut parsed = ScriptAliasOptions::default();
    for token in options {
        let Some((key, value)) = token.split_once('=') else {
            return Err(152);
        };
        let Some(index) = ALIAS_KEYS.iter().position(|k| *k == key) else {
            return Err(152);
        };
        let code = 153 + index as u16;
        if value.is_empty() {
            return Err(code);
        }
        match index {
            0 => parsed.process_group = Some(value.to_string()),
            1 => parsed.application_group = Some(value.to_string()),
            2 => parsed.callable_object = Some(value.to_string()),
            _ if value.eq_ignore_ascii_case("on") => parsed.pass_authorization = Some(true),
            _ if value.eq_ignore_ascii_case("off") => parsed.pass_authorization = Some(false),
            _ => return Err(code),
        }
    }
    Ok(parsed)
}

fn render_alias_options(rng: &mut Rng, o: &ScriptAliasOptions) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(v) = &o.process_group {
        out.push(format!("process-group={v}"));
    }
    if let Some(v) = &o.application_group {
        out.push(format!("application-group={v}"));
    }
    if let Some(v) = &o.callable_object {
        out.push(format!("callable-object={v}"));
    }
    if let Some(v) = o.pass_authorization {
        let flag = random_case(rng, if v { "on" } else { "off" });
        out.push(format!("pass-authorization={flag}"));
    }
    shuffle(rng, &mut out);
    out
}

fn script_alias_case(rng: &mut Rng) {
    let directive = *rng.pick(&["WSGIScriptAlias", "WSGIScriptAliasMatch"]);
    let mut owned: Vec<String> = Vec::new();
    for _ in 0..rng.below(3) {
        owned.push(if rng.one_in(10) {
            String::new()
        } else {
            word(rng)
        });
    }
    if owned.len() == 2 || rng.coin() {
        for _ in 0..rng.below(6) {
            owned.push(alias_token(rng));
        }
    }
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let got = parse_script_alias(directive, &args);
    assert_eq!(
        got.as_ref()
            .map(|(_, _, o)| o.clone())
            .map_err(|e| e.code()),
        model_script_alias(&args),
        "{directive} {args:?} → {got:?}"
    );
    match got {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("WSGIRS{:04}: {directive} ", e.code())),
                "{msg:?}"
            );
            if e.code() >= 152 {
                assert!(
                    msg.contains(&format!("'{}'", args[0])),
                    "{msg:?} hides the location"
                );
            }
        }
        Ok((location, file, options)) => {
            hit("parsed");
            assert_eq!((location.as_str(), file.as_str()), (args[0], args[1]));
            let mut again = vec![location.clone(), file.clone()];
            again.extend(render_alias_options(rng, &options));
            let again_args: Vec<&str> = again.iter().map(String::as_str).collect();
            let reparsed = parse_script_alias(directive, &again_args);
            assert_eq!(reparsed, Ok((location, file, options.clone())));
            if let Some(line) = join_line(rng, &again[..2], &again[2..]) {
                let words = split_raw_args(&line, 2);
                assert_eq!(words, again, "split_raw_args({line:?}, 2)");
            }
        }
    }

    // On|Off flags, any ASCII case, nothing else.
    let value = flag_value(rng);
    let flag_directive = *rng.pick(&["WSGIPassAuthorization", "WSGIScriptReloading", "X"]);
    match parse_on_off(flag_directive, &value) {
        Ok(v) => {
            hit("flag");
            let expected = if v { "on" } else { "off" };
            assert!(value.eq_ignore_ascii_case(expected), "{value:?} → {v}");
        }
        Err(e) => {
            assert!(!value.eq_ignore_ascii_case("on") && !value.eq_ignore_ascii_case("off"));
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("WSGIRS0160: {flag_directive} must be one of")));
            assert!(msg.contains(&format!("Got '{value}'")), "{msg:?}");
            assert_eq!(e.code(), 160);
        }
    }
}

fn import_script_error_code(e: &ImportScriptError) -> u16 {
    match e {
        ImportScriptError::MissingScript => 184,
        ImportScriptError::InvalidOption { .. } => 185,
        ImportScriptError::NeedsGroup { .. } => 186,
    }
}

fn model_import_script(args: &[&str]) -> Result<ImportScript, u16> {
    let (script, options) = args.split_first().ok_or(184u16)?;
    let mut import = ImportScript {
        script: script.to_string(),
        process_group: String::new(),
        application_group: None,
    };
    for token in options {
        match token.split_once('=') {
            Some(("process-group", v)) if !v.is_empty() => import.process_group = v.into(),
            Some(("application-group", v)) if !v.is_empty() => {
                import.application_group = Some(v.into())
            }
            _ => return Err(185),
        }
    }
    if import.process_group.is_empty() || import.process_group.contains("%{") {
        return Err(186);
    }
    Ok(import)
}

fn prefix_segment(rng: &mut Rng) -> String {
    rng.pick(&["", "app", "App", "a b", "%2F", "é", ".", "..", "x/", "/"])
        .to_string()
}

fn import_script_and_prefix_case(rng: &mut Rng) {
    let mut owned: Vec<String> = Vec::new();
    for _ in 0..rng.below(5) {
        owned.push(match rng.below(6) {
            0 => text(rng),
            1 => format!(
                "process-group={}",
                rng.pick(&["site", "", "%{GLOBAL}", "a=b", "%{"])
            ),
            2 => format!("application-group={}", text(rng)),
            3 => format!("{}={}", random_case(rng, "process-group"), word(rng)),
            _ => format!("process-group={}", word(rng)),
        });
    }
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let got = parse_import_script(&args);
    assert_eq!(
        got.as_ref().map_err(import_script_error_code).cloned(),
        model_import_script(&args),
        "{args:?}"
    );
    if got.is_ok() {
        hit("import parsed");
    }
    if let Err(e) = got {
        let msg = e.to_string();
        let id = format!(
            "WSGIRS{:04}: WSGIImportScript",
            import_script_error_code(&e)
        );
        assert!(msg.starts_with(&id), "{msg:?}");
    }

    // match_prefix: whole path segments of the location, trailing slashes ignored, on bytes.
    let mut location = String::new();
    for _ in 0..rng.below(4) {
        location.push('/');
        location.push_str(&prefix_segment(rng));
    }
    if rng.one_in(8) {
        location = text(rng);
    }
    let mut uri: Vec<u8> = if rng.coin() {
        location.trim_end_matches('/').as_bytes().to_vec()
    } else {
        Vec::new()
    };
    for _ in 0..rng.below(3) {
        if rng.coin() {
            uri.push(b'/');
        }
        uri.extend_from_slice(prefix_segment(rng).as_bytes());
        if rng.one_in(4) {
            uri.extend(rng.some_bytes(|r| r.below(4)));
        }
    }
    let got = match_prefix(&location, &uri);
    let trimmed = location.trim_end_matches('/').as_bytes();
    let expected = (uri.starts_with(trimmed)
        && (uri.len() == trimmed.len() || uri[trimmed.len()] == b'/'))
        .then_some(trimmed.len());
    assert_eq!(
        got,
        expected,
        "match_prefix({location:?}, {:?})",
        String::from_utf8_lossy(&uri)
    );
    if got.is_some() {
        hit("prefix matched");
    }
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// Templates, restrict lists, expansion and group selection
// ─────────────────────────────────────────────────────────────────────────────────────────────

fn env_name(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => text(rng),
        1 => rng
            .pick(&["PATH", "HOME", "", "A=B", "NUL\0", "}", "PG}"])
            .to_string(),
        _ => rng
            .pick(&["PG", "GROUP", "TWICE", "LOOP", "X", "é"])
            .to_string(),
    }
}

fn template_value(rng: &mut Rng) -> String {
    match rng.below(12) {
        0 => "%{GLOBAL}".into(),
        1 => "%{SERVER}".into(),
        2 => "%{HOST}".into(),
        3 => "%{RESOURCE}".into(),
        4..=6 => format!("%{{ENV:{}}}", env_name(rng)),
        7 => format!(
            "{}{}{}",
            rng.pick(&["", "x", "%{ENV:", "%{", "%{env:", " "]),
            env_name(rng),
            rng.pick(&["", "}", "}}", "}-x", "} ", "%{SERVER}"])
        ),
        8 => rng
            .pick(&["site", "bob:1", "", "%{GLOBAL}x", "%{ENV:}", "%{ENV:PG}x"])
            .to_string(),
        _ => text(rng),
    }
}

fn model_template(value: &str) -> GroupTemplate<'_> {
    match value {
        "%{GLOBAL}" => GroupTemplate::Global,
        "%{SERVER}" => GroupTemplate::Server,
        "%{HOST}" => GroupTemplate::Host,
        "%{RESOURCE}" => GroupTemplate::Resource,
        _ if value.len() > "%{ENV:}".len()
            && value.starts_with("%{ENV:")
            && value.ends_with('}')
            && !value["%{ENV:".len()..value.len() - 1].contains('}') =>
        {
            GroupTemplate::Env(&value["%{ENV:".len()..value.len() - 1])
        }
        _ => GroupTemplate::Literal(value),
    }
}

fn restrict_and_templates_case(rng: &mut Rng) {
    let value = template_value(rng);
    let parsed = GroupTemplate::parse(&value);
    assert_eq!(parsed, model_template(&value), "{value:?}");
    if let GroupTemplate::Env(_) = parsed {
        hit("env template");
    }

    let entries: Vec<String> = (0..rng.below(5))
        .map(|_| match rng.below(4) {
            0 => "%{GLOBAL}".into(),
            1 => {
                let base = *rng.pick(&["bob:1", "site", "%{global}"]);
                random_case(rng, base)
            }
            _ => word(rng),
        })
        .collect();
    let list = RestrictList::new(&entries);
    let described = list.describe();
    assert!(!described.is_empty());
    for e in &entries {
        assert!(described.contains(e.as_str()), "{described:?} hides {e:?}");
    }
    for _ in 0..4 {
        let name = match rng.below(4) {
            0 if !entries.is_empty() => {
                let base = rng.pick(&entries).clone();
                random_case(rng, &base)
            }
            1 => String::new(),
            _ => word(rng),
        };
        let expected = if name.is_empty() {
            entries.iter().any(|e| e == "%{GLOBAL}")
        } else {
            entries
                .iter()
                .any(|e| e != "%{GLOBAL}" && e.eq_ignore_ascii_case(&name))
        };
        assert_eq!(
            list.permits(&name),
            expected,
            "{entries:?} permits {name:?}"
        );
        if expected {
            hit("permitted");
        }
    }
}

struct Vars {
    notes: HashMap<String, String>,
    env: HashMap<String, String>,
    server: String,
    host: String,
    script_name: String,
}

impl RequestVars for Vars {
    fn note(&self, name: &str) -> Option<String> {
        self.notes.get(name).cloned()
    }
    fn request_env(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned()
    }
    fn server(&self) -> String {
        self.server.clone()
    }
    fn host(&self) -> String {
        self.host.clone()
    }
    fn script_name(&self) -> String {
        self.script_name.clone()
    }
}

/// SPEC §3's expansion, written out again.
fn model_expand(value: &str, vars: &Vars) -> (String, Option<Variable>) {
    fn once(value: &str, vars: &Vars) -> String {
        match model_template(value) {
            GroupTemplate::Global => String::new(),
            GroupTemplate::Server => vars.server.clone(),
            GroupTemplate::Host => vars.host.clone(),
            GroupTemplate::Resource => {
                format!("{}|{}", vars.server, vars.script_name.to_lowercase())
            }
            // Never reached from the first level: an %{ENV…} value is not expanded again.
            GroupTemplate::Env(_) | GroupTemplate::Literal(_) => value.to_string(),
        }
    }
    let GroupTemplate::Env(name) = model_template(value) else {
        return (once(value, vars), None);
    };
    let found = if let Some(v) = vars.notes.get(name) {
        Some((v.clone(), Origin::Notes))
    } else if let Some(v) = vars.env.get(name) {
        Some((v.clone(), Origin::RequestEnv))
    } else {
        std::env::var(name).ok().map(|v| (v, Origin::ProcessEnv))
    };
    match found {
        None => (
            value.to_string(),
            Some(Variable {
                name: name.into(),
                origin: Origin::Unset,
                value: String::new(),
            }),
        ),
        Some((v, origin)) => {
            let name_out = if v.starts_with("%{") && !v.starts_with("%{ENV") {
                once(&v, vars)
            } else {
                v.clone()
            };
            (
                name_out,
                Some(Variable {
                    name: name.into(),
                    origin,
                    value: v,
                }),
            )
        }
    }
}

fn runtime(index: usize, name: &str, scope: Option<String>) -> GroupRuntime {
    GroupRuntime {
        index,
        spec: ProcessGroupSpec::new(name),
        scope,
        socket_path: PathBuf::from("/nonexistent/fuzz.sock"),
        socket_timeout: Duration::from_secs(1),
        identity: Identity {
            user_name: "www-data".into(),
            uid: 33,
            gid: 33,
            supplementary: None,
        },
        home: PathBuf::from("/"),
        worker_uid: 33,
        import_scripts: Vec::new(),
        load: crate::load::LoadBoard::default(),
    }
}

fn route_case(rng: &mut Rng) {
    let server = rng
        .pick(&["www.site.com", "www.site.com:8080", "", "%{ENV:PG}"])
        .to_string();
    let mut vars = Vars {
        notes: HashMap::new(),
        env: HashMap::new(),
        server: if rng.one_in(5) { text(rng) } else { server },
        host: if rng.coin() {
            text(rng)
        } else {
            "alias.site.com".into()
        },
        script_name: if rng.coin() {
            text(rng)
        } else {
            "/Blog/App.WSGI".into()
        },
    };
    for _ in 0..rng.below(4) {
        let (k, v) = (env_name(rng), template_value(rng));
        vars.env.insert(k, v);
    }
    for _ in 0..rng.below(3) {
        let (k, v) = (env_name(rng), template_value(rng));
        vars.notes.insert(k, v);
    }
    let set: Vec<String> = vars.env.keys().chain(vars.notes.keys()).cloned().collect();
    let configured = if !set.is_empty() && rng.one_in(3) {
        format!("%{{ENV:{}}}", rng.pick(&set))
    } else {
        template_value(rng)
    };
    let e = route::expand(&configured, &vars);
    let (name, variable) = model_expand(&configured, &vars);
    assert_eq!(
        (&e.name, &e.variable),
        (&name, &variable),
        "expand({configured:?})"
    );
    assert_eq!(e.configured, configured);
    hit(match e.variable.as_ref().map(|v| v.origin) {
        None => "no variable",
        Some(Origin::Unset) => "unset",
        Some(Origin::Notes) => "from notes",
        Some(Origin::RequestEnv) => "from request env",
        Some(Origin::ProcessEnv) => "from process env",
    });
    if e.name.contains("%{ENV:") {
        // Only an unset variable or a literal leaves a template in the name, or a found value
        // used verbatim: never one expanded a second time.
        let verbatim = e.variable.as_ref().is_some_and(|v| v.value == e.name);
        let unexpanded = e.name == configured
            && e.variable
                .as_ref()
                .is_none_or(|v| v.origin == Origin::Unset);
        let from_request = [&vars.server, &vars.host].contains(&&e.name)
            || e.name.starts_with(&format!("{}|", vars.server));
        assert!(
            verbatim || unexpanded || from_request,
            "{configured:?} → {e:?}"
        );
    }
    let _ = e.to_string();

    // select, against SPEC §3's order.
    let pool = [
        name.clone(),
        "site".into(),
        "bob:1".into(),
        "www.site.com:8080".into(),
        configured.clone(),
        word(rng),
    ];
    let mut registry = Registry::default();
    for i in 0..rng.below(6) {
        let scope = match rng.below(3) {
            0 => None,
            1 => Some("www.site.com".to_string()),
            _ => Some(word(rng)),
        };
        registry
            .groups
            .push(runtime(i, &rng.pick(&pool).clone(), scope));
    }
    let restrict_entries: Vec<String> = (0..rng.below(4))
        .map(|_| match rng.below(3) {
            0 => "%{GLOBAL}".into(),
            1 => random_case(rng, &name),
            _ => rng.pick(&pool).clone(),
        })
        .collect();
    let restrict = RestrictList::new(&restrict_entries);
    let server_name = rng
        .pick(&["www.site.com", "other.site.com", ""])
        .to_string();
    let request = RouteRequest {
        configured: &configured,
        restrict: rng.coin().then_some(&restrict),
        server_name: &server_name,
        script: "/home/bob/public_html/app.wsgi",
    };
    let got = route::select(&registry, &request, &vars);
    hit(match &got {
        Ok(_) => "selected",
        Err(RouteError::NotAllowed { .. }) => "not allowed",
        Err(RouteError::Embedded { .. }) => "embedded",
        Err(RouteError::Unknown { .. }) => "unknown",
        Err(RouteError::OtherVirtualHost { .. }) => "other vhost",
    });
    let permitted = request.restrict.is_none_or(|l| l.permits(&name));
    let found = registry.groups.iter().find(|g| g.spec.name == name);
    match (&got, permitted, name.is_empty(), found) {
        (Err(RouteError::NotAllowed { group, .. }), false, _, _) => assert_eq!(group, &name),
        (Err(RouteError::Embedded { .. }), true, true, _) => {}
        (Err(RouteError::Unknown { group, .. }), true, false, None) => assert_eq!(group, &name),
        (Err(RouteError::OtherVirtualHost { group_host, .. }), true, false, Some(g)) => {
            assert_eq!(g.scope.as_ref(), Some(group_host));
            assert_ne!(group_host, &server_name);
        }
        (Ok((g, expansion)), true, false, Some(first)) => {
            assert_eq!(g.index, first.index, "not the first group of that name");
            assert!(g.scope.as_ref().is_none_or(|s| *s == server_name));
            assert_eq!(expansion.name, name);
        }
        _ => panic!(
            "select({configured:?} → {name:?}, restrict {restrict_entries:?}, vhost \
             {server_name:?}) gave {got:?}"
        ),
    }
    if let Err(e) = got {
        let msg = e.to_string();
        assert!(msg.starts_with("WSGIRS020"), "{msg:?}");
        assert!(msg.contains("/home/bob/public_html/app.wsgi"), "{msg:?}");
        assert_eq!(e.status(), 500);
    }
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// The wire: codec, frames, origin check
// ─────────────────────────────────────────────────────────────────────────────────────────────

/// The caps the module docs promise for each kind.
fn model_cap(kind: Kind, header_cap: usize) -> usize {
    match kind {
        Kind::Request => 8 << 20,
        Kind::Body | Kind::Data => 1 << 20,
        Kind::BodyEnd | Kind::Goodbye => 0,
        Kind::ReadBody | Kind::End | Kind::Region | Kind::BodySlot => 4,
        Kind::DataSlot => 8,
        Kind::Fail => 2,
        Kind::Headers => header_cap,
    }
}

fn model_kind(byte: u8) -> Option<Kind> {
    Some(match byte {
        1 => Kind::Request,
        2 => Kind::Body,
        3 => Kind::BodyEnd,
        4 => Kind::ReadBody,
        5 => Kind::Headers,
        6 => Kind::Data,
        7 => Kind::End,
        8 => Kind::Fail,
        9 => Kind::Goodbye,
        10 => Kind::Region,
        11 => Kind::BodySlot,
        12 => Kind::DataSlot,
        _ => return None,
    })
}

fn model_push_pair(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

fn raw_frame(out: &mut Vec<u8>, kind: u8, declared: u32, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&declared.to_le_bytes());
    out.extend_from_slice(payload);
}

fn model_frame(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    raw_frame(out, kind as u8, payload.len() as u32, payload);
}

/// How a stream of frames ends for read_frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StreamEnd {
    Closed,
    Truncated,
    UnknownKind(u8),
    Oversized { kind: Kind, len: usize, cap: usize },
}

/// Reads a byte stream as read_frame should: the whole frames, then why it stopped.
fn model_frames(bytes: &[u8], header_cap: usize) -> (Vec<(Kind, Vec<u8>)>, StreamEnd) {
    let mut frames = Vec::new();
    let mut rest = bytes;
    loop {
        if rest.is_empty() {
            return (frames, StreamEnd::Closed);
        }
        if rest.len() < 5 {
            return (frames, StreamEnd::Truncated);
        }
        let Some(kind) = model_kind(rest[0]) else {
            return (frames, StreamEnd::UnknownKind(rest[0]));
        };
        let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let cap = model_cap(kind, header_cap);
        if len > cap {
            return (frames, StreamEnd::Oversized { kind, len, cap });
        }
        if rest.len() - 5 < len {
            return (frames, StreamEnd::Truncated);
        }
        frames.push((kind, rest[5..5 + len].to_vec()));
        rest = &rest[5 + len..];
    }
}

/// Decodes a pairs payload as the module docs describe it: the pairs, then Err(offset) of a
/// malformed one.
type PairResult<'a> = Result<(&'a [u8], &'a [u8]), WireError>;

type ModelPairs = (Vec<(Vec<u8>, Vec<u8>)>, Option<usize>);

fn model_pairs(payload: &[u8]) -> ModelPairs {
    let mut out = Vec::new();
    let mut at = 0;
    let take = |at: &mut usize| -> Option<Vec<u8>> {
        let header = payload.get(*at..*at + 4)?;
        let len = u32::from_le_bytes(header.try_into().ok()?) as usize;
        let item = payload.get(*at + 4..(*at + 4).checked_add(len)?)?.to_vec();
        *at += 4 + len;
        Some(item)
    };
    while at < payload.len() {
        let start = at;
        match take(&mut at).and_then(|k| Some((k, take(&mut at)?))) {
            Some(pair) => out.push(pair),
            None => return (out, Some(start)),
        }
    }
    (out, None)
}

const STATUSES: &[&[u8]] = &[
    b"200 OK",
    b"404 Not Found",
    b"500",
    b"599 Last",
    b"100 Continue",
    b"600 Nope",
    b"099 x",
    b"99",
    b"2000",
    b"20 OK",
    b"200\r\nX-Injected: 1",
    b"200 OK\0",
    b"200 OK\r",
    b"200\n",
    b"200 \rX",
    b"abc",
    b"",
    b"200  two",
    b"2x0 OK",
    b"302 Found",
];

const HEADER_NAMES: &[&[u8]] = &[
    b"Content-Type",
    b"Content-Length",
    b"content-length",
    b"Set-Cookie",
    b"X-A",
    b"Location",
    b"",
    b"Bad Name",
    b"Bad:Name",
    b"X\xc3\xa9",
    b"X\0",
    b"!#$%&'*+-.^_`|~",
    b"X\r\nY",
];

const LENGTHS: &[&[u8]] = &[
    b"0",
    b"1",
    b"5",
    b"12",
    b" 3 ",
    b"+4",
    b"-1",
    b"abc",
    b"",
    b"4 4",
    b"0x10",
    b"18446744073709551615",
    b"18446744073709551616",
    b"\xff",
];

fn header_pair(rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
    let name = if rng.one_in(6) {
        rng.some_bytes(|r| r.len(16))
    } else {
        rng.pick(HEADER_NAMES).to_vec()
    };
    let value = if name.eq_ignore_ascii_case(b"Content-Length") && !rng.one_in(4) {
        if rng.coin() {
            rng.below(200).to_string().into_bytes()
        } else {
            rng.pick(LENGTHS).to_vec()
        }
    } else {
        match rng.below(6) {
            0 => rng.some_bytes(|r| r.len(64)),
            1 => b"a\r\nb".to_vec(),
            2 => b"/local".to_vec(),
            _ => b"text/plain; charset=utf-8".to_vec(),
        }
    };
    (name, value)
}

fn headers_payload(rng: &mut Rng) -> Vec<u8> {
    if rng.one_in(8) {
        return rng.some_bytes(|r| r.len(64));
    }
    let mut out = Vec::new();
    let status = if rng.one_in(6) {
        rng.some_bytes(|r| r.len(8))
    } else {
        rng.pick(STATUSES).to_vec()
    };
    if !rng.one_in(20) {
        model_push_pair(&mut out, if rng.one_in(20) { b"X" } else { b"" }, &status);
    }
    for _ in 0..rng.below(5) {
        let (name, value) = header_pair(rng);
        model_push_pair(&mut out, &name, &value);
    }
    if rng.one_in(10) {
        mutate(rng, &mut out);
    }
    out
}

fn pairs_payload(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(6) {
        let key = if rng.coin() {
            rng.some_bytes(|r| r.len(24))
        } else {
            rng.pick(&[&b"REQUEST_METHOD"[..], b"PATH_INFO", b"", GROUP_KEY])
                .to_vec()
        };
        let value = rng.some_bytes(|r| r.len(64));
        model_push_pair(&mut out, &key, &value);
    }
    out
}

/// A stream of frames in any order: honest and lying lengths, unknown kinds, raw garbage, a
/// truncated end. Lengths that lie within a cap stay under `scale.big()`.
fn frame_soup(rng: &mut Rng, scale: Scale, header_cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(10) {
        match rng.below(20) {
            0..=3 => model_frame(&mut out, Kind::Headers, &headers_payload(rng)),
            4..=8 => {
                let len = rng.len(scale.big());
                let mut data = rng.bytes(len);
                if rng.coin() {
                    data.iter_mut().for_each(|b| *b = b'a' + *b % 8);
                }
                model_frame(&mut out, Kind::Data, &data);
            }
            9..=10 => {
                let asked = *rng.pick(&[0u32, 1, 7, 4096, 65536, 1 << 20, (1 << 20) + 1, u32::MAX]);
                if rng.one_in(8) {
                    model_frame(
                        &mut out,
                        Kind::ReadBody,
                        &asked.to_le_bytes()[..rng.below(4)],
                    );
                } else {
                    model_frame(&mut out, Kind::ReadBody, &asked.to_le_bytes());
                }
            }
            11 => model_frame(&mut out, Kind::End, &[]),
            12 => {
                let status = *rng.pick(&[500u16, 503, 404, 100, 599, 99, 600, 0, u16::MAX]);
                let bytes = status.to_le_bytes();
                let len = if rng.one_in(6) { rng.below(2) } else { 2 };
                model_frame(&mut out, Kind::Fail, &bytes[..len]);
            }
            13 => {
                let kind = *rng.pick(&[Kind::Request, Kind::Body, Kind::BodyEnd]);
                model_frame(&mut out, kind, &pairs_payload(rng));
            }
            14 => {
                let kind = rng.pick(&[0u8, 9, 0x7f, 0x80, 0xff]).to_owned();
                raw_frame(
                    &mut out,
                    kind,
                    rng.below(16) as u32,
                    &rng.some_bytes(|r| r.below(16)),
                );
            }
            15 => out.extend(rng.some_bytes(|r| r.len(32))),
            16 => {
                // A frame whose length field lies: beyond the cap, or within it but beyond the
                // bytes that follow (the next frames become its payload).
                let kind = model_kind(1 + rng.below(8) as u8).expect("1..=8 are kinds");
                let cap = model_cap(kind, header_cap);
                let declared = match rng.below(5) {
                    0 => cap.saturating_add(1),
                    1 => usize::MAX,
                    2 => cap.min(scale.big()),
                    _ => rng.below(cap.min(scale.big()) + 1),
                };
                let declared = u32::try_from(declared).unwrap_or(u32::MAX);
                raw_frame(
                    &mut out,
                    kind as u8,
                    declared,
                    &rng.some_bytes(|r| r.len(64)),
                );
            }
            _ => model_frame(&mut out, Kind::Data, b"hello\n"),
        }
    }
    if rng.one_in(6) {
        out.truncate(rng.below(out.len() + 1));
    }
    out
}

fn wire_codec_case(rng: &mut Rng) {
    // decode(encode(pairs)) == pairs
    let items: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.below(8))
        .map(|_| {
            (
                rng.some_bytes(|r| r.len(40)),
                rng.some_bytes(|r| r.len(300)),
            )
        })
        .collect();
    let mut payload = Vec::new();
    for (k, v) in &items {
        wire::push_pair(&mut payload, k, v);
    }
    let mut expected_bytes = Vec::new();
    for (k, v) in &items {
        model_push_pair(&mut expected_bytes, k, v);
    }
    assert_eq!(payload, expected_bytes);
    let decoded: Vec<(Vec<u8>, Vec<u8>)> = wire::pairs(Kind::Request, &payload)
        .map(|p| p.map(|(k, v)| (k.to_vec(), v.to_vec())))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(decoded, items);

    // decode_headers(encode_headers(status, headers)) == (status, headers)
    let status = rng.some_bytes(|r| r.len(20));
    let headers: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.below(6)).map(|_| header_pair(rng)).collect();
    let mut out = rng.some_bytes(|r| r.below(8)); // encode_headers clears what was there
    wire::encode_headers(
        &mut out,
        &status,
        headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
    );
    let (got_status, got_headers) = wire::decode_headers(&out).unwrap();
    assert_eq!(got_status, status.as_slice());
    let got_headers: Vec<(Vec<u8>, Vec<u8>)> = got_headers
        .into_iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(got_headers, headers);

    // u32 and status
    let n = rng.next_u64() as u32;
    assert_eq!(
        wire::decode_u32(Kind::ReadBody, &wire::encode_u32(n)).unwrap(),
        n
    );
    let short = rng.some_bytes(|r| *r.pick(&[0, 1, 2, 3, 5, 8]));
    assert!(wire::decode_u32(Kind::ReadBody, &short).is_err());
    let raw = rng.some_bytes(|r| *r.pick(&[0, 1, 2, 2, 2, 3]));
    let expected = match raw[..] {
        [a, b] => Some(u16::from_le_bytes([a, b])).filter(|s| (100..=599).contains(s)),
        _ => None,
    };
    assert_eq!(wire::decode_status(&raw).ok(), expected, "{raw:?}");

    // pairs() and decode_headers() on damaged or random payloads: what the model decodes.
    let mut junk = match rng.below(3) {
        0 => rng.some_bytes(|r| r.len(64)),
        1 => pairs_payload(rng),
        _ => headers_payload(rng),
    };
    if rng.coin() {
        mutate(rng, &mut junk);
    }
    // Each pair takes 8 bytes at least: an iterator that goes on is looping.
    let most = junk.len() / 8 + 1;
    let got: Vec<PairResult<'_>> = wire::pairs(Kind::Headers, &junk).take(most + 1).collect();
    assert!(got.len() <= most, "pairs() does not end: {junk:?}");
    let (model_items, model_err) = model_pairs(&junk);
    let oks = got.iter().take_while(|p| p.is_ok()).count();
    assert_eq!(oks, model_items.len(), "{junk:?}: {got:?}");
    assert_eq!(
        got.len(),
        oks + usize::from(model_err.is_some()),
        "an Err must end the pairs"
    );
    for (p, (k, v)) in got.iter().zip(&model_items) {
        let (gk, gv) = p.as_ref().unwrap();
        assert_eq!((*gk, *gv), (k.as_slice(), v.as_slice()));
    }
    if let Some(Err(e)) = got.last() {
        assert!(
            matches!(
                e,
                WireError::Malformed {
                    kind: Kind::Headers,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    if model_err.is_none() {
        hit("junk decoded whole");
    }
    let decoded = wire::decode_headers(&junk);
    let expected = match (model_items.first(), model_err) {
        (Some((k, status)), None) if k.is_empty() => {
            Some((status.clone(), model_items[1..].to_vec()))
        }
        _ => None,
    };
    match (decoded, expected) {
        (Ok((s, h)), Some((es, eh))) => {
            assert_eq!(s, es.as_slice());
            let h: Vec<(Vec<u8>, Vec<u8>)> = h
                .into_iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(h, eh);
        }
        (Err(_), None) => {}
        (got, expected) => panic!("decode_headers({junk:?}) = {got:?}, model {expected:?}"),
    }
}

/// A reader that hands out bytes in random small pieces and sometimes says Interrupted, as a
/// socket under signals would: read_frame must not care.
struct ChunkyReader {
    data: Vec<u8>,
    pos: usize,
    rng: Rng,
    max_piece: usize,
}

impl Read for ChunkyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rng.one_in(16) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf
            .len()
            .min(self.data.len() - self.pos)
            .min(1 + self.rng.below(self.max_piece));
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The slack a Vec may round a small allocation up to.
const ALLOC_SLACK: usize = 64;

fn read_frame_case(rng: &mut Rng, scale: Scale) {
    let header_cap = *rng.pick(&[0, 1, 8_192, 32_768, 1 << 20, rng.clone().below(70_000)]);
    let mut data = match rng.below(5) {
        0 => rng.some_bytes(|r| r.len(64)),
        _ => frame_soup(rng, scale, header_cap),
    };
    if rng.one_in(5) {
        mutate(rng, &mut data);
    }
    let (frames, end) = model_frames(&data, header_cap);
    let mut reader = ChunkyReader {
        data,
        pos: 0,
        rng: Rng::new(rng.next_u64()),
        max_piece: *rng.pick(&[1, 3, 7, 64, 1 << 30]),
    };
    let reuse = rng.coin();
    let mut payload = Vec::with_capacity(if reuse { rng.len(4096) } else { 0 });
    for (i, expected) in frames.iter().map(Some).chain([None]).enumerate() {
        if !reuse {
            payload = Vec::new();
        }
        let before = payload.capacity();
        let got = wire::read_frame(&mut reader, &mut payload, header_cap);
        // Memory: a fresh buffer never holds more than the kind's cap (plus rounding); a
        // reused one grows at most as a Vec grows (see regression_read_frame_reused_buffer_*).
        let declared_cap = match &got {
            Ok(kind) => model_cap(*kind, header_cap),
            Err(WireError::Truncated) => 8 << 20,
            Err(_) => 0,
        };
        if reuse {
            let bound = before.max(2 * before.min(declared_cap)).max(declared_cap) + ALLOC_SLACK;
            assert!(
                payload.capacity() <= bound,
                "capacity {} > {bound}",
                payload.capacity()
            );
        } else {
            let bound = match &got {
                Ok(_) => payload.len(),
                _ => declared_cap,
            };
            assert!(
                payload.capacity() <= bound.max(ALLOC_SLACK),
                "capacity {} for a frame of {} (cap {declared_cap})",
                payload.capacity(),
                payload.len()
            );
        }
        match (got, expected) {
            (Ok(kind), Some((ek, ep))) => {
                hit("frames");
                assert_eq!((kind, &payload), (*ek, ep), "frame {i}");
                assert!(payload.len() <= model_cap(kind, header_cap));
            }
            (Err(e), None) => {
                let matches = match (&e, &end) {
                    (WireError::Closed, StreamEnd::Closed) => true,
                    (WireError::Truncated, StreamEnd::Truncated) => true,
                    (WireError::UnknownKind(b), StreamEnd::UnknownKind(eb)) => b == eb,
                    (
                        WireError::Oversized { kind, len, cap },
                        StreamEnd::Oversized {
                            kind: ek,
                            len: el,
                            cap: ec,
                        },
                    ) => (kind, len, cap) == (ek, el, ec),
                    _ => false,
                };
                assert!(matches, "frame {i}: got {e:?}, the model says {end:?}");
                hit(match end {
                    StreamEnd::Closed => "end: closed",
                    StreamEnd::Truncated => "end: truncated",
                    StreamEnd::UnknownKind(_) => "end: unknown kind",
                    StreamEnd::Oversized { .. } => "end: oversized",
                });
                assert!(!e.is_timeout());
                let _ = e.to_string();
                break;
            }
            (got, expected) => {
                panic!("frame {i}: got {got:?}, the model says {expected:?}/{end:?}")
            }
        }
    }
}

fn check_request_case(rng: &mut Rng) {
    let secret: [u8; 32] = rng.bytes(32).try_into().unwrap();
    let group = match rng.below(4) {
        0 => String::new(),
        1 => "a\u{fffd}".to_string(),
        _ => word(rng),
    };
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for _ in 0..rng.below(6) {
        let key = match rng.below(4) {
            0 => Vec::new(),
            1 => GROUP_KEY.to_vec(),
            2 => b"mod_wsgi.process_group\0".to_vec(),
            _ => rng.some_bytes(|r| r.len(24)),
        };
        let value = match rng.below(8) {
            0 => secret.to_vec(),
            1 => {
                let mut s = secret.to_vec();
                let at = rng.below(32);
                s[at] ^= 1 << rng.below(8);
                s
            }
            2 => secret[..rng.below(32)].to_vec(),
            3 => group.as_bytes().to_vec(),
            4 => b"a\xff".to_vec(),
            5 => [group.as_bytes(), b"\0"].concat(),
            6 => random_case(rng, &group).into_bytes(),
            _ => rng.some_bytes(|r| r.len(40)),
        };
        pairs.push((key, value));
    }
    if rng.coin() {
        pairs.insert(0, (Vec::new(), secret.to_vec()));
    }
    let borrowed: Vec<(&[u8], &[u8])> = pairs
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let got = check_request(&borrowed, &secret, &group);
    let expected = match pairs.first() {
        Some((k, v)) if k.is_empty() && *v == secret => {
            let asked = pairs
                .iter()
                .rev()
                .find(|(k, _)| k == GROUP_KEY)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            if asked == group {
                Ok(())
            } else {
                Err(OriginError::WrongGroup {
                    asked,
                    ours: group.clone(),
                })
            }
        }
        Some((k, _)) if k.is_empty() => Err(OriginError::BadSecret),
        _ => Err(OriginError::NoSecret),
    };
    assert_eq!(got, expected, "{pairs:?} for {group:?}");
    hit(match got {
        Ok(()) => "accepted",
        Err(OriginError::WrongGroup { .. }) => "wrong group",
        Err(OriginError::BadSecret) => "bad secret",
        Err(OriginError::NoSecret) => "no secret",
        Err(OriginError::PeerUid { .. }) => "peer uid",
    });
    let (a, b) = (
        rng.some_bytes(|r| r.below(4)),
        rng.some_bytes(|r| r.below(4)),
    );
    assert_eq!(constant_time_eq(&a, &b), a == b);
    assert!(constant_time_eq(&secret, &secret));
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// The daemon side of a connection, over a socketpair
// ─────────────────────────────────────────────────────────────────────────────────────────────

/// Long enough never to fire on a healthy run; a hang becomes a test failure, not a stuck make.
const HANG: Duration = Duration::from_secs(20);

/// Plays the Apache worker: writes `script` then half-closes, while a second thread reads all
/// the daemon sends until it closes.
fn fake_worker(stream: UnixStream, script: Vec<u8>) -> (JoinHandle<()>, JoinHandle<Vec<u8>>) {
    let mut writer = stream.try_clone().unwrap();
    let writing = thread::spawn(move || {
        let _ = writer.write_all(&script);
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut reader = stream;
    let reading = thread::spawn(move || {
        let mut got = Vec::new();
        let _ = reader.read_to_end(&mut got);
        got
    });
    (writing, reading)
}

fn body_chunk(rng: &mut Rng, scale: Scale) -> Vec<u8> {
    let len = 1 + rng.len(scale.big() / 4);
    let mut chunk = rng.bytes(len);
    for b in &mut chunk {
        // Plenty of newlines for readline.
        if *b < 24 {
            *b = b'\n';
        }
    }
    chunk
}

fn connection_case(rng: &mut Rng, scale: Scale) {
    let (daemon_side, worker_side) = UnixStream::pair().unwrap();
    for s in [&daemon_side, &worker_side] {
        s.set_read_timeout(Some(HANG)).unwrap();
        s.set_write_timeout(Some(HANG)).unwrap();
    }
    let environ = pairs_payload(rng);
    let honest = !rng.one_in(3);
    let mut script = Vec::new();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    if honest {
        model_frame(&mut script, Kind::Request, &environ);
        for _ in 0..rng.below(6) {
            let chunk = body_chunk(rng, scale);
            model_frame(&mut script, Kind::Body, &chunk);
            chunks.push(chunk);
        }
        let end = if rng.coin() {
            Kind::BodyEnd
        } else {
            Kind::Body
        };
        model_frame(&mut script, end, b"");
    } else {
        if !rng.one_in(4) {
            model_frame(&mut script, Kind::Request, &environ);
        }
        for _ in 0..1 + rng.below(5) {
            match rng.below(4) {
                0 | 1 => model_frame(&mut script, Kind::Body, &body_chunk(rng, scale)),
                2 => {
                    // A Body frame whose length lies (a cut stream, or past the chunk cap).
                    let declared = *rng.pick(&[1u32 << 20, (1 << 20) + 1, 100, u32::MAX]);
                    let short = body_chunk(rng, Scale::Quick);
                    raw_frame(&mut script, Kind::Body as u8, declared, &short);
                }
                _ => script.extend(frame_soup(rng, scale, 0)),
            }
        }
    }
    let total: usize = chunks.iter().map(Vec::len).sum();
    let content_length = match rng.below(5) {
        0 => None,
        1 => Some(0),
        2 => Some(u64::MAX),
        _ => Some(rng.below(total + 10) as u64),
    };
    let mut expected: Vec<u8> = chunks.concat();
    if let Some(cl) = content_length {
        expected.truncate(usize::try_from(cl).unwrap_or(usize::MAX));
    }
    let (model, _) = model_frames(&script, 0);
    let (writing, reading) = fake_worker(worker_side, script);

    let mut conn = Connection::new(daemon_side, 0);
    let request = conn.read_request();
    match (&request, model.first()) {
        (Ok(payload), Some((Kind::Request, p))) => assert_eq!(payload, p),
        (Err(_), Some((kind, _))) => assert_ne!(*kind, Kind::Request),
        (Err(_), None) => {}
        (got, first) => panic!("read_request gave {got:?}, the first frame is {first:?}"),
    }
    if honest {
        assert_eq!(request.as_ref().unwrap(), &environ);
    }
    let mut reading_ok = request.is_ok();
    if reading_ok {
        conn.set_content_length(content_length);
    }

    // Body reads and response writes, interleaved as an app may do them.
    let mut got: Vec<u8> = Vec::new();
    let mut sent: Vec<(Kind, Vec<u8>)> = Vec::new();
    let mut must_arrive = 0;
    let mut pending = None;
    let mut headers_sent = false;
    for _ in 0..rng.below(14) {
        if reading_ok && rng.coin() {
            let size = match rng.below(4) {
                0 => None,
                1 => Some(0),
                _ => Some(rng.len(scale.big() / 2)),
            };
            let is_line = rng.coin();
            let result = if is_line {
                conn.readline(size)
            } else {
                conn.read(size)
            };
            let chunk = match result {
                Ok(chunk) => chunk,
                Err(e) => {
                    assert!(!honest, "an honest worker, yet {e}");
                    hit("read error");
                    reading_ok = false;
                    continue;
                }
            };
            let limit = size.unwrap_or(usize::MAX);
            assert!(
                chunk.len() <= limit,
                "{} bytes for a read of {limit}",
                chunk.len()
            );
            if !chunk.is_empty() {
                hit(if honest {
                    "honest body bytes"
                } else {
                    "garbage body bytes"
                });
            }
            got.extend_from_slice(&chunk);
            if let Some(cl) = content_length {
                assert!(got.len() as u64 <= cl, "read past CONTENT_LENGTH {cl}");
            }
            if is_line {
                if let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
                    assert_eq!(nl + 1, chunk.len(), "readline went past a newline");
                }
            }
            if honest {
                assert!(expected.starts_with(&got), "the body came back altered");
                let at_end = got.len() == expected.len();
                if is_line {
                    assert!(
                        chunk.last() == Some(&b'\n') || chunk.len() == limit || at_end,
                        "readline stopped early"
                    );
                } else {
                    assert!(chunk.len() == limit || at_end, "read stopped early");
                }
            }
            continue;
        }
        match rng.below(8) {
            0 | 1 => {
                let h = rng.some_bytes(|r| r.len(256));
                conn.set_pending_headers(h.clone());
                pending = Some(h);
                assert!(conn.has_pending_headers());
            }
            2 => {
                let flushed = conn.flush_headers().unwrap();
                if !headers_sent {
                    if let Some(h) = pending.take() {
                        sent.push((Kind::Headers, h));
                        headers_sent = true;
                    }
                }
                assert_eq!(flushed, headers_sent);
            }
            3 => {
                let queued = conn.queue_headers();
                if queued {
                    assert!(!headers_sent, "queued the headers twice");
                    sent.push((Kind::Headers, pending.take().expect("queued no headers")));
                    headers_sent = true;
                } else if !headers_sent {
                    assert_eq!(conn.has_pending_headers(), pending.is_some());
                }
            }
            4 => {
                let data = rng.some_bytes(|r| r.len(4096));
                if conn.try_queue_data(&data) {
                    assert!(headers_sent, "body queued before the headers");
                    sent.push((Kind::Data, data));
                }
            }
            5 => {
                let data = rng.some_bytes(|r| {
                    if r.one_in(10) {
                        r.below(scale.big())
                    } else {
                        r.len(4096)
                    }
                });
                let flush = rng.coin();
                conn.send_data(&data, flush).unwrap();
                for chunk in data.chunks(1 << 20) {
                    sent.push((Kind::Data, chunk.to_vec()));
                }
                if flush && !data.is_empty() {
                    must_arrive = sent.len();
                }
            }
            // After End or Fail the app reads no more body. Both first write their frame,
            // then collect the answer to a read-ahead, which a scripted worker may not give.
            6 => {
                let _ = conn.send_end();
                sent.push((Kind::End, 0u32.to_le_bytes().to_vec()));
                must_arrive = sent.len();
                reading_ok = false;
            }
            _ => {
                let status = *rng.pick(&[500u16, 503, 413]);
                let _ = conn.send_fail(status);
                sent.push((Kind::Fail, status.to_le_bytes().to_vec()));
                must_arrive = sent.len();
                reading_ok = false;
            }
        }
        assert_eq!(conn.headers_sent(), headers_sent);
    }
    assert!(!conn.peer_gone());
    drop(conn);
    writing.join().unwrap();
    let received = reading.join().unwrap();
    let (frames, end) = model_frames(&received, usize::MAX);
    assert_eq!(end, StreamEnd::Closed, "a cut frame reached the worker");

    // The response frames arrive in order, everything before the last flush at least; the
    // rest may still wait in the queue (it leaves with the End frame).
    let response: Vec<(Kind, Vec<u8>)> = frames
        .iter()
        .filter(|(k, _)| *k != Kind::ReadBody)
        .cloned()
        .collect();
    assert!(
        response.len() >= must_arrive,
        "flushed frames did not arrive"
    );
    assert!(response.len() <= sent.len(), "frames nobody sent");
    assert_eq!(
        &response[..],
        &sent[..response.len()],
        "the response frames"
    );
    if response.len() < sent.len() {
        hit("frames left queued");
    }

    // Each pull asks for something, never more than a chunk nor past CONTENT_LENGTH.
    let mut accepted = 0u64;
    let pulls = frames.iter().filter(|(k, _)| *k == Kind::ReadBody);
    for (i, (_, payload)) in pulls.enumerate() {
        let raw = u32::from_le_bytes(payload.as_slice().try_into().unwrap());
        // The two top bits ask the worker to fill the whole ask (and say the Content-Length
        // guarantees it); the rest is the size.
        let asked = u64::from(raw & !(3 << 30));
        assert!((1..=1 << 20).contains(&asked), "ReadBody({asked})");
        if honest {
            assert!(i < chunks.len() + 1, "more pulls than the worker answered");
            if let Some(cl) = content_length {
                assert!(
                    asked <= cl - accepted,
                    "asked {asked} with {} left",
                    cl - accepted
                );
            }
            if let Some(c) = chunks.get(i) {
                accepted = (accepted + c.len() as u64).min(content_length.unwrap_or(u64::MAX));
            }
        }
    }
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// The proxy, against a fake daemon speaking garbage
// ─────────────────────────────────────────────────────────────────────────────────────────────

/// What the fake daemon saw of one connection.
struct Seen {
    environ: Vec<u8>,
    after: Vec<u8>,
}

/// A listening fake daemon: for each connection, reads the Request frame, answers with the
/// newest queued byte string (then half-closes) and reports all it received. A connection that
/// comes before a new string is queued is the proxy sending the same request again (after a
/// Goodbye): it gets the same answer.
struct FakeDaemon {
    dir: PathBuf,
    jobs: Option<mpsc::Sender<Vec<u8>>>,
    seen: mpsc::Receiver<Seen>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    fn start() -> FakeDaemon {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wsgirs-fuzz-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("d.sock")).unwrap();
        let (jobs, job_rx) = mpsc::channel::<Vec<u8>>();
        let (seen_tx, seen) = mpsc::channel();
        let thread = thread::spawn(move || {
            let mut current: Option<Vec<u8>> = None;
            for stream in listener.incoming() {
                // Each case queues its answer before it connects.
                loop {
                    match job_rx.try_recv() {
                        Ok(job) => current = Some(job),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    }
                }
                let job = match &current {
                    Some(job) => job.clone(),
                    None => match job_rx.recv() {
                        Ok(job) => current.insert(job).clone(),
                        Err(_) => return,
                    },
                };
                let mut stream = stream.unwrap();
                stream.set_read_timeout(Some(HANG)).unwrap();
                stream.set_write_timeout(Some(HANG)).unwrap();
                let mut environ = Vec::new();
                let mut kind = wire::read_frame(&mut stream, &mut environ, 0).unwrap();
                // A new connection offers a region first; this daemon keeps to inline frames.
                if kind == Kind::Region {
                    kind = wire::read_frame(&mut stream, &mut environ, 0).unwrap();
                }
                assert_eq!(kind, Kind::Request);
                let (writing, reading) = fake_worker(stream, job);
                writing.join().unwrap();
                let after = reading.join().unwrap();
                if seen_tx.send(Seen { environ, after }).is_err() {
                    return;
                }
            }
        });
        FakeDaemon {
            dir,
            jobs: Some(jobs),
            seen,
            thread: Some(thread),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("d.sock")
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.jobs.take();
        // Wake the accept so the thread sees the closed queue.
        let _ = UnixStream::connect(self.socket());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Default)]
struct FuzzClient {
    body: Vec<u8>,
    pos: usize,
    read_limit: usize,
    /// read_body claims this many bytes more than it gave (a buggy Client implementation).
    overclaim: usize,
    /// read_body fails on this call (0-based) with this kind (0 Read, 1 Timeout, 2 Gone).
    read_error: Option<(usize, u8)>,
    reads: usize,
    /// write_body fails once this many bytes have gone out.
    gone_after: Option<usize>,
    /// flush fails on this call (0-based).
    flush_error: Option<usize>,
    flushes: usize,
    status: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    out: Vec<u8>,
    unflushed: bool,
}

impl Client for FuzzClient {
    fn read_body(&mut self, buf: &mut [u8]) -> Result<usize, ClientError> {
        let call = self.reads;
        self.reads += 1;
        if let Some((at, kind)) = self.read_error {
            if at == call {
                let what = "fuzz".to_string();
                return Err(match kind {
                    0 => ClientError::Read(what),
                    1 => ClientError::Timeout(what),
                    _ => ClientError::Gone(what),
                });
            }
        }
        let mut n = buf.len().min(self.body.len() - self.pos);
        if self.read_limit > 0 {
            n = n.min(self.read_limit);
        }
        buf[..n].copy_from_slice(&self.body[self.pos..self.pos + n]);
        self.pos += n;
        Ok(if n > 0 { n + self.overclaim } else { 0 })
    }

    fn send_headers(
        &mut self,
        status: &[u8],
        headers: &[(&[u8], &[u8])],
    ) -> Result<(), ProxyError> {
        assert!(self.status.is_none(), "headers sent twice");
        self.status = Some(status.to_vec());
        self.headers = headers
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        Ok(())
    }

    fn write_body(&mut self, data: &[u8]) -> Result<(), ClientError> {
        assert!(self.status.is_some(), "body before headers");
        assert!(!data.is_empty(), "an empty write");
        if matches!(self.gone_after, Some(limit) if self.out.len() >= limit) {
            return Err(ClientError::Gone("reset".into()));
        }
        self.out.extend_from_slice(data);
        self.unflushed = true;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        let call = self.flushes;
        self.flushes += 1;
        if self.flush_error == Some(call) {
            return Err(ClientError::Gone("reset during flush".into()));
        }
        self.unflushed = false;
        Ok(())
    }
}

/// SPEC §6 / proxy docs: a status line the relay may hand to Apache.
fn model_status_ok(status: &[u8]) -> bool {
    status.len() >= 3
        && (b'1'..=b'5').contains(&status[0])
        && status[1..3].iter().all(u8::is_ascii_digit)
        && (status.len() == 3 || status[3] == b' ')
        && !status.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

fn model_header_ok(name: &[u8], value: &[u8]) -> bool {
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    !name.is_empty()
        && name.iter().all(tchar)
        && !value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// Messages suppressed while fuzzing the proxy (the excess-body warning, once per request).
static QUIET_LINES: AtomicU64 = AtomicU64::new(0);

/// The fuzz runs log nearly every request's WSGIRS0321 warning: count them instead of printing.
fn quiet_excess_body_warnings() {
    use crate::logging::{install, Level, Sink};
    install(Sink {
        enabled: |level| level <= Level::Notice,
        write: |level, message| {
            if message.starts_with("WSGIRS0321") {
                QUIET_LINES.fetch_add(1, Ordering::Relaxed);
            } else {
                eprintln!("[wsgi:{level:?}] {message}");
            }
        },
    });
}

fn proxy_case(rng: &mut Rng, daemon: &FakeDaemon, scale: Scale) {
    let header_buffer_size = *rng.pick(&[0, 8_192, 32_768, 1 << 20, 40]);
    let header_cap = if header_buffer_size == 0 {
        32_768
    } else {
        header_buffer_size
    };
    let mut response = frame_soup(rng, scale, header_cap);
    if rng.coin() {
        // Often a plausible start, so the relay gets past the headers.
        let mut start = Vec::new();
        let mut payload = Vec::new();
        let status: &[u8] = rng.pick::<&[u8]>(&[b"200 OK", b"404 Not Found", b"200"]);
        model_push_pair(&mut payload, b"", status);
        for _ in 0..rng.below(3) {
            let (n, v) = header_pair(rng);
            if model_header_ok(&n, &v) || rng.one_in(4) {
                model_push_pair(&mut payload, &n, &v);
            }
        }
        model_frame(&mut start, Kind::Headers, &payload);
        start.extend(response);
        response = start;
        if rng.coin() {
            model_frame(&mut response, Kind::End, b"");
        }
    }
    let (frames, frames_end) = model_frames(&response, header_cap);
    let environ = if rng.one_in(4) {
        rng.some_bytes(|r| r.len(512))
    } else {
        pairs_payload(rng)
    };
    let body_len = rng.len(scale.big() / 4);
    let mut client = FuzzClient {
        body: rng.bytes(body_len),
        read_limit: *rng.pick(&[0, 0, 1, 7, 1000]),
        read_error: rng.one_in(8).then(|| (rng.below(3), rng.below(3) as u8)),
        gone_after: rng.one_in(8).then(|| rng.len(100)),
        flush_error: rng.one_in(10).then(|| rng.below(3)),
        overclaim: if rng.one_in(10) {
            1 + rng.below(5000)
        } else {
            0
        },
        ..FuzzClient::default()
    };
    let socket = daemon.socket();
    let target = Target {
        group: "site",
        socket_path: &socket,
        script: "/srv/app.wsgi",
        connect_timeout: Duration::from_secs(5),
        socket_timeout: HANG,
        header_buffer_size,
        pool: None,
        load: crate::load::LoadBoard::default(),
    };
    daemon
        .jobs
        .as_ref()
        .unwrap()
        .send(response.clone())
        .unwrap();
    let got = proxy::forward(&target, &environ, &mut client);
    // A Goodbye before anything else says the daemon never read the request: the proxy sends
    // it again on a new connection, 4 times, and then gives up with a 503.
    let turned_away = frames.first().is_some_and(|(k, _)| *k == Kind::Goodbye);
    let connections = if turned_away { 5 } else { 1 };
    let mut seen = None;
    for _ in 0..connections {
        let this = daemon
            .seen
            .recv_timeout(HANG)
            .expect("the fake daemon saw no connection");
        assert_eq!(this.environ, environ, "the environ arrived altered");
        seen = Some(this);
    }
    let seen = seen.expect("at least one connection");
    if turned_away {
        let err = got.expect_err("a daemon that only says Goodbye served the request");
        assert_eq!(err.status(), 503, "{err}");
        assert!(err.to_string().starts_with("WSGIRS03"), "{err}");
        assert!(client.status.is_none() && client.out.is_empty());
        assert!(seen.after.is_empty(), "the proxy answered a Goodbye");
        hit("turned away");
        return;
    }

    // The first Headers frame is the only one the client can have got, and only if valid.
    let first_headers = frames.iter().position(|(k, _)| *k == Kind::Headers);
    let mut content_length = None;
    if let Some(status) = &client.status {
        let at = first_headers.expect("headers reached the client from no Headers frame");
        let (pairs, err) = model_pairs(&frames[at].1);
        assert!(err.is_none() && pairs.first().is_some_and(|(k, _)| k.is_empty()));
        assert_eq!(status, &pairs[0].1);
        assert_eq!(client.headers, pairs[1..].to_vec());
        assert!(
            model_status_ok(status),
            "status {status:?} reached the client"
        );
        for (n, v) in &client.headers {
            assert!(
                model_header_ok(n, v),
                "header {n:?}: {v:?} reached the client"
            );
            if n.eq_ignore_ascii_case(b"Content-Length") {
                content_length = std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            }
        }
        // What the client got is the Data that followed, never past Content-Length. A DataSlot
        // sends from the region the proxy made, which this daemon never writes: zeros (one
        // that breaks the layout ends the response).
        let mut data: Vec<u8> = Vec::new();
        let mut all_data = true;
        for (kind, payload) in &frames[at + 1..] {
            match kind {
                Kind::Data => data.extend_from_slice(payload),
                Kind::ReadBody => {}
                Kind::DataSlot => {
                    let Ok(raw) = <[u8; 8]>::try_from(&payload[..]) else {
                        all_data = false;
                        break;
                    };
                    let slot = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
                    let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]) as usize;
                    if slot >= wire::region::DATA_SLOTS
                        || !(1..=wire::region::DATA_SLOT_LEN).contains(&len)
                    {
                        all_data = false;
                        break;
                    }
                    data.resize(data.len() + len, 0);
                    hit("response in a slot");
                }
                _ => {
                    all_data = false;
                    break;
                }
            }
        }
        // A big Data frame is relayed in pieces as it arrives, so of one the stream cuts short
        // the client may have got the part that came.
        let consumed: usize = frames.iter().map(|(_, p)| wire::HEADER_LEN + p.len()).sum();
        if all_data
            && frames_end == StreamEnd::Truncated
            && response.get(consumed) == Some(&(Kind::Data as u8))
        {
            if let Some(part) = response.get(consumed + wire::HEADER_LEN..) {
                data.extend_from_slice(part);
                hit("cut Data frame");
            }
        }
        assert!(
            data.starts_with(&client.out),
            "the client got bytes the daemon never sent"
        );
        if let Some(cl) = content_length {
            assert!(
                client.out.len() as u64 <= cl,
                "body past Content-Length {cl}"
            );
        }
    } else {
        assert!(client.out.is_empty());
    }

    hit(match &got {
        Ok(Outcome::Completed) => "completed",
        Ok(Outcome::DaemonStatus(_)) => "daemon status",
        Err(e) if e.headers_sent() => "error after headers",
        Err(_) => "error before headers",
    });
    if !client.out.is_empty() {
        hit("body relayed");
    }
    match &got {
        Ok(Outcome::Completed) => {
            assert!(client.status.is_some(), "completed without headers");
            if let Some(cl) = content_length {
                assert_eq!(
                    client.out.len() as u64,
                    cl,
                    "completed short of Content-Length"
                );
            }
            assert!(!client.unflushed, "completed with unflushed data");
        }
        Ok(Outcome::DaemonStatus(status)) => {
            assert!((100..=599).contains(status));
            assert!(client.status.is_none());
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("WSGIRS03"), "{msg:?}");
            assert!(msg.contains("'site'"), "{msg:?} does not name the group");
            assert!(
                !msg.contains(['\r', '\n', '\0']),
                "a daemon could split the log line: {msg:?}"
            );
            assert_eq!(e.headers_sent(), client.status.is_some(), "{msg}");
            assert!([400, 408, 500, 502, 504].contains(&e.status()), "{msg}");
        }
    }

    // The answers to ReadBody: in order, never more than asked, the client's bytes unaltered.
    let asked: Vec<&[u8]> = frames
        .iter()
        .filter(|(k, _)| *k == Kind::ReadBody)
        .map(|(_, p)| p.as_slice())
        .collect();
    let (answers, end) = model_frames(&seen.after, 0);
    // A ReadBody with both top bits says the Content-Length guarantees the bytes: the proxy
    // announces the whole Body and streams it, so a client body that ends sooner (only a
    // lying daemon asks for that) leaves the frame cut, and the request fails.
    let known = |p: &&[u8]| p.len() == 4 && p[3] & 0xc0 == 0xc0;
    if end != StreamEnd::Closed {
        assert!(
            asked.iter().any(known),
            "the proxy sent a cut or oversized frame"
        );
        assert!(got.is_err(), "a cut Body frame, yet the request succeeded");
        hit("known body cut short");
        return;
    }
    assert!(
        answers.len() <= asked.len(),
        "more answers than ReadBody frames"
    );
    // Inline answers are checked byte for byte at their place in the client's body; an answer
    // in a body slot (the proxy made a region; this daemon never maps it) only by its length.
    let mut relayed = 0usize;
    let mut ended = false;
    for ((kind, payload), request) in answers.iter().zip(&asked) {
        // The ReadBody payload: the wanted length in the low 28 bits; bit 29 names a slot.
        let raw = u32::from_le_bytes((*request).try_into().expect("answered a bad ReadBody"));
        let want = (raw & 0x0fff_ffff) as usize;
        let names_slot = raw & (1 << 29) != 0;
        match kind {
            Kind::Body => {
                assert!(!ended, "Body after BodyEnd");
                assert!(!names_slot, "a ReadBody naming a slot got a Body");
                assert!(payload.len() <= want.min(1 << 20));
                assert!(
                    !payload.is_empty() || want == 0,
                    "an empty Body ends the body early"
                );
                if client.overclaim == 0 {
                    assert!(
                        client.body.get(relayed..relayed + payload.len()) == Some(&payload[..]),
                        "the request body arrived altered"
                    );
                }
                relayed += payload.len();
                hit("request body relayed");
            }
            Kind::BodySlot => {
                assert!(!ended, "BodySlot after BodyEnd");
                assert!(names_slot, "a BodySlot answers a ReadBody naming no slot");
                let len = u32::from_le_bytes(payload[..].try_into().expect("a bad BodySlot"));
                let len = len as usize;
                assert!(len > 0, "an empty BodySlot (no bytes is BodyEnd)");
                assert!(len <= want.min(proxy::BodySlot::LEN));
                relayed += len;
                hit("request body in a slot");
            }
            // Asked for no bytes, a slot answer has none to give: the wire says that is
            // BodyEnd, as an empty Body is inline; only a daemon that asks for nothing sees it.
            Kind::BodyEnd if names_slot && want == 0 => {}
            Kind::BodyEnd => ended = true,
            other => panic!("the proxy sent {other:?}"),
        }
    }
    if client.overclaim == 0 {
        assert!(
            relayed <= client.body.len(),
            "more body relayed than the client sent"
        );
    }
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// The targets
// ─────────────────────────────────────────────────────────────────────────────────────────────

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_daemon_process() {
    fuzz("fuzz_daemon_process", daemon_process_case);
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_split_raw_args() {
    fuzz("fuzz_split_raw_args", split_raw_args_case);
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_script_alias() {
    fuzz("fuzz_script_alias", script_alias_case);
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_import_script_and_prefix() {
    fuzz(
        "fuzz_import_script_and_prefix",
        import_script_and_prefix_case,
    );
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_restrict_and_templates() {
    fuzz("fuzz_restrict_and_templates", restrict_and_templates_case);
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_route() {
    fuzz("fuzz_route", route_case);
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_wire_codec() {
    fuzz("fuzz_wire_codec", wire_codec_case);
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_wire_read_frame() {
    fuzz("fuzz_wire_read_frame", |rng| {
        read_frame_case(rng, Scale::Full)
    });
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_origin_check_request() {
    fuzz("fuzz_origin_check_request", check_request_case);
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_daemon_connection() {
    fuzz("fuzz_daemon_connection", |rng| {
        connection_case(rng, Scale::Full)
    });
}

#[test]
#[ignore = "fuzzing: make fuzz"]
fn fuzz_proxy_forward() {
    quiet_excess_body_warnings();
    let daemon = FakeDaemon::start();
    fuzz("fuzz_proxy_forward", |rng| {
        proxy_case(rng, &daemon, Scale::Full)
    });
    let quiet = QUIET_LINES.load(Ordering::Relaxed);
    println!("fuzz_proxy_forward: {quiet} WSGIRS0321 (excess body) warnings were not printed");
}

#[test]
fn quick_daemon_process() {
    quick("quick_daemon_process", QUICK_RUNS, daemon_process_case);
}

#[test]
fn quick_split_raw_args() {
    quick("quick_split_raw_args", QUICK_RUNS, split_raw_args_case);
}

#[test]
fn quick_script_alias() {
    quick("quick_script_alias", QUICK_RUNS, script_alias_case);
}

#[test]
fn quick_import_script_and_prefix() {
    quick(
        "quick_import_script_and_prefix",
        QUICK_RUNS,
        import_script_and_prefix_case,
    );
}

#[test]
fn quick_restrict_and_templates() {
    quick(
        "quick_restrict_and_templates",
        QUICK_RUNS,
        restrict_and_templates_case,
    );
}

#[test]
fn quick_route() {
    quick("quick_route", QUICK_RUNS, route_case);
}

#[test]
fn quick_wire_codec() {
    quick("quick_wire_codec", QUICK_RUNS, wire_codec_case);
}

#[test]
fn quick_wire_read_frame() {
    quick("quick_wire_read_frame", QUICK_RUNS, |rng| {
        read_frame_case(rng, Scale::Quick)
    });
}

#[test]
fn quick_origin_check_request() {
    quick("quick_origin_check_request", QUICK_RUNS, check_request_case);
}

#[test]
fn quick_daemon_connection() {
    quick("quick_daemon_connection", QUICK_SOCKET_RUNS, |rng| {
        connection_case(rng, Scale::Quick)
    });
}

#[test]
fn quick_proxy_forward() {
    let daemon = FakeDaemon::start();
    quick("quick_proxy_forward", QUICK_SOCKET_RUNS, |rng| {
        proxy_case(rng, &daemon, Scale::Quick)
    });
}

#[test]
fn the_engine_replays_and_catches() {
    // Same seed, same inputs; a crash names its case and is re-raised.
    let mut first = Vec::new();
    drive("a", 7, Budget::Runs(5), |rng| first.push(text(rng)));
    let mut second = Vec::new();
    drive("b", 7, Budget::Runs(5), |rng| second.push(text(rng)));
    assert_eq!(first, second);
    let mut case = Vec::new();
    drive("c", 7, Budget::Case(mix(7, 3)), |rng| case.push(text(rng)));
    assert_eq!(case, vec![first[3].clone()]);
    let crash = panic::catch_unwind(|| drive("d", 7, Budget::Runs(5), |_| panic!("boom")));
    assert!(crash.is_err());
    assert_eq!(parse_u64("0x10"), Some(16));
    assert_eq!(parse_u64(" 42 "), Some(42));
}

// ─────────────────────────────────────────────────────────────────────────────────────────────
// Regressions: each bug the fuzzing found, as its smallest input (ignored while it is open)
// ─────────────────────────────────────────────────────────────────────────────────────────────

/// One request through the proxy against a daemon that answers `response`.
fn forward_canned(response: Vec<u8>) -> (Result<Outcome, ProxyError>, FuzzClient) {
    let daemon = FakeDaemon::start();
    let socket = daemon.socket();
    let target = Target {
        group: "site",
        socket_path: &socket,
        script: "/srv/app.wsgi",
        connect_timeout: Duration::from_secs(5),
        socket_timeout: HANG,
        header_buffer_size: 0,
        pool: None,
        load: crate::load::LoadBoard::default(),
    };
    daemon.jobs.as_ref().unwrap().send(response).unwrap();
    let mut client = FuzzClient::default();
    let got = proxy::forward(&target, b"", &mut client);
    daemon.seen.recv_timeout(HANG).unwrap();
    (got, client)
}

fn shown_headers(client: &FuzzClient) -> String {
    let lines: Vec<String> = client
        .headers
        .iter()
        .map(|(n, v)| {
            format!(
                "'{}: {}'",
                String::from_utf8_lossy(n),
                String::from_utf8_lossy(v)
            )
        })
        .collect();
    lines.join(", ")
}

fn canned_response(headers: &[(&[u8], &[u8])], body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    model_push_pair(&mut payload, b"", b"200 OK");
    for (n, v) in headers {
        model_push_pair(&mut payload, n, v);
    }
    let mut out = Vec::new();
    model_frame(&mut out, Kind::Headers, &payload);
    model_frame(&mut out, Kind::Data, body);
    model_frame(&mut out, Kind::End, b"");
    out
}

#[test]

fn regression_read_frame_reused_buffer_grows_past_cap() {
    // The proxy and the daemon connection reuse one frame buffer for every frame; the module
    // docs promise it never holds more than MAX_CHUNK (or header-buffer-size) bytes.
    let mut stream = Vec::new();
    model_frame(&mut stream, Kind::Data, &vec![b'a'; 600 << 10]);
    model_frame(&mut stream, Kind::Data, &vec![b'b'; wire::MAX_CHUNK]);
    let mut reader = io::Cursor::new(stream);
    let mut payload = Vec::new();
    assert_eq!(
        wire::read_frame(&mut reader, &mut payload, 0).unwrap(),
        Kind::Data
    );
    assert_eq!(
        wire::read_frame(&mut reader, &mut payload, 0).unwrap(),
        Kind::Data
    );
    assert!(
        payload.capacity() <= wire::MAX_CHUNK + ALLOC_SLACK,
        "a Data frame buffer of {} bytes (cap {})",
        payload.capacity(),
        wire::MAX_CHUNK
    );
}

#[test]

fn regression_proxy_conflicting_content_length() {
    let (got, client) = forward_canned(canned_response(
        &[(b"Content-Length", b"5"), (b"Content-Length", b"3")],
        b"hello",
    ));
    assert!(
        matches!(got, Err(ProxyError::MalformedHeader { .. })),
        "got {got:?}; the client received {} and the body {:?}",
        shown_headers(&client),
        String::from_utf8_lossy(&client.out)
    );
}

#[test]

fn regression_proxy_signed_content_length() {
    let (got, client) = forward_canned(canned_response(&[(b"Content-Length", b"+5")], b"hello"));
    assert!(
        matches!(got, Err(ProxyError::MalformedHeader { .. })),
        "got {got:?}; the client received {}",
        shown_headers(&client)
    );
}
