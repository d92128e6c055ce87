"""Stops a process the tests started at a named point until the test lets it go: helpers.Held copies
this file as sitecustomize.py into a directory first on the child's PYTHONPATH, so that Python runs
it at start-up, before the first line of the program. Without PRIFT_TEST_HOLD in the environment it
does nothing (the variable is removed, so that the process's own children are not held).

PRIFT_TEST_HOLD is JSON: {"ready": FD, "go": FD, "at": [KIND, REGEX], "nth": N}. The process stops
the N-th time it does KIND with a name REGEX finds:

    import   before it looks for a module named so (its import has begun: importlib's frames are
             on the stack, and those of the module that imports it)
    write    after os.write() has written to a file of that path (the bytes are in the file)
    replace  before os.replace() renames a file onto that path

There it writes one byte to the pipe `ready` and reads the pipe `go` until the test closes it. A
signal the test sends meanwhile is handled there, by the handler the program has installed.
"""

import json
import os
import re
import sys


def install(ready, go, at, nth=1):
    kind, pattern = at
    found = re.compile(pattern).search
    real_write, real_replace, seen = os.write, os.replace, 0

    def stop(name):
        nonlocal seen
        if not found(name):
            return
        seen += 1
        if seen == nth:
            real_write(ready, b"!")
            while os.read(go, 1):
                pass

    if kind == "import":

        class Finder:
            @staticmethod
            def find_spec(name, path=None, target=None):
                stop(name)
                return None  # then the other finders find it, as always

        sys.meta_path.insert(0, Finder)
    elif kind == "write":

        def write(fd, data):
            n = real_write(fd, data)
            try:
                stop(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
            return n

        os.write = write
    elif kind == "replace":

        def replace(src, dst, **kw):
            stop(os.fspath(dst))
            return real_replace(src, dst, **kw)

        os.replace = replace
    else:
        raise ValueError(f"PRIFT_TEST_HOLD: no stop of kind {kind!r}")


def run_next_sitecustomize():
    """The sitecustomize this file hides, if the interpreter has one."""
    import importlib.util
    from importlib.machinery import PathFinder

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if __name__ == "sitecustomize":
    if "PRIFT_TEST_HOLD" in os.environ:
        install(**json.loads(os.environ.pop("PRIFT_TEST_HOLD")))
    run_next_sitecustomize()
