# A script without the callable "application": the module must answer 500.


def not_the_application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"wrong callable"]
