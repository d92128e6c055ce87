"""python fifo_watch.py PID FIFO... (started by helpers.never_waits_on): until its stdin closes,
watches whether a thread of process PID sleeps in the kernel until someone opens the other end of a
FIFO (Linux's /proc/PID/task/*/wchan; never, where the kernel does not say). Each time one does, it
prints a line and opens the other end of each FIFO, without blocking itself, so that the open
returns. A process of its own, not a thread: the process it watches may hold its interpreter's lock
while it waits (an open in a library's C code, as safetensors' load_file does).
"""

import os
import select
import sys


def waiting(pid):
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/wchan") as f:
                if f.read().strip() in ("wait_for_partner", "fifo_open"):
                    return True
        except OSError:
            pass
    return False


def main(pid, *fifos):
    # how often it looks (every 10 ms), not how long it allows: it looks until stdin closes
    while not select.select([sys.stdin], [], [], 0.01)[0]:
        if waiting(pid):
            print("waited", flush=True)
            for fifo in fifos:
                for flags in (os.O_WRONLY, os.O_RDONLY):
                    try:
                        os.close(os.open(fifo, flags | os.O_NONBLOCK))
                    except OSError:
                        pass


if __name__ == "__main__":
    main(*sys.argv[1:])
