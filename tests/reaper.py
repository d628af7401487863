"""Run a command; kill its whole process tree when the watched process (the test run) dies.

    python tests/reaper.py WATCHED_PID -- command args...

Servers started by the tests go through this, so a test run killed by a timeout (even SIGKILL,
which no cleanup handler sees) leaves no Prefect or MLflow server, worker or job runner behind.
The tree is re-read every second, so descendants that start sessions of their own are known too.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil


def main() -> int:
    watched, sep, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    assert sep == "--" and cmd, __doc__
    child = subprocess.Popen(cmd, start_new_session=True)
    known: dict[int, psutil.Process] = {}

    def refresh() -> None:
        try:
            root = psutil.Process(child.pid)
            for p in [root, *root.children(recursive=True)]:
                known.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def kill_all(*_: object) -> None:
        refresh()
        for p in known.values():
            try:
                p.kill()  # psutil checks the process identity (pid reuse safe)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(known.values()), timeout=10)
        sys.exit(0)

    signal.signal(signal.SIGTERM, kill_all)
    signal.signal(signal.SIGINT, kill_all)
    while child.poll() is None:
        if not psutil.pid_exists(watched):
            kill_all()
        refresh()
        time.sleep(1.0)
    kill_all()  # the command ended: its leftover descendants go too
    return 0


if __name__ == "__main__":
    sys.exit(main())
