# Raises before start_response: the client must get 500 and the log a full traceback.


def application(environ, start_response):
    raise ValueError("boom from error.wsgi")
