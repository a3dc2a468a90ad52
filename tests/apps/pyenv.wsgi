# Reports the daemon's Python: sys.prefix, sys.path, and where some modules import from
# (None when they cannot be imported). QUERY_STRING: modules=a,b,c (default six).
import importlib
import json
import os
import sys
from urllib.parse import parse_qs


def application(environ, start_response):
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    names = qs.get("modules", ["six"])[0].split(",")
    found = {}
    for name in names:
        try:
            found[name] = importlib.import_module(name).__file__
        except ImportError as e:
            found[name] = None
            found[name + ":error"] = str(e)
    info = {
        "pid": os.getpid(),
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "exec_prefix": sys.exec_prefix,
        "executable": sys.executable,
        "path": sys.path,
        "version": sys.version,
        "modules": found,
    }
    body = json.dumps(info, sort_keys=True).encode("utf-8")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
