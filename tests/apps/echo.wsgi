# Echoes wsgi.input back, 64 KiB at a time, never holding the whole body in memory.
# Content-Length of the response = CONTENT_LENGTH of the request when the client sent one.
#
# Default: full duplex, each chunk is yielded as soon as it was read (the response flows
# while the request body is still arriving).
# QUERY_STRING spool=1: the whole body is first spooled to a temporary file, then streamed
# back from it (request fully read before the response starts, as mod_wsgi's daemon mode
# needs: it sends the whole request body before it reads any response).
import tempfile

BLOCK = 65536


def application(environ, start_response):
    length = environ.get("CONTENT_LENGTH", "")
    remaining = int(length) if length else None
    stream = environ["wsgi.input"]

    def read_chunks():
        left = remaining
        while left is None or left > 0:
            want = BLOCK if left is None else min(BLOCK, left)
            data = stream.read(want)
            if not data:
                break
            if left is not None:
                left -= len(data)
            yield data

    headers = [("Content-Type", "application/octet-stream")]
    if length:
        headers.append(("Content-Length", str(remaining)))

    if "spool=1" in environ.get("QUERY_STRING", ""):
        spool = tempfile.TemporaryFile()
        for data in read_chunks():
            spool.write(data)
        spool.seek(0)
        start_response("200 OK", headers)

        def from_spool():
            try:
                while True:
                    data = spool.read(BLOCK)
                    if not data:
                        break
                    yield data
            finally:
                spool.close()

        return from_spool()

    start_response("200 OK", headers)
    return read_chunks()
