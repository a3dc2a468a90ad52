# For WSGIImportScript (tests/pep3333.rs): importing this script appends "<pid>" to the file
# preload-marker next to it, so a test can see that the daemon imported it at start, before
# any request, and only once. The application reports its pid and how often it was imported.
import os

MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preload-marker")
with open(MARKER, "a") as f:
    f.write("%d\n" % os.getpid())


def application(environ, start_response):
    with open(MARKER) as f:
        imports = len(f.read().split())
    body = ("pid=%d imports=%d" % (os.getpid(), imports)).encode("ascii")
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
