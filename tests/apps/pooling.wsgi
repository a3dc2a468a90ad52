# The app of tests/pooling.rs (persistent worker-to-daemon connections). Routed by PATH_INFO;
# every answer that is not a failure on purpose is one JSON object that names the daemon's pid
# and process group.
#
#   /info                       pid, group, method
#   /body?read=all|none|N       reads all of wsgi.input, nothing, or its first N bytes; reports
#                               how many bytes it read and their zlib.crc32
#   /sleep?secs=S&mark=PATH&fail=1
#                               writes its pid to PATH (when given), then sleeps S seconds;
#                               fail=1: then sends headers and part of a body, and raises
#   /keep                       keeps a reference to wsgi.input in a global list (so it
#                               outlives the response), reads half of the body
#   /raise_after_headers        sends headers and part of the body, then raises
#   /raise                      raises before start_response
#   /big?n=N                    N bytes (64 KiB blocks of b"x"), streamed
import json
import os
import time
import zlib
from urllib.parse import parse_qs

KEPT = []


def _reply(start_response, info):
    body = json.dumps(info, sort_keys=True).encode("ascii")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _base(environ):
    return {
        "pid": os.getpid(),
        "group": environ.get("mod_wsgi.process_group"),
        "method": environ.get("REQUEST_METHOD"),
    }


def _read(stream, limit):
    """Reads up to `limit` bytes (None: to the end) in 64 KiB reads; (length, crc)."""
    total = 0
    crc = 0
    while limit is None or total < limit:
        want = 65536 if limit is None else min(65536, limit - total)
        data = stream.read(want)
        if not data:
            break
        crc = zlib.crc32(data, crc)
        total += len(data)
    return total, crc


def _fail_after_headers(start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        yield b"partial " * 1000
        raise RuntimeError("pooling.wsgi fails after the headers on purpose")

    return body()


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    info = _base(environ)

    if path == "/info":
        return _reply(start_response, info)

    if path == "/body":
        mode = qs.get("read", ["all"])[0]
        stream = environ["wsgi.input"]
        if mode == "none":
            length, crc = 0, 0
        elif mode == "all":
            length, crc = _read(stream, None)
        else:
            length, crc = _read(stream, int(mode))
        info.update({"len": length, "crc": crc, "mode": mode})
        return _reply(start_response, info)

    if path == "/sleep":
        secs = float(qs.get("secs", ["1"])[0])
        mark = qs.get("mark", [None])[0]
        if mark:
            with open(mark + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(mark + ".tmp", mark)
        time.sleep(secs)
        info["slept"] = secs
        if qs.get("fail", ["0"])[0] == "1":
            return _fail_after_headers(start_response)
        return _reply(start_response, info)

    if path == "/keep":
        stream = environ["wsgi.input"]
        KEPT.append(stream)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        got, crc = _read(stream, length // 2)
        info.update({"kept": len(KEPT), "len": got, "crc": crc})
        return _reply(start_response, info)

    if path == "/raise_after_headers":
        return _fail_after_headers(start_response)

    if path == "/raise":
        raise RuntimeError("pooling.wsgi fails before the headers on purpose")

    if path == "/big":
        n = int(qs.get("n", ["1048576"])[0])
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(n))])

        def body():
            left = n
            block = b"x" * 65536
            while left > 0:
                piece = block[:min(left, 65536)]
                left -= len(piece)
                yield piece

        return body()

    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"no such route in pooling.wsgi: " + path.encode("utf-8", "replace")]
