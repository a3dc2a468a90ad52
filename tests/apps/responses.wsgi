# Response behaviours of PEP 3333 (tests/pep3333.rs), chosen by the first PATH_INFO segment.
# marker=NAME in the query (with SetEnv MARKER_DIR) makes the iterable's close() write
# "closed" to MARKER_DIR/NAME, which proves close() was called.
import os
import sys
import time
from urllib.parse import parse_qs

TEXT = [("Content-Type", "text/plain")]


def marker_path(environ):
    name = parse_qs(environ.get("QUERY_STRING", "")).get("marker", [None])[0]
    directory = environ.get("MARKER_DIR")
    if name and directory:
        return os.path.join(directory, name)
    return None


def write_marker(path, text="closed"):
    if path:
        with open(path, "w") as f:
            f.write(text)


class Closing:
    """An iterable with close(): yields `chunks`; raises `error` after them if given."""

    def __init__(self, chunks, marker, error=None, delay=0.0):
        self.chunks = chunks
        self.marker = marker
        self.error = error
        self.delay = delay

    def __iter__(self):
        for chunk in self.chunks:
            if self.delay:
                time.sleep(self.delay)
            yield chunk
        if self.error is not None:
            raise self.error

    def close(self):
        write_marker(self.marker)


class Upload:
    """Reads the whole request body while being iterated (so close() follows any failure)."""

    def __init__(self, environ, marker):
        self.environ = environ
        self.marker = marker

    def __iter__(self):
        stream = self.environ["wsgi.input"]
        total = 0
        while True:
            data = stream.read(65536)
            if not data:
                break
            total += len(data)
        yield ("uploaded %d" % total).encode("ascii")

    def close(self):
        write_marker(self.marker)


def endless(marker, block=65536, total=1 << 30):
    sent = 0
    chunk = b"x" * block
    try:
        while sent < total:
            yield chunk
            sent += block
    finally:
        # A generator's close() raises GeneratorExit at the yield: this runs then.
        write_marker(marker)


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    mode = path.strip("/").split("/")[0]
    marker = marker_path(environ)

    if mode == "generator":
        start_response("200 OK", TEXT)

        def gen():
            yield b"one "
            yield b""
            yield b"two "
            yield b"three"
        return gen()

    if mode == "write":
        write = start_response("200 OK", TEXT)
        write(b"written ")
        write(b"")
        return [b"returned"]

    if mode == "write_only":
        write = start_response("200 OK", TEXT + [("Content-Length", "6")])
        write(b"abc")
        write(b"def")
        return []

    if mode == "empty":
        start_response("200 OK", TEXT + [("Content-Length", "0")])
        return []

    if mode == "close":
        start_response("200 OK", TEXT)
        return Closing([b"closing ", b"body"], marker)

    if mode == "raise_mid":
        start_response("200 OK", TEXT)
        return Closing([b"partial ", b"body"], marker,
                       RuntimeError("boom mid-iteration"), delay=0.05)

    if mode == "raise_first":
        start_response("200 OK", TEXT)
        return Closing([], marker, RuntimeError("boom before the first chunk"))

    if mode == "exc_before":
        start_response("200 OK", TEXT)
        try:
            raise ValueError("handled before the headers were sent")
        except ValueError:
            start_response("500 Handled Error", TEXT, sys.exc_info())
        return [b"error page"]

    if mode == "exc_after":
        start_response("200 OK", TEXT)

        def gen():
            yield b"first part "
            try:
                raise ValueError("late failure after the headers")
            except ValueError:
                # Headers are out: start_response re-raises this very exception.
                start_response("500 Too Late", TEXT, sys.exc_info())
            yield b"never sent"
        return gen()

    if mode == "twice":
        start_response("200 OK", TEXT)
        start_response("201 Created", TEXT)
        return [b"should not be seen"]

    if mode == "no_start":
        return [b"body without start_response"]

    if mode == "not_bytes":
        start_response("200 OK", TEXT)
        return ["a str, not bytes"]

    if mode == "cl5":
        start_response("200 OK", TEXT + [("Content-Length", "5")])
        return [b"Hello", b"World, this is too much"]

    if mode == "cl_short":
        start_response("200 OK", TEXT + [("Content-Length", "10")])
        return [b"Hello"]

    if mode == "bad_crlf_value":
        start_response("200 OK", TEXT + [("X-Bad", "crlf-token-1\r\nInjected: yes")])
        return [b"should not be seen"]

    if mode == "bad_lf_name":
        start_response("200 OK", TEXT + [("X-Bad\nInjected", "crlf-token-2")])
        return [b"should not be seen"]

    if mode == "bad_nonlatin":
        start_response("200 OK", TEXT + [("X-Euro", "nonlatin-token-\u20ac")])
        return [b"should not be seen"]

    if mode == "bad_status":
        start_response("200 OK\r\nInjected: status-token", TEXT)
        return [b"should not be seen"]

    if mode == "latin1_header":
        start_response("200 OK", TEXT + [("X-Latin", "caf\u00e9")])
        return [b"latin-1 header"]

    if mode == "cookies":
        start_response("200 OK", TEXT + [
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly"),
            ("X-Other", "between"),
            ("Set-Cookie", "c=3"),
        ])
        return [b"three cookies"]

    if mode == "local_redirect":
        target = parse_qs(environ.get("QUERY_STRING", "")).get(
            "to", ["/env/after-redirect?from=redirect"])[0]
        start_response("200 OK", TEXT + [("Location", target)])
        return [b"the app's own body, which Apache discards"]

    if mode == "local_302":
        start_response("302 Found", TEXT + [("Location", "/env/y")])
        return [b"moved"]

    if mode == "abs_redirect":
        start_response("302 Found", TEXT + [("Location", "http://example.com/elsewhere")])
        return [b"moved"]

    if mode == "custom_status":
        start_response("299 Made Up", TEXT)
        return [b"custom"]

    if mode == "stream_head":
        # A streamed body (no Content-Length) for HEAD requests.
        start_response("200 OK", TEXT + [("X-Streamed", "yes")])

        def gen():
            for i in range(100):
                yield b"line %d\n" % i
        return gen()

    if mode == "endless":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return endless(marker)

    if mode == "upload":
        token = parse_qs(environ.get("QUERY_STRING", "")).get("announce", [None])[0]
        if token:
            environ["wsgi.errors"].write("upload-reading-started %s\n" % token)
            environ["wsgi.errors"].flush()
        start_response("200 OK", TEXT)
        return Upload(environ, marker)

    start_response("404 Not Found", TEXT)
    return [("no mode %r" % mode).encode("utf-8")]
