# Reports this daemon process's memory, in KiB, from /proc/self/status.
# ?fragment=N first allocates N MiB in 64 KiB blocks, each followed by a small block that
# stays alive, and frees the big ones: memory malloc keeps (it cannot shrink the heap past
# the small blocks) until it is given back explicitly.
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
    info.update(_memory())
    body = json.dumps(info, sort_keys=True).encode("ascii")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
