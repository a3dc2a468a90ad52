# Writes one uniquely tagged line to each of sys.stdout, sys.stderr, wsgi.errors (write and
# writelines) and the logging module (a named logger with no handler, so logging's default
# "last resort" handler, and the root logger through logging.error()), then, with raise=1,
# raises from two calls deep so the error log gets a full traceback. QUERY_STRING: tag=TAG.
import logging
import os
import sys
from urllib.parse import parse_qs


def level_two(tag):
    raise KeyError("deep-" + tag)


def level_one(tag):
    level_two(tag)


def application(environ, start_response):
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    tag = qs.get("tag", ["none"])[0]
    print("stdout-line " + tag)
    sys.stdout.flush()
    print("stderr-line " + tag, file=sys.stderr)
    errors = environ["wsgi.errors"]
    errors.write("errors-line " + tag + "\n")
    errors.writelines(["errors-lines-a " + tag + "\n", "errors-lines-b " + tag + "\n"])
    errors.flush()
    logging.getLogger("mod_wsgi_rs.test").warning("logging-warning %s", tag)
    logging.error("logging-error %s", tag)
    if qs.get("raise", ["0"])[0] == "1":
        level_one(tag)
    body = ("pid=%d" % os.getpid()).encode("ascii")
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
