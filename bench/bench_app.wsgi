# The WSGI application `make bench` runs under both modules (bench/bench.py copies it into the
# private ServerRoot). Routes, by PATH_INFO under /app:
#   /hello          12-byte body "Hello World!"
#   /pid            this daemon process's pid (used to find the daemon processes)
#   /bytes/N        N bytes, streamed in 64 KiB chunks, with Content-Length
#   /echo           reads wsgi.input in 64 KiB chunks, then returns the chunks
# The echo app reads the whole body before it responds: mod_wsgi 4.9 deadlocks when an app
# streams its response while still reading the request, and the app must be the same for both.
import os
import time

CHUNK_SIZE = 64 * 1024
CHUNK = b"x" * CHUNK_SIZE
HELLO = b"Hello World!"


def _stream(size):
    full, rest = divmod(size, CHUNK_SIZE)
    for _ in range(full):
        yield CHUNK
    if rest:
        yield CHUNK[:rest]


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/hello":
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", "12")])
        return [HELLO]
    if path == "/pid":
        qs = environ.get("QUERY_STRING", "")
        if qs.startswith("sleep="):
            time.sleep(float(qs[6:]))
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path.startswith("/bytes/"):
        size = int(path[7:])
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        return _stream(size)
    if path == "/echo":
        inp = environ["wsgi.input"]
        chunks = []
        total = 0
        while True:
            data = inp.read(CHUNK_SIZE)
            if not data:
                break
            chunks.append(data)
            total += len(data)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(total))])
        return chunks
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
