# Serves a file through wsgi.file_wrapper (tests/pep3333.rs).
#   path=FILE          the file to serve (opened here, never read into memory by the app)
#   cl=0               leave out Content-Length
#   kind=bytesio       serve an io.BytesIO of 100000 bytes (a file-like without fileno())
#   kind=reader        a file-like with read() and close() only; close() writes "closed" to
#                      MARKER_DIR/marker (PEP 3333: the wrapper's close() calls the file's)
import io
import os
from urllib.parse import parse_qs


class Reader:
    def __init__(self, data, marker):
        self.data = io.BytesIO(data)
        self.marker = marker

    def read(self, size=-1):
        return self.data.read(size)

    def close(self):
        if self.marker:
            with open(self.marker, "w") as f:
                f.write("closed")


def application(environ, start_response):
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    kind = qs.get("kind", ["file"])[0]
    headers = [("Content-Type", "application/octet-stream")]
    if kind == "file":
        f = open(qs["path"][0], "rb")
        size = os.fstat(f.fileno()).st_size
    elif kind == "bytesio":
        f = io.BytesIO(bytes(range(256)) * 390 + b"tail")
        size = 256 * 390 + 4
    elif kind == "reader":
        name = qs.get("marker", [None])[0]
        directory = environ.get("MARKER_DIR")
        marker = os.path.join(directory, name) if name and directory else None
        f = Reader(b"reader body " * 1000, marker)
        size = 12 * 1000
    else:
        raise ValueError(kind)
    if qs.get("cl", ["1"])[0] != "0":
        headers.append(("Content-Length", str(size)))
    start_response("200 OK", headers)
    return environ["wsgi.file_wrapper"](f, 65536)
