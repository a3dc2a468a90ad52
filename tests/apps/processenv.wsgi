# Reports process settings that WSGIDaemonProcess options control: umask, LANG/LC_ALL,
# groups and the working directory.
import json
import os


def application(environ, start_response):
    mask = os.umask(0)
    os.umask(mask)
    report = {
        "umask": mask,
        "lang": os.environ.get("LANG"),
        "lc_all": os.environ.get("LC_ALL"),
        "groups": sorted(os.getgroups()),
        "gid": os.getgid(),
        "cwd": os.getcwd(),
    }
    body = json.dumps(report).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
