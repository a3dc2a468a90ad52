# Reports who the daemon process is: ids, groups, whether root can be regained, and the
# mod_wsgi routing keys of the request. JSON, one object.
import json
import os


def application(environ, start_response):
    try:
        os.setuid(0)
        setuid0_refused = False
    except PermissionError:
        setuid0_refused = True
    info = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "egid": os.getegid(),
        "groups": sorted(set(os.getgroups())),
        "setuid0_refused": setuid0_refused,
        "cwd": os.getcwd(),
        "process_group": environ.get("mod_wsgi.process_group"),
        "application_group": environ.get("mod_wsgi.application_group"),
        "script_name": environ.get("SCRIPT_NAME"),
        "path_info": environ.get("PATH_INFO"),
        "query_string": environ.get("QUERY_STRING"),
        "multithread": bool(environ.get("wsgi.multithread")),
        "multiprocess": bool(environ.get("wsgi.multiprocess")),
    }
    body = json.dumps(info, sort_keys=True).encode("ascii")
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
