# Reports the WSGI environ as JSON (tests/pep3333.rs): every str value as it is (json escapes
# non-ASCII, so a latin-1 native string arrives as \u00XX code points, one per byte), the type
# of every value, and what the wsgi.* objects offer. Reads the whole request body first.
import json
import os


def application(environ, start_response):
    body_in = environ["wsgi.input"].read()
    strings = {}
    types = {}
    for key, value in environ.items():
        types[key] = type(value).__name__
        if isinstance(value, str):
            strings[key] = value
    info = {
        "pid": os.getpid(),
        "env": strings,
        "types": types,
        "wsgi_version": list(environ["wsgi.version"]),
        "url_scheme": environ["wsgi.url_scheme"],
        "input_terminated": environ.get("wsgi.input_terminated"),
        "multithread": environ["wsgi.multithread"],
        "multiprocess": environ["wsgi.multiprocess"],
        "run_once": environ["wsgi.run_once"],
        "file_wrapper": callable(environ.get("wsgi.file_wrapper")),
        "input_methods": [m for m in ("read", "readline", "readlines", "__iter__")
                          if hasattr(environ["wsgi.input"], m)],
        "errors_methods": [m for m in ("write", "writelines", "flush")
                           if hasattr(environ["wsgi.errors"], m)],
        "mod_wsgi_version": list(environ.get("mod_wsgi.version") or ()),
        "body": body_in.decode("latin-1"),
    }
    body = json.dumps(info, sort_keys=True).encode("ascii")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
