# Sleeps for the number of seconds in the query string (default 1), then reports its pid.
import os
import time


def application(environ, start_response):
    seconds = float(environ.get("QUERY_STRING") or 1)
    time.sleep(seconds)
    body = ("slept %s in %d\n" % (seconds, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
