#!/usr/bin/env python3
"""`make bench`: mod_wsgi_rs against Debian's mod_wsgi, in one run, on identical configs.

Each round starts Apache with mod_wsgi_rs (A), measures everything, stops it, then does the
same with mod_wsgi (B): A B A B ... Both use bench/httpd.conf.in (mpm_event, a private
ServerRoot under /tmp, 127.0.0.1 only, `WSGIDaemonProcess bench processes=2 threads=16`) and
bench/bench_app.wsgi; the only difference is the LoadModule line. wrk is the load generator
(bench/report.lua reports its totals as JSON). Results: a table on stdout and in
target/bench/results.txt, everything measured in target/bench/results.json.

Environment:
  BENCH_QUICK=1         smoke test: 1 round of 2 s runs (about 70 s)
  BENCH_ROUNDS=N        rounds (default 3; quick 1)
  BENCH_DURATION=S      seconds per wrk run (default 6; quick 2)
  BENCH_WRK_THREADS=N   wrk threads (default 1, so wrk takes less CPU from Apache on 2 cores)
  BENCH_PACE_MS=N       "hello paced": each of 64 connections waits N ms on average (0 to 2N at
                        random) after each response before its next request (default 16: about
                        4000 req/s offered, half of what mod_wsgi serves at c=64 on 2 cores)
  BENCH_OURS_SO=path    mod_wsgi_rs module (default target/release/libmod_wsgi_rs.so)
  BENCH_THEIRS_SO=path  mod_wsgi module (default /usr/lib/apache2/modules/mod_wsgi.so)
  BENCH_ONLY=a,b        run only these scenarios (names as in the table, e.g. hello,64MiB)
  BENCH_QUIET_WAIT=S    before each module's run, wait up to S s (default 20; quick 5) for a
                        2-second window in which other processes use < 10% of the CPUs
  BENCH_RETRIES=N       per module run, repeat up to N scenarios (default 4; quick 0) during
                        which other processes used > 10% of the CPUs; the quieter try counts
  BENCH_DAEMON_OPTIONS="opt=value ..."
                        more WSGIDaemonProcess options, for both modules alike (for example
                        response-buffer-size=65536, mod_wsgi's default: see the README)
  BENCH_REPORT=file     only print the table of an earlier results.json
  BENCH_KEEP=1          keep the private ServerRoots under /tmp/mod_wsgi_rs-bench
"""

import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
APACHE = "/usr/sbin/apache2"
BASE = "/tmp/mod_wsgi_rs-bench"
OUT_DIR = os.path.join(REPO, "target", "bench")
OUT_JSON = os.path.join(OUT_DIR, "results.json")
MIB = 1024 * 1024
MB = 1000 * 1000


def env_int(name, default):
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
ROUNDS = env_int("BENCH_ROUNDS", 1 if QUICK else 3)
DURATION = env_int("BENCH_DURATION", 2 if QUICK else 6)
WRK_THREADS = env_int("BENCH_WRK_THREADS", 1)
PACE_MS = env_int("BENCH_PACE_MS", 16)
KEEP = os.environ.get("BENCH_KEEP", "") not in ("", "0")
QUIET_WAIT = env_int("BENCH_QUIET_WAIT", 5 if QUICK else 20)
RETRIES = env_int("BENCH_RETRIES", 0 if QUICK else 4)
DAEMON_OPTIONS = os.environ.get("BENCH_DAEMON_OPTIONS", "").split()
DAEMON_LINE = "WSGIDaemonProcess bench processes=2 threads=16"
QUIET_SAMPLE_S = 2.0  # after the last scenario: the daemons' memory once they are quiet
IS_ROOT = os.geteuid() == 0

MODULES = [
    {"key": "ours", "label": "mod_wsgi_rs",
     "so": os.environ.get("BENCH_OURS_SO") or os.path.join(REPO, "target", "release", "libmod_wsgi_rs.so")},
    {"key": "theirs", "label": "mod_wsgi",
     "so": os.environ.get("BENCH_THEIRS_SO") or "/usr/lib/apache2/modules/mod_wsgi.so"},
]

# (name, concurrency, kind, url path, request body bytes). Order matters: memory is sampled
# after each one, so the 8 MiB uploads (which hold whole bodies in the app) come last.
SCENARIOS = []
for _c in (1, 16, 64):
    SCENARIOS.append(("hello", _c, "rps", "/app/hello", 0))
# The same load offered to both modules (c=64 runs each module flat out, and the faster one
# then keeps the 2 CPUs busier, so single requests wait longer for one): latency at equal load.
SCENARIOS.append(("hello_paced", 64, "paced", "/app/hello", 0))
for _c in (1, 16, 64):
    SCENARIOS.append(("static", _c, "rps", "/static.txt", 0))
for _c in (1, 16):
    SCENARIOS.append(("1MiB", _c, "mbps", "/app/bytes/%d" % MIB, 0))
for _c in (1, 16):
    SCENARIOS.append(("64MiB", _c, "mbps", "/app/bytes/%d" % (64 * MIB), 0))
for _c in (1, 16):
    SCENARIOS.append(("upload8MiB", _c, "mbps", "/app/echo", 8 * MIB))
_only = [s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()]
if _only:
    SCENARIOS = [s for s in SCENARIOS if s[0] in _only]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- prerequisites

def pkg_installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return "install ok installed" in r.stdout


def ensure_packages():
    wanted = ["apache2", "wrk", "libapache2-mod-wsgi-py3"]
    missing = [p for p in wanted if not pkg_installed(p)]
    if missing:
        if not IS_ROOT:
            sys.exit("bench: missing packages: %s — run as root or: apt-get install %s"
                     % (" ".join(missing), " ".join(missing)))
        log("bench: installing %s" % " ".join(missing))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing,
                       check=True, env=env)
        # Debian's package enables mod_wsgi in /etc/apache2 on install; the benchmark loads it
        # only from its private config, and it must not stay enabled next to mod_wsgi_rs.
        if "libapache2-mod-wsgi-py3" in missing and os.path.exists("/etc/apache2/mods-enabled/wsgi.load"):
            subprocess.run(["a2dismod", "-q", "-f", "wsgi"], check=False)
    elif os.path.exists("/etc/apache2/mods-enabled/wsgi.load"):
        log("bench: NOTE: mod_wsgi is enabled in /etc/apache2 (a2dismod wsgi); the benchmark "
            "does not use /etc/apache2, so this does not affect it")
    for m in MODULES:
        if not os.path.exists(m["so"]):
            sys.exit("bench: %s not found: %s (run `make build`)" % (m["label"], m["so"]))


def pkg_version(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return r.stdout.strip() or None


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except OSError:
        return None


# ---------------------------------------------------------------- /proc helpers

def children_of(ppid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == ppid:
            out.append(int(d))
    return sorted(out)


def proc_mem(pid):
    """VmRSS, VmHWM, RssAnon, RssShmem (kB) and thread count of a process, or None if it is gone.
    RssAnon is the process's private memory; RssShmem its shared-memory pages (for Apache's
    children with mod_wsgi_rs: the response slots it shares with the daemons, which also count
    in the daemons' RSS)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            text = f.read()
    except OSError:
        return None
    vals = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "Threads"):
        m = re.search(r"^%s:\s+(\d+)" % key, text, re.M)
        vals[key] = int(m.group(1)) if m else None
    return {"pid": pid, "rss_kb": vals["VmRSS"], "hwm_kb": vals["VmHWM"], "anon_kb": vals["RssAnon"],
            "shmem_kb": vals["RssShmem"], "threads": vals["Threads"]}


def proc_pss(pid):
    """Proportional set size (kB) of a process: each page it shares counted as its share, so
    the PSS of all of an Apache instance's processes adds up to the memory the instance costs
    (pages shared between an Apache child and a daemon counted once). None if unreadable."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            m = re.search(r"^Pss:\s+(\d+)", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
        return s[s.rfind(")") + 2] != "Z"
    except OSError:
        return False


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_totals():
    """(busy, total) jiffies of the whole machine from /proc/stat. Steal counts as busy; irq and
    softirq time do not (with IRQ time accounting, loopback traffic of our own runs lands there)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    busy = user + nice + system + steal
    return busy, busy + idle + iowait + irq + softirq


def tree_cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total


class ForeignCpu:
    """Share of the machine's CPU used by processes other than this benchmark (its Apache, wrk
    and itself) between start() and stop(): other work running on the machine disturbs the
    figures, and this says how much."""

    def __init__(self, ap):
        self.ap = ap

    def _own(self):
        pids = [self.ap.parent] + children_of(self.ap.parent) if self.ap.parent else []
        ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
        ru_s = resource.getrusage(resource.RUSAGE_SELF)
        secs = ru_c.ru_utime + ru_c.ru_stime + ru_s.ru_utime + ru_s.ru_stime
        return tree_cpu_ticks(pids) + secs * CLK_TCK

    def start(self):
        self.b0, self.t0 = cpu_totals()
        self.o0 = self._own()

    def stop(self):
        b1, t1 = cpu_totals()
        own = self._own() - self.o0
        dt = t1 - self.t0
        if dt <= 0:
            return None
        return max(0.0, (b1 - self.b0 - own) * 100.0 / dt)


def wait_quiet(max_wait):
    """Waits (up to max_wait s) until other processes use < 10% of the CPUs over 2 s. Returns the
    seconds waited and the last busy share seen."""
    t0 = time.monotonic()
    busy_pct = None
    while True:
        b0, tot0 = cpu_totals()
        time.sleep(2)
        b1, tot1 = cpu_totals()
        busy_pct = (b1 - b0) * 100.0 / max(1, tot1 - tot0)
        waited = time.monotonic() - t0
        if busy_pct < 10 or waited >= max_wait:
            return round(waited, 1), round(busy_pct, 1)


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- HTTP helpers

def raw_get_status(port, path, timeout=5.0):
    """One HTTP/1.0 GET; returns the status code, or None if the connection failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(("GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" % path).encode())
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            m = re.match(rb"HTTP/1\.\d (\d{3})", buf)
            return int(m.group(1)) if m else None
    except OSError:
        return None


def http_request(port, method, path, body=None, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# ---------------------------------------------------------------- one Apache

class Apache:
    def __init__(self, module, round_no):
        self.module = module
        self.port = free_port()
        self.root = os.path.join(BASE, "%s-r%d" % (module["key"], round_no))
        self.conf = os.path.join(self.root, "conf", "httpd.conf")
        self.parent = None
        self.daemons = []
        self.known_pids = set()

    def render(self):
        shutil.rmtree(self.root, ignore_errors=True)
        for d in ("conf", "run", "logs", "htdocs", "apps"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        for d in [BASE, self.root] + [os.path.join(self.root, d) for d in ("conf", "htdocs", "apps")]:
            os.chmod(d, 0o755)
        if IS_ROOT:
            # run/ holds the daemon sockets; mod_wsgi's daemons (www-data) must reach them.
            os.chmod(os.path.join(self.root, "run"), 0o755)
        with open(os.path.join(self.root, "htdocs", "static.txt"), "wb") as f:
            f.write(b"Hello World!")
        shutil.copy(os.path.join(HERE, "bench_app.wsgi"), os.path.join(self.root, "apps", "bench_app.wsgi"))
        for p in ("htdocs/static.txt", "apps/bench_app.wsgi"):
            os.chmod(os.path.join(self.root, p), 0o644)
        with open(os.path.join(HERE, "httpd.conf.in")) as f:
            text = f.read()
        text = (text.replace("@ROOT@", self.root).replace("@PORT@", str(self.port))
                .replace("@MODULE_SO@", self.module["so"]).replace("@IF_ROOT@", "" if IS_ROOT else "#"))
        if DAEMON_LINE not in text:
            raise RuntimeError("bench/httpd.conf.in has no line %r" % DAEMON_LINE)
        text = text.replace(DAEMON_LINE, " ".join([DAEMON_LINE] + DAEMON_OPTIONS))
        with open(self.conf, "w") as f:
            f.write(text)
        r = subprocess.run([APACHE, "-t", "-f", self.conf], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise RuntimeError("apache2 -t failed for %s:\n%s" % (self.module["label"], r.stdout))

    def start(self):
        """Starts Apache; returns ms from `apache2 -k start` to the first 200 from /app/hello."""
        t0 = time.monotonic()
        r = subprocess.run([APACHE, "-f", self.conf, "-k", "start"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise RuntimeError("apache2 -k start failed for %s:\n%s" % (self.module["label"], r.stdout))
        pidfile = os.path.join(self.root, "run", "httpd.pid")
        deadline = t0 + 60
        cold_ms = None
        while time.monotonic() < deadline:
            if self.parent is None and os.path.exists(pidfile):
                try:
                    with open(pidfile) as f:
                        self.parent = int(f.read().strip())
                except ValueError:
                    pass
            if raw_get_status(self.port, "/app/hello") == 200:
                cold_ms = (time.monotonic() - t0) * 1000.0
                break
            time.sleep(0.002)
        while self.parent is None and time.monotonic() < deadline:
            if os.path.exists(pidfile):
                with open(pidfile) as f:
                    txt = f.read().strip()
                if txt:
                    self.parent = int(txt)
            time.sleep(0.01)
        if cold_ms is None:
            raise RuntimeError("%s: no 200 from /app/hello within 60 s\n%s"
                               % (self.module["label"], self.error_log_tail()))
        return cold_ms

    def find_daemons(self, want=2, timeout=20.0):
        """The daemon processes: the pids that /app/pid reports, which must be children of the
        Apache parent. Concurrent slow requests spread over both daemons."""
        seen = set()
        deadline = time.monotonic() + timeout
        lock = threading.Lock()

        def one():
            try:
                st, body = http_request(self.port, "GET", "/app/pid?sleep=0.05", timeout=10)
                if st == 200:
                    with lock:
                        seen.add(int(body))
            except (OSError, ValueError, http.client.HTTPException):
                pass

        while len(seen) < want and time.monotonic() < deadline:
            ts = [threading.Thread(target=one) for _ in range(40)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        kids = set(children_of(self.parent)) if self.parent else set()
        stray = sorted(p for p in seen if p not in kids)
        if stray:
            log("bench: WARNING: %s: /app/pid reported %s, not children of the Apache parent %s"
                % (self.module["label"], stray, self.parent))
        self.daemons = sorted(p for p in seen if p in kids) or sorted(seen)
        if len(self.daemons) < want:
            log("bench: WARNING: %s: found only %d daemon process(es): %s"
                % (self.module["label"], len(self.daemons), self.daemons))
        self.known_pids |= set(self.daemons) | kids
        return self.daemons

    def memory(self):
        """RSS/HWM of the daemons and of Apache's other children (the workers)."""
        note = None
        if any(not alive(p) for p in self.daemons):
            old = list(self.daemons)
            self.find_daemons()
            note = "daemon restarted: %s -> %s" % (old, self.daemons)
            log("bench: WARNING: %s: %s" % (self.module["label"], note))
        kids = children_of(self.parent) if self.parent else []
        self.known_pids |= set(kids)
        daemons = [m for m in (proc_mem(p) for p in self.daemons) if m]
        workers = [m for m in (proc_mem(p) for p in kids if p not in self.daemons) if m]
        parent = proc_mem(self.parent) if self.parent else None

        def mx(items, key):
            vals = [i[key] for i in items if i[key] is not None]
            return max(vals) if vals else None

        def own(item):
            if item["rss_kb"] is None or item["shmem_kb"] is None:
                return None
            return item["rss_kb"] - item["shmem_kb"]

        pss = [proc_pss(p) for p in ([self.parent] if self.parent else []) + list(kids)]

        out = {
            "daemon_rss_max_kb": mx(daemons, "rss_kb"), "daemon_hwm_max_kb": mx(daemons, "hwm_kb"),
            "child_rss_max_kb": mx(workers, "rss_kb"), "child_hwm_max_kb": mx(workers, "hwm_kb"),
            "child_anon_max_kb": mx(workers, "anon_kb"), "child_shmem_max_kb": mx(workers, "shmem_kb"),
            "child_own_max_kb": max((v for v in map(own, workers) if v is not None), default=None),
            "instance_pss_kb": sum(pss) if pss and None not in pss else None,
            "daemons": daemons, "children": workers, "parent": parent,
        }
        if note:
            out["note"] = note
        return out

    def error_log_tail(self, n=30):
        try:
            with open(os.path.join(self.root, "logs", "error_log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no error_log)"

    def stop(self):
        if self.parent is None and not os.path.exists(self.conf):
            return
        pids = set(self.known_pids)
        if self.parent:
            pids |= set(children_of(self.parent))
        subprocess.run([APACHE, "-f", self.conf, "-k", "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while self.parent and alive(self.parent) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.parent and alive(self.parent):
            log("bench: %s: Apache parent %d did not stop; killing it" % (self.module["label"], self.parent))
            try:
                os.kill(self.parent, signal.SIGKILL)
            except OSError:
                pass
        # Anything it started that is still there (only pids this run saw as its children).
        time.sleep(0.2)
        for p in sorted(pids):
            if alive(p):
                try:
                    with open("/proc/%d/cmdline" % p, "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if b"apache2" in cmd or b"wsgi" in cmd:
                    log("bench: %s: leftover process %d killed" % (self.module["label"], p))
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
        self.parent = None
        if not KEEP:
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- wrk

def run_wrk(port, path, conns, seconds, body_bytes=0, pace_ms=0):
    threads = max(1, min(WRK_THREADS, conns))
    cmd = ["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % seconds, "--timeout", "60s",
           "-s", os.path.join(HERE, "report.lua"), "http://127.0.0.1:%d%s" % (port, path)]
    env = dict(os.environ, BENCH_BODY_BYTES=str(body_bytes), BENCH_PACE_MS=str(pace_ms))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                       timeout=seconds + 120)
    for line in r.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON "):])
    raise RuntimeError("wrk gave no result (exit %d):\n%s" % (r.returncode, r.stdout))


def scenario_result(kind, w):
    secs = w["duration_us"] / 1e6
    errors = sum(w["errors"].values())
    res = {
        "requests": w["requests"], "bytes": w["bytes"], "seconds": round(secs, 3),
        "errors": w["errors"], "error_total": errors,
        "req_s": w["requests"] / secs if secs else 0.0,
        "mb_s": w["bytes"] / secs / MB if secs else 0.0,
        "p50_ms": w["lat_p50_us"] / 1000.0, "p90_ms": w["lat_p90_us"] / 1000.0,
        "p99_ms": w["lat_p99_us"] / 1000.0, "max_ms": w["lat_max_us"] / 1000.0,
        "mean_ms": w["lat_mean_us"] / 1000.0,
    }
    return res


def check_endpoints(port):
    """The apps answer correctly (before any timing)."""
    problems = []
    st, body = http_request(port, "GET", "/app/hello")
    if st != 200 or body != b"Hello World!":
        problems.append("/app/hello: %s %r" % (st, body[:60]))
    st, body = http_request(port, "GET", "/static.txt")
    if st != 200 or body != b"Hello World!":
        problems.append("/static.txt: %s %r" % (st, body[:60]))
    st, body = http_request(port, "GET", "/app/bytes/%d" % MIB)
    if st != 200 or len(body) != MIB:
        problems.append("/app/bytes/1MiB: %s, %d bytes" % (st, len(body)))
    payload = os.urandom(MIB + 12345)
    st, body = http_request(port, "POST", "/app/echo", body=payload)
    if st != 200 or body != payload:
        problems.append("/app/echo: %s, %d bytes, equal=%s" % (st, len(body), body == payload))
    return problems


def run_module(module, round_no, servers):
    ap = Apache(module, round_no)
    servers.append(ap)
    run = {"module": module["key"], "round": round_no + 1, "port": ap.port, "scenarios": [],
           "loadavg_before": loadavg()}
    if QUIET_WAIT > 0:
        waited, busy = wait_quiet(QUIET_WAIT)
        run["quiet_wait_s"], run["busy_before_pct"] = waited, busy
        if busy >= 10:
            log("bench: NOTE: the machine is busy (%.0f%% of the CPUs used by others); measuring anyway" % busy)
    try:
        ap.render()
        run["cold_start_ms"] = ap.start()
        ap.find_daemons()
        run["daemon_pids"] = list(ap.daemons)
        run["apache_parent"] = ap.parent
        run["idle"] = ap.memory()
        problems = check_endpoints(ap.port)
        if problems:
            run["check_problems"] = problems
            log("bench: WARNING: %s: wrong answers: %s" % (module["label"], "; ".join(problems)))
        run_wrk(ap.port, "/app/hello", 16, 1)  # warm-up, not recorded
        time.sleep(0.3)
        retries_left = RETRIES
        for (name, conns, kind, path, body) in SCENARIOS:
            entry = {"name": name, "c": conns, "kind": kind}
            while True:
                fc = ForeignCpu(ap)
                fc.start()
                # One memory sample half-way through, to show what the HWM is made of under load.
                under_load = {}
                sampler = threading.Timer(DURATION / 2.0, lambda: under_load.update(ap.memory()))
                sampler.start()
                try:
                    w = run_wrk(ap.port, path, conns, DURATION, body, PACE_MS if kind == "paced" else 0)
                    res = scenario_result(kind, w)
                    res["foreign_cpu_pct"] = fc.stop()
                    if res["error_total"]:
                        log("bench: NOTE: %s %s c=%d: wrk errors %s" % (module["label"], name, conns, w["errors"]))
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                    res = {"failed": str(e)}
                    log("bench: ERROR: %s %s c=%d: %s" % (module["label"], name, conns, e))
                sampler.cancel()
                sampler.join()
                if under_load:
                    res["memory_under_load"] = under_load
                time.sleep(0.5)  # let cut-off transfers finish before sampling memory
                keys = ("req_s", "mb_s", "p99_ms", "foreign_cpu_pct", "failed")
                prev = entry.get("foreign_cpu_pct")
                if prev is None or ("failed" not in res and res["foreign_cpu_pct"] < prev):
                    if prev is not None:
                        entry.setdefault("discarded_tries", []).append({k: entry[k] for k in keys if k in entry})
                    entry.update(res)
                else:
                    entry.setdefault("discarded_tries", []).append({k: res[k] for k in keys if k in res})
                busy = entry.get("foreign_cpu_pct")
                if "failed" in entry or busy is None or busy <= 10 or retries_left <= 0:
                    break
                retries_left -= 1
                log("bench: NOTE: %s %s c=%d: other processes used %.0f%% of the CPUs; repeating it"
                    % (module["label"], name, conns, busy))
            if not (ap.parent and alive(ap.parent)):
                entry["failed"] = (entry.get("failed", "") + " Apache parent died").strip()
                run["scenarios"].append(entry)
                raise RuntimeError("%s: Apache died during %s c=%d\n%s"
                                   % (module["label"], name, conns, ap.error_log_tail()))
            entry["memory"] = ap.memory()
            run["scenarios"].append(entry)
            other = "  other load %4.1f%%" % (entry.get("foreign_cpu_pct") or 0)
            if kind in ("rps", "paced"):
                log("  %-12s %-11s c=%-3d %9.0f req/s  p50 %7.2f ms  p99 %7.2f ms%s"
                    % (module["label"], name, conns, entry.get("req_s", 0), entry.get("p50_ms", 0),
                       entry.get("p99_ms", 0), other))
            else:
                log("  %-12s %-11s c=%-3d %9.1f MB/s   daemon RSS %6.1f MiB%s"
                    % (module["label"], name, conns, entry.get("mb_s", 0),
                       (entry["memory"]["daemon_rss_max_kb"] or 0) / 1024, other))
        if run["scenarios"]:
            # Once the daemons are quiet, whether they kept the memory the runs made them use.
            time.sleep(QUIET_SAMPLE_S)
            run["quiet_after"] = ap.memory()
        errs = [l for l in ap.error_log_tail(2000).splitlines() if re.search(r":(error|crit|alert|emerg)\]", l)]
        run["error_log_error_lines"] = len(errs)  # includes the cut-off transfers at each wrk run's end
        run["error_log_sample"] = errs[:10]
    except RuntimeError as e:
        run["failed"] = str(e)
        log("bench: ERROR: %s" % e)
    finally:
        ap.stop()
        servers.remove(ap)
    return run


# ---------------------------------------------------------------- summary and table

def med(vals):
    return statistics.median(vals) if vals else None


def collect(runs, module_key, fn):
    out = []
    for r in runs:
        if r["module"] != module_key:
            continue
        try:
            v = fn(r)
        except (KeyError, TypeError, StopIteration):
            v = None
        if v is not None:
            out.append((r["round"], v))
    return out


def scen(run, name, c):
    return next(s for s in run["scenarios"] if s["name"] == name and s["c"] == c and "failed" not in s)


def summarise(runs):
    """Rows: (section, label, unit, ours values, theirs values, better, target)."""
    rows = []

    def add(label, unit, fn, better, target=None, fmt="%.0f"):
        ours = collect(runs, "ours", fn)
        theirs = collect(runs, "theirs", fn)
        rows.append({"label": label, "unit": unit, "better": better, "target": target, "fmt": fmt,
                     "ours": ours, "theirs": theirs})

    names = {(s[0], s[1]) for s in SCENARIOS}
    for name, title in (("hello", "hello"), ("hello_paced", "hello paced"), ("static", "static 12 B (ceiling)")):
        for c in (1, 16, 64):
            if (name, c) not in names:
                continue
            tgt = name == "hello"
            add("%s c=%d" % (title, c), "req/s", lambda r, n=name, c=c: scen(r, n, c)["req_s"], "higher",
                {"ratio_min": 1.5} if tgt else None)
            add("%s c=%d" % (title, c), "p50 ms", lambda r, n=name, c=c: scen(r, n, c)["p50_ms"], "lower",
                None, "%.2f")
            add("%s c=%d" % (title, c), "p99 ms", lambda r, n=name, c=c: scen(r, n, c)["p99_ms"], "lower",
                {"ratio_max": 1.0} if tgt else None, "%.2f")
    for name, title, tgt in (("1MiB", "1 MiB response", None), ("64MiB", "64 MiB response", {"ratio_min": 2.0}),
                             ("upload8MiB", "8 MiB upload echo", {"ratio_min": 2.0})):
        for c in (1, 16):
            if (name, c) not in names:
                continue
            add("%s c=%d" % (title, c), "MB/s", lambda r, n=name, c=c: scen(r, n, c)["mb_s"], "higher", tgt, "%.1f")
    add("cold start", "ms", lambda r: r["cold_start_ms"], "lower", {"ratio_max": 1.0}, "%.0f")
    kib = lambda v: v / 1024.0 if v is not None else None  # noqa: E731
    last = SCENARIOS[-1] if SCENARIOS else None
    add("daemon idle", "RSS MiB", lambda r: kib(r["idle"]["daemon_rss_max_kb"]), "lower", None, "%.1f")
    if ("64MiB", 16) in names:
        add("daemon after 64 MiB", "RSS MiB",
            lambda r: kib(scen(r, "64MiB", 16)["memory"]["daemon_rss_max_kb"]), "lower", {"abs_max": 48.0}, "%.1f")
        add("daemon after 64 MiB", "HWM MiB",
            lambda r: kib(scen(r, "64MiB", 16)["memory"]["daemon_hwm_max_kb"]), "lower", None, "%.1f")
    if ("upload8MiB", 16) in names:
        add("daemon after uploads", "HWM MiB",
            lambda r: kib(scen(r, "upload8MiB", 16)["memory"]["daemon_hwm_max_kb"]), "lower", None, "%.1f")
    if last:
        add("daemon %.0f s after the end" % QUIET_SAMPLE_S, "RSS MiB",
            lambda r: kib(r["quiet_after"]["daemon_rss_max_kb"]), "lower", None, "%.1f")
    if last:
        add("Apache child %.0f s after end" % QUIET_SAMPLE_S, "RSS MiB",
            lambda r: kib(r["quiet_after"]["child_rss_max_kb"]), "lower", None, "%.1f")
    add("Apache child idle", "RSS MiB", lambda r: kib(r["idle"]["child_rss_max_kb"]), "lower", None, "%.1f")
    if ("64MiB", 16) in names:
        # While 64 MiB responses stream to 16 clients: the largest child's memory without the
        # slot pages it shares with the daemons, and what the whole instance costs the machine.
        streaming = lambda r, key: kib(scen(r, "64MiB", 16)["memory_under_load"][key])  # noqa: E731
        add("64 MiB c=16, mid-run", "own MiB", lambda r: streaming(r, "child_own_max_kb"), "lower", None, "%.1f")
        add("64 MiB c=16, mid-run", "all PSS", lambda r: streaming(r, "instance_pss_kb"), "lower", None, "%.1f")
    if last:
        add("Apache child at end", "HWM MiB",
            lambda r: kib(scen(r, last[0], last[1])["memory"]["child_hwm_max_kb"]), "lower",
            {"ratio_max": 1.0}, "%.1f")
        # What the HWM is made of: private memory, and pages shared with the daemons, sampled
        # half-way through the last scenario.
        mid = lambda r, key: kib(scen(r, last[0], last[1])["memory_under_load"][key])  # noqa: E731
        for unit, key in (("RSS MiB", "child_rss_max_kb"), ("anon MiB", "child_anon_max_kb"),
                          ("shmem MiB", "child_shmem_max_kb")):
            add("Apache child in last run", unit, lambda r, k=key: mid(r, k), "lower", None, "%.1f")

    for row in rows:
        o = [v for _, v in row["ours"]]
        t = [v for _, v in row["theirs"]]
        row["ours_median"], row["theirs_median"] = med(o), med(t)
        row["ours_range"] = [min(o), max(o)] if o else None
        row["theirs_range"] = [min(t), max(t)] if t else None
        paired = dict(row["theirs"])
        per_round = [v / paired[rd] for rd, v in row["ours"] if paired.get(rd)]
        row["ratio"] = (row["ours_median"] / row["theirs_median"]
                        if row["ours_median"] is not None and row["theirs_median"] else None)
        row["ratio_range"] = [min(per_round), max(per_round)] if per_round else None
        tgt = row["target"]
        row["status"] = None
        if tgt and row["ratio"] is not None:
            if "ratio_min" in tgt:
                row["status"] = "ok" if row["ratio"] >= tgt["ratio_min"] else "MISS"
            elif "ratio_max" in tgt:
                row["status"] = "ok" if row["ratio"] <= tgt["ratio_max"] else "MISS"
        if tgt and "abs_max" in tgt and row["ours_median"] is not None:
            row["status"] = "ok" if row["ours_median"] <= tgt["abs_max"] else "MISS"
    return rows


def target_text(t):
    if not t:
        return ""
    if "ratio_min" in t:
        return ">= %.1fx" % t["ratio_min"]
    if "ratio_max" in t:
        return "<= %.1fx" % t["ratio_max"]
    return "<= %g MiB" % t["abs_max"]


def fmt_val(fmt, med_v, rng):
    if med_v is None:
        return "n/a"
    s = fmt % med_v
    if rng and len(rng) == 2 and rng[0] != rng[1]:
        s += " (%s-%s)" % (fmt % rng[0], fmt % rng[1])
    return s


def print_table(rows, meta):
    out = []
    out.append("")
    out.append("mod_wsgi_rs vs mod_wsgi %s — %d round(s) x %d s wrk runs, order A B per round "
               "(A = mod_wsgi_rs, B = mod_wsgi), %d CPUs, wrk -t%d"
               % (meta["mod_wsgi_version"], meta["rounds"], meta["duration_s"], meta["cpus"], meta["wrk_threads"]))
    if meta.get("daemon_options"):
        out.append("both modules with these WSGIDaemonProcess options: %s" % " ".join(meta["daemon_options"]))
    fo = meta.get("foreign_cpu_pct")
    if fo:
        n, busy = fo.get("count", 0), fo.get("over_10", 0)
        out.append("other load on the machine while measuring: median %.1f%%, max %.1f%% of all CPUs; "
                   "%d of %d wrk runs had > 10%%%s; wall time %.0f s"
                   % (fo["median"], fo["max"], busy, n,
                      "  ** DISTURBED: rerun on a quiet machine **" if n and busy * 10 > n else "",
                      meta.get("elapsed_s", 0)))
    out.append("values: median over rounds (min-max); ratio = mod_wsgi_rs / mod_wsgi of the medians "
               "(per-round ratios min-max); MB = 10^6 bytes")
    hdr = "%-26s %-9s %-6s %-25s %-25s %-18s %-9s %s" % (
        "scenario", "metric", "better", "mod_wsgi_rs", "mod_wsgi", "ratio", "target", "")
    out.append(hdr)
    out.append("-" * len(hdr))
    for row in rows:
        ratio = "n/a"
        if row["ratio"] is not None:
            ratio = "%.2fx" % row["ratio"]
            rr = row["ratio_range"]
            if rr and len(row["ours"]) > 1:
                ratio += " (%.2f-%.2f)" % (rr[0], rr[1])
        out.append("%-26s %-9s %-6s %-25s %-25s %-18s %-9s %s" % (
            row["label"], row["unit"], row["better"],
            fmt_val(row["fmt"], row["ours_median"], row["ours_range"]),
            fmt_val(row["fmt"], row["theirs_median"], row["theirs_range"]),
            ratio, target_text(row["target"]), row["status"] or ""))
    out.append("-" * len(hdr))
    out.append("Targets (issue 6; the rows with a target): hello >= 1.5x req/s and p99 no worse (<= 1.0x); "
               "64 MiB and 8 MiB >= 2x MB/s;")
    out.append("daemon RSS after 64 MiB <= 48 MiB; Apache children no larger (HWM); cold start (apache2 -k start "
               "to the first 200) no slower. ok/MISS compare the median ratio.")
    out.append("hello paced: the same load for both modules, each of 64 connections waiting %d ms on average "
               "after every response (BENCH_PACE_MS); at c=64 each module" % PACE_MS)
    out.append("runs flat out, and the faster one keeps the CPUs busier, so single requests wait longer for "
               "one (the static file has the longest tail).")
    out.append("static = a 12-byte file served by Apache itself in the same runs: the ceiling for hello "
               "(its ratio shows the run-to-run noise).")
    out.append("Other load: CPU time used by processes other than this benchmark's Apache, wrk and "
               "itself, during the wrk runs (per run in results.json).")
    out.append("Memory: VmRSS/VmHWM of the largest daemon process / Apache worker child. Wrk cuts off "
               "in-flight transfers at the end of each run, so the error log has 'read error' lines.")
    out.append("%.0f s after (the) end: once no request has run for a second, mod_wsgi_rs's daemons and Apache children "
               "give back the memory the burst left (malloc's free memory; the children also the shared slot pages of idle "
               "connections)." % QUIET_SAMPLE_S)
    out.append("Apache child in last run: one sample half-way through the last scenario. anon = RssAnon "
               "(private memory); shmem = RssShmem: for mod_wsgi_rs,")
    out.append("the pages of the response slots it shares with the daemons, which also count in the "
               "daemons' RSS (with mod_wsgi these bytes wait in socket buffers, which no RSS counts).")
    out.append("64 MiB c=16, mid-run (MiB): own = the largest child's RSS minus those shared pages; all PSS = "
               "the proportional set size of every process of the instance")
    out.append("(parent, children, daemons) added up: what the instance costs the machine, shared pages "
               "counted once.")
    text = "\n".join(out)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------- main

def report(path):
    """Prints the table again from a results.json (BENCH_REPORT=path)."""
    global SCENARIOS
    with open(path) as f:
        result = json.load(f)
    meta, runs = result["meta"], result["runs"]
    SCENARIOS = [(s["name"], s["c"], s["kind"], s["path"], s["body_bytes"]) for s in meta["scenarios"]]
    fo = [s["foreign_cpu_pct"] for r in runs for s in r["scenarios"] if s.get("foreign_cpu_pct") is not None]
    if fo:
        meta["foreign_cpu_pct"] = {"median": statistics.median(fo), "max": max(fo), "count": len(fo),
                                   "over_10": sum(1 for v in fo if v > 10)}
    print_table(summarise(runs), meta)
    return 0


def main():
    if os.environ.get("BENCH_REPORT"):
        return report(os.environ["BENCH_REPORT"])
    ensure_packages()
    os.makedirs(BASE, exist_ok=True)
    os.chmod(BASE, 0o755)
    # Snapshot our module, so a rebuild during the run cannot change it between rounds.
    snap = os.path.join(BASE, "mod_wsgi_rs.so")
    shutil.copy(MODULES[0]["so"], snap)
    os.chmod(snap, 0o644)
    MODULES[0]["built_from"] = MODULES[0]["so"]
    MODULES[0]["so"] = snap
    os.makedirs(OUT_DIR, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": QUICK, "rounds": ROUNDS, "duration_s": DURATION, "wrk_threads": WRK_THREADS,
        "cpus": os.cpu_count(), "host": platform.node(), "kernel": platform.release(),
        "apache_version": pkg_version("apache2"), "mod_wsgi_version": pkg_version("libapache2-mod-wsgi-py3"),
        "wrk_version": pkg_version("wrk"), "mod_wsgi_rs_git": git_rev(),
        "modules": {m["key"]: m.get("built_from", m["so"]) for m in MODULES},
        "mod_wsgi_rs_so_sha256": sha256_file(MODULES[0]["so"]),
        "mod_wsgi_rs_so_mtime": datetime.datetime.fromtimestamp(
            os.path.getmtime(MODULES[0]["built_from"]), datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": "bench/httpd.conf.in: mpm_event, " + " ".join([DAEMON_LINE] + DAEMON_OPTIONS),
        "daemon_options": DAEMON_OPTIONS,
        "scenarios": [{"name": s[0], "c": s[1], "kind": s[2], "path": s[3], "body_bytes": s[4]} for s in SCENARIOS],
    }
    meta["loadavg_start"] = loadavg()
    if meta["loadavg_start"] and meta["loadavg_start"][0] > 0.5:
        log("bench: NOTE: load average is %.2f before the run: other work on this machine adds noise"
            % meta["loadavg_start"][0])
    est = ROUNDS * 2 * (len(SCENARIOS) * (DURATION + 0.8) + 6)
    log("bench: %d round(s) x %d scenarios x 2 modules, %d s each: about %.0f min"
        % (ROUNDS, len(SCENARIOS), DURATION, est / 60))

    servers = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    runs = []
    t_start = time.monotonic()
    try:
        for rd in range(ROUNDS):
            for m in MODULES:
                log("bench: round %d/%d: %s" % (rd + 1, ROUNDS, m["label"]))
                runs.append(run_module(m, rd, servers))
    finally:
        for ap in list(servers):
            ap.stop()
        if not KEEP:
            shutil.rmtree(BASE, ignore_errors=True)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["loadavg_end"] = loadavg()
    fo = [s["foreign_cpu_pct"] for r in runs for s in r["scenarios"] if s.get("foreign_cpu_pct") is not None]
    if fo:
        meta["foreign_cpu_pct"] = {"median": statistics.median(fo), "max": max(fo), "count": len(fo),
                                   "over_10": sum(1 for v in fo if v > 10)}
    rows = summarise(runs)
    table = print_table(rows, meta)
    failed = [r for r in runs if "failed" in r]
    result = {"meta": meta, "summary": [{k: v for k, v in r.items() if k != "fmt"} for r in rows],
              "runs": runs, "table": table}
    with open(OUT_JSON, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(OUT_DIR, "results.txt"), "w") as f:
        f.write(table.lstrip("\n") + "\n")
    print("\nresults: %s (%.0f s)" % (os.path.relpath(OUT_JSON, os.getcwd()), meta["elapsed_s"]))
    if failed:
        print("bench: %d run(s) failed: %s" % (len(failed), "; ".join(
            "%s round %d" % (r["module"], r["round"]) for r in failed)))
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("bench: interrupted; every Apache it started has been stopped")
