# Shows which daemon group, process and Unix user served the request.
import json
import os
import pwd


def application(environ, start_response):
    uid = os.getuid()
    report = {
        "process_group": environ.get("mod_wsgi.process_group"),
        "application_group": environ.get("mod_wsgi.application_group"),
        "pid": os.getpid(),
        "user": pwd.getpwuid(uid).pw_name,
        "uid": uid,
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "cwd": os.getcwd(),
        "script_name": environ.get("SCRIPT_NAME"),
        "path_info": environ.get("PATH_INFO"),
    }
    body = (json.dumps(report, indent=2) + "\n").encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
