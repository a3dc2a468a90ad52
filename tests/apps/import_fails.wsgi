# Raises while being imported: the application can never be loaded (startup-timeout tests).
raise ImportError("import_fails.wsgi cannot be imported, on purpose")


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"unreachable"]
