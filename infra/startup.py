"""
Imported first by prift.py, before torch and numpy: Ctrl-C during the seconds those imports take
ends the process in one line and exit code 130, instead of a traceback from inside a half-loaded
module. Outside an import, Ctrl-C is Python's KeyboardInterrupt as before, which prift.main turns
into the same line. Only when prift.py is the program: imported by tests or another program, it
changes nothing.
"""

import os
import signal
import sys


def _interrupted(signum, frame):
    while frame is not None:  # inside an import: the import machinery's frames are on the stack
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            sys.stderr.write("prift: interrupted\n")
            os._exit(130)
        frame = frame.f_back
    raise KeyboardInterrupt


if getattr(sys.modules.get("__main__"), "__file__", "").endswith("prift.py") and (
    signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    signal.signal(signal.SIGINT, _interrupted)
