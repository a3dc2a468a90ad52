# Reads wsgi.input the way QUERY_STRING mode= says and reports, as JSON, every piece each call
# returned (latin-1 decoded), the total, zlib.crc32 of all of it, and what one more read(10)
# after the end gave (always b"" when the input stops at CONTENT_LENGTH).
#   mode=read        read()
#   mode=read_n      read(n) until b""                 (n= from the query, default 7)
#   mode=readline    readline() until b""
#   mode=readline_n  readline(n) until b""
#   mode=readlines   readlines()
#   mode=iter        for line in wsgi.input
#   mode=mixed       readline(), read(3), readline(4), readlines()
#   mode=over        read(CONTENT_LENGTH + 1000), then read(10), then read()
#   mode=crc         read(65536) until b"", only the total and the crc are reported
# announce=TOKEN writes "input-reading-started TOKEN" to wsgi.errors before the first read.
# The response is an iterable whose close() writes "closed" to MARKER_DIR/marker when both are
# given (SetEnv MARKER_DIR, marker= in the query).
import json
import os
import zlib
from urllib.parse import parse_qs


class Reply:
    def __init__(self, body, marker):
        self.body = body
        self.marker = marker

    def __iter__(self):
        yield self.body

    def close(self):
        if self.marker:
            with open(self.marker, "w") as f:
                f.write("closed")


def application(environ, start_response):
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    mode = qs.get("mode", ["read"])[0]
    n = int(qs.get("n", ["7"])[0])
    stream = environ["wsgi.input"]
    marker_dir = environ.get("MARKER_DIR")
    marker = qs.get("marker", [None])[0]
    marker_path = os.path.join(marker_dir, marker) if marker_dir and marker else None
    announce = qs.get("announce", [None])[0]
    if announce:
        environ["wsgi.errors"].write("input-reading-started %s\n" % announce)
        environ["wsgi.errors"].flush()

    pieces = []
    crc = 0
    total = 0
    if mode == "read":
        pieces = [stream.read()]
    elif mode == "read_n":
        while True:
            data = stream.read(n)
            if not data:
                break
            pieces.append(data)
    elif mode == "readline":
        while True:
            line = stream.readline()
            if not line:
                break
            pieces.append(line)
    elif mode == "readline_n":
        while True:
            line = stream.readline(n)
            if not line:
                break
            pieces.append(line)
    elif mode == "readlines":
        pieces = list(stream.readlines())
    elif mode == "iter":
        pieces = [line for line in stream]
    elif mode == "mixed":
        pieces = [stream.readline(), stream.read(3), stream.readline(4)]
        pieces.extend(stream.readlines())
    elif mode == "over":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        pieces = [stream.read(length + 1000), stream.read(10), stream.read()]
    elif mode == "crc":
        while True:
            data = stream.read(65536)
            if not data:
                break
            crc = zlib.crc32(data, crc)
            total += len(data)
    else:
        raise ValueError("unknown mode %r" % mode)
    after = stream.read(10)

    if mode != "crc":
        for p in pieces:
            crc = zlib.crc32(p, crc)
            total += len(p)
    info = {
        "pid": os.getpid(),
        "mode": mode,
        "pieces": [p.decode("latin-1") for p in pieces] if mode != "crc" else [],
        "types": sorted({type(p).__name__ for p in pieces}),
        "total": total,
        "crc32": crc,
        "after": after.decode("latin-1"),
        "content_length": environ.get("CONTENT_LENGTH"),
        "transfer_encoding": environ.get("HTTP_TRANSFER_ENCODING"),
    }
    body = json.dumps(info, sort_keys=True).encode("ascii")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return Reply(body, marker_path)
