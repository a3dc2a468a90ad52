# Misbehaving applications for tests/robustness.rs, chosen by PATH_INFO:
#   /gil?N        holds the GIL for N seconds (default 60) inside a C call made through
#                 ctypes.PyDLL, which does not release the GIL: no other thread can run Python.
#   /burn?N       burns N seconds of CPU time (default 3), then answers 200 with its pid.
#   /alloc?N      allocates N MB (default 500) and touches it; answers 200 if that worked.
#   /int          calls start_response, then returns an int (not an iterable).
#   /close-raise  returns an iterable of two chunks (24 bytes) whose close() raises
#                 RuntimeError; with Content-Length, or without it for ?nocl (chunked).
#   /pid          answers 200 with the pid (a cheap request).
import ctypes
import os
import time


def reply(start_response, text, status="200 OK"):
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class CloseRaises:
    def __iter__(self):
        yield b"first chunk;"
        yield b"second chunk"

    def close(self):
        raise RuntimeError("close() of robustness.wsgi raised on purpose")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING", "")
    if path == "/gil":
        libc = ctypes.PyDLL(None)
        libc.sleep(int(query or 60))
        return reply(start_response, "woke %d\n" % os.getpid())
    if path == "/burn":
        seconds = float(query or 3)
        start = time.process_time()
        x = 0
        while time.process_time() - start < seconds:
            for i in range(10000):
                x += i * i
        return reply(start_response, "burnt %d\n" % os.getpid())
    if path == "/alloc":
        megabytes = int(query or 500)
        block = bytearray(megabytes * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        del block
        return reply(start_response, "allocated %d MB in %d\n" % (megabytes, os.getpid()))
    if path == "/int":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return 42
    if path == "/close-raise":
        headers = [("Content-Type", "text/plain")]
        if query != "nocl":
            headers.append(("Content-Length", "24"))
        start_response("200 OK", headers)
        return CloseRaises()
    return reply(start_response, "%d" % os.getpid())
