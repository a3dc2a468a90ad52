# Reports this daemon process's memory, in KiB, from /proc/self/status.
# ?fragment=N first allocates N MiB in 64 KiB blocks, each followed by a small block that
# stays alive, and frees the big ones: memory malloc keeps (it cannot shrink the heap past
# the small blocks) until it is given back explicitly.
# ?body=N allocates N MiB in 64 KiB blocks (as reading a big body does), frees them, and says
# how many page faults the process took meanwhile ("faults").
import json
import os

_kept = []


def _memory():
    info = {"pid": os.getpid()}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                info["rss_kib"] = int(value.split()[0])
            elif key == "VmHWM":
                info["hwm_kib"] = int(value.split()[0])
    return info


def _minor_faults():
    with open("/proc/self/stat") as f:
        # The fields after the command name, which is in parentheses.
        return int(f.read().rpartition(")")[2].split()[7])


def application(environ, start_response):
    qs = environ.get("QUERY_STRING", "")
    info = {}
    if qs.startswith("fragment="):
        info["before_kib"] = _memory()["rss_kib"]
        big = []
        for _ in range(int(qs[9:]) * 16):
            big.append(b"x" * (64 * 1024))  # written, so resident (bytes(n) may not be)
            _kept.append(bytearray(1024))
        del big
    elif qs.startswith("body="):
        before = _minor_faults()
        blocks = [b"x" * (64 * 1024) for _ in range(int(qs[5:]) * 16)]
        del blocks
        info["faults"] = _minor_faults() - before
    info.update(_memory())
    body = json.dumps(info, sort_keys=True).encode("ascii")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
