"""Python-side helpers of mod_wsgi_rs, run inside each daemon's interpreter.

Loaded once per daemon process as the module ``mod_wsgi_rs_bootstrap``.
"""

import os
import site
import sys


def activate_home(home):
    """Make ``home`` (a virtualenv made by ``python3 -m venv``) this interpreter's prefix.

    The daemon runs the system Python, so the standard library stays the system one; what a
    virtualenv changes is sys.prefix and the site-packages on sys.path, which is what this
    does (as the venv's own python would have at start-up).
    """
    version = "python%d.%d" % sys.version_info[:2]
    cfg = os.path.join(home, "pyvenv.cfg")
    candidates = [os.path.join(home, "lib", version, "site-packages")]
    if not os.path.isfile(cfg) and not os.path.isdir(candidates[0]):
        raise RuntimeError(
            "python-home %r is neither a virtualenv (no pyvenv.cfg) nor a Python prefix "
            "with lib/%s/site-packages" % (home, version)
        )
    include_system = False
    if os.path.isfile(cfg):
        with open(cfg) as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "include-system-site-packages":
                    include_system = value.strip().lower() == "true"
    if not include_system:
        system = set(site.getsitepackages() + [site.getusersitepackages()])
        sys.path[:] = [p for p in sys.path if p not in system]
    sys.prefix = sys.exec_prefix = home
    before = list(sys.path)
    for path in candidates:
        if os.path.isdir(path):
            site.addsitedir(path)
    # The venv's packages come before anything else that was added, as in the venv itself.
    added = [p for p in sys.path if p not in before]
    sys.path[:] = [p for p in sys.path if p not in added]
    insert_at = 1 if sys.path and sys.path[0] == "" else 0
    sys.path[insert_at:insert_at] = added


class FileWrapper:
    """``wsgi.file_wrapper``: iterates a file-like object in blocks, never reading it whole."""

    def __init__(self, filelike, blksize=8192):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration
