# Reports this daemon process's memory, in KiB, from /proc/self/status.
import json
import os


def application(environ, start_response):
    info = {"pid": os.getpid()}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                info["rss_kib"] = int(value.split()[0])
            elif key == "VmHWM":
                info["hwm_kib"] = int(value.split()[0])
    body = json.dumps(info, sort_keys=True).encode("ascii")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
