"""A test run killed by a timeout leaves no server behind (the servers run under tests/reaper.py)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from conftest import REPO
from servers import free_port

INNER = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from servers import Servers
s = Servers(Path({root!r}))
p = s.start([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}"], "http.log")
print(p.pid, flush=True)
time.sleep(600)
"""


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
            return True
    except OSError:
        return False


def test_killed_test_process_takes_its_servers_with_it(tmp_path):
    port = free_port()
    code = INNER.format(tests=str(REPO / "tests"), root=str(tmp_path), port=port)
    outer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    reaper_pid = int(outer.stdout.readline())
    t = time.monotonic()
    while not _up(port):
        assert time.monotonic() - t < 30, "server did not start"
        time.sleep(0.2)
    server = [p for p in psutil.Process(reaper_pid).children(recursive=True)]
    assert server, "the server runs under the reaper"
    os.kill(outer.pid, signal.SIGKILL)  # like a CI timeout: no cleanup code runs in the test process
    outer.wait()
    t = time.monotonic()
    while (_up(port) or any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in server)) and time.monotonic() - t < 15:
        time.sleep(0.3)
    assert not _up(port)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in server)
