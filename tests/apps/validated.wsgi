# An application wrapped in wsgiref.validate.validator (tests/pep3333.rs). Every route uses one
# PEP 3333 feature; the validator checks the environ, wsgi.input, wsgi.errors, start_response,
# the write() callable, the iterable and that close() was called, raising AssertionError or
# warning (WSGIWarning, through the warnings module to sys.stderr, so to the error log) on any
# breach. Routes (PATH_INFO):
#   / and /env    the environ summarised as JSON
#   /input        readline(), readline(4), read(5), readlines() of the body
#   /iter         iteration over wsgi.input
#   /read         read(n) in 1000-byte steps (the validator allows read() only with a size)
#   /write        the write() callable, then an iterable
#   /generator    a generator
#   /file         wsgi.file_wrapper over this very script
#   /exc          start_response replaced through exc_info before the headers went out
#   /cookies      repeated Set-Cookie headers
#   /redirect     302 with an absolute Location
#   /close        an iterable whose close() writes MARKER_DIR/validated-closed
#   /errors       wsgi.errors write(), writelines(), flush()
#   /empty        a response without a body (Content-Length 0)
import json
import os
import sys
import zlib
from wsgiref.validate import validator

TEXT = [("Content-Type", "text/plain")]


class Closing:
    def __init__(self, marker):
        self.marker = marker

    def __iter__(self):
        yield b"closing"

    def close(self):
        if self.marker:
            with open(self.marker, "w") as f:
                f.write("closed")


def reply(start_response, obj):
    body = json.dumps(obj, sort_keys=True).encode("utf-8")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def inner(environ, start_response):
    route = environ.get("PATH_INFO", "")
    stream = environ["wsgi.input"]
    if route in ("/", "/env"):
        return reply(start_response, {
            "script_name": environ.get("SCRIPT_NAME"),
            "path_info": environ.get("PATH_INFO"),
            "method": environ["REQUEST_METHOD"],
        })
    if route == "/input":
        first = stream.readline()
        second = stream.readline(4)
        third = stream.read(5)
        rest = stream.readlines()
        pieces = [first, second, third] + rest
        return reply(start_response, {"pieces": [p.decode("latin-1") for p in pieces]})
    if route == "/iter":
        return reply(start_response, {"lines": [l.decode("latin-1") for l in stream]})
    if route == "/read":
        crc = 0
        total = 0
        while True:
            data = stream.read(1000)
            if not data:
                break
            crc = zlib.crc32(data, crc)
            total += len(data)
        return reply(start_response, {"total": total, "crc32": crc})
    if route == "/write":
        write = start_response("200 OK", TEXT)
        write(b"written ")
        return [b"returned"]
    if route == "/generator":
        start_response("200 OK", TEXT)

        def gen():
            yield b"one "
            yield b"two"
        return gen()
    if route == "/file":
        f = open(environ["SCRIPT_FILENAME"], "rb")
        size = os.fstat(f.fileno()).st_size
        start_response("200 OK", TEXT + [("Content-Length", str(size))])
        return environ["wsgi.file_wrapper"](f, 4096)
    if route == "/exc":
        start_response("200 OK", TEXT)
        try:
            raise ValueError("replaced")
        except ValueError:
            start_response("500 Internal Server Error", TEXT, sys.exc_info())
        return [b"replaced by exc_info"]
    if route == "/cookies":
        start_response("200 OK", TEXT + [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
        return [b"cookies"]
    if route == "/redirect":
        start_response("302 Found", TEXT + [("Location", "http://example.com/validated")])
        return [b"moved"]
    if route == "/close":
        directory = environ.get("MARKER_DIR")
        marker = os.path.join(directory, "validated-closed") if directory else None
        start_response("200 OK", TEXT)
        return Closing(marker)
    if route == "/errors":
        errors = environ["wsgi.errors"]
        errors.write("validated errors line\n")
        errors.writelines(["validated errors a\n", "validated errors b\n"])
        errors.flush()
        start_response("200 OK", TEXT)
        return [b"logged"]
    if route == "/empty":
        start_response("200 OK", TEXT + [("Content-Length", "0")])
        return []
    start_response("404 Not Found", TEXT)
    return [b"no such route"]


application = validator(inner)
