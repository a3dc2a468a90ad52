# Reports what this daemon process holds: every open descriptor's target and whether any
# shared mapping of Apache's (the scoreboard) is still mapped.
import json
import os


def application(environ, start_response):
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass
    with open("/proc/self/maps") as f:
        shared = [line.strip() for line in f if " rw-s " in line]
    body = json.dumps({"pid": os.getpid(), "fds": fds, "shared_maps": shared}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
