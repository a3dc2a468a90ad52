# The routing tests' app (tests/routing.rs): reports which daemon group ran the request and as
# whom, as JSON. It also leaves a "canary": when the environ has CANARY_DIR (the tests SetEnv it
# at server level), each run appends one line to CANARY_DIR/uid-<uid>, so a test can prove that
# a script never ran as a given user, even if a 500 had hidden the response.
import json
import os


def _canary(environ):
    directory = environ.get("CANARY_DIR")
    if not directory:
        return
    line = "%s %s %s\n" % (os.getuid(), environ.get("mod_wsgi.process_group"),
                           environ.get("SCRIPT_NAME"))
    try:
        with open(os.path.join(directory, "uid-%d" % os.getuid()), "a") as f:
            f.write(line)
    except OSError:
        pass


def application(environ, start_response):
    _canary(environ)
    info = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "egid": os.getegid(),
        "process_group": environ.get("mod_wsgi.process_group"),
        "application_group": environ.get("mod_wsgi.application_group"),
        "script_name": environ.get("SCRIPT_NAME"),
        "script_filename": environ.get("SCRIPT_FILENAME"),
        "server_name": environ.get("SERVER_NAME"),
        "PROCESS_GROUP": environ.get("PROCESS_GROUP"),
    }
    body = json.dumps(info, sort_keys=True).encode("ascii")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
