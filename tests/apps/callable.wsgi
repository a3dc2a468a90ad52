# Two callables: WSGICallableObject / callable-object= choose between them.


def _reply(start_response, text):
    body = text.encode("ascii")
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    return _reply(start_response, "callable=application")


def app2(environ, start_response):
    return _reply(start_response, "callable=app2")
