"""Start real servers on loopback for tests, and always clean them up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from postgres import Databases

BIN = Path(sys.executable).parent
REAPER = Path(__file__).with_name("reaper.py")
INFRA = Path(__file__).resolve().parents[1] / "infra"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


def kill_tree(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    """Kill a process and every descendant (a worker's flow-run subprocesses too)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        parent = psutil.Process(proc.pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)


class Servers:
    """A Prefect server and an MLflow server on free loopback ports: on PostgreSQL (``pg``: the
    databases of :mod:`postgres`, one per store, as infra/ runs them) or, without ``pg``, on SQLite."""

    def __init__(self, root: Path, pg: "Databases | None" = None):
        self.root = root
        self.pg = pg
        self.stores: dict[str, str] = {}  # store name → its URL (a server restarted on a store finds it again)
        self.procs: list[subprocess.Popen] = []
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.prefect_url = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = {
            **os.environ,
            "PREFECT_API_URL": self.prefect_url,
            "PREFECT_HOME": str(root / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "QUANTLENS_HEARTBEAT_S": "1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # as infra/mlflow-server.sh: no GenAI job workers
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }

    def start(self, cmd: list[str], log: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` under the reaper: its tree dies with this test process, however that ends."""
        out = open(self.root / log, "ab")
        guarded = [sys.executable, str(REAPER), str(os.getpid()), "--", *cmd]
        p = subprocess.Popen(guarded, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        self.procs.append(p)
        return p

    def store(self, name: str, driver: str = "") -> str:
        """The URL of store ``name`` (``mlflow.db``, ``auth.db``, ``prefect``): a PostgreSQL database of
        its own when the servers run on PostgreSQL, else a SQLite file under ``root``."""
        if name not in self.stores:
            if self.pg is None:
                self.stores[name] = f"sqlite:///{self.root / name}"
            else:
                from postgres import database_url

                self.stores[name] = database_url(self.pg.create(name.removesuffix(".db")), driver)
        return self.stores[name]

    def prefect_env(self) -> dict[str, str]:
        """The Prefect server's environment: its home, and its database when on PostgreSQL (asyncpg)."""
        env = {**self.env, "PREFECT_HOME": str(self.root / "prefect-server")}
        env.pop("PREFECT_API_URL", None)
        if self.pg is not None:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.store("prefect", "asyncpg")
        return env

    def start_prefect(self) -> None:
        env = self.prefect_env()
        p = self.start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)], "prefect-server.log", env)
        wait_http(self.prefect_url + "/health", 180, p)

    def start_mlflow(self, port: int | None = None, db: str = "mlflow.db") -> subprocess.Popen:
        port = port or self.mlflow_port
        p = self.start(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", self.store(db), "--artifacts-destination", str(self.root / "artifacts")],
            f"mlflow-{port}.log",
        )
        wait_http(f"http://127.0.0.1:{port}/health", 180, p)
        return p

    def start_prefect_auth(self, auth: str) -> subprocess.Popen:
        """A Prefect server whose API wants ``auth`` (user:password); not waited for (see wait_http)."""
        env = {**self.prefect_env(), "PREFECT_SERVER_API_AUTH_STRING": auth}
        return self.start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)],
                          "prefect-server.log", env)

    def start_mlflow_auth(self, admin_password: str) -> subprocess.Popen:
        """MLflow with its authentication app, through infra/mlflow-server.sh as the compose stack
        runs it (its tracking and auth stores on PostgreSQL where the servers are, local artifacts
        instead of S3); not waited for."""
        env = {**self.env, "BACKEND_URI": self.store("mlflow.db"), "AUTH_DB_URI": self.store("auth.db"),
               "ARTIFACTS_DESTINATION": str(self.root / "artifacts"), "MLFLOW_ADMIN_PASSWORD": admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key", "MLFLOW_BIND": "127.0.0.1", "MLFLOW_PORT": str(self.mlflow_port),
               "TMPDIR": str(self.root)}
        return self.start(["sh", str(INFRA / "mlflow-server.sh"), "--workers", "1"], "mlflow-auth.log", env)

    def start_proxy(self) -> tuple[subprocess.Popen, dict[str, int], Path]:
        """infra/Caddyfile in front of both servers on localhost; returns the process, its ports and
        the root certificate of its internal CA (what a lab gives its clients)."""
        ports = {"mlflow": free_port(), "prefect": free_port()}
        data = self.root / "caddy"
        env = {**self.env, "QUANTLENS_HOST": "localhost", "QUANTLENS_TLS": "internal", "QUANTLENS_PROXY_BIND": "127.0.0.1",
               "MLFLOW_TLS_PORT": str(ports["mlflow"]), "PREFECT_TLS_PORT": str(ports["prefect"]),
               "MLFLOW_UPSTREAM": f"127.0.0.1:{self.mlflow_port}", "PREFECT_UPSTREAM": f"127.0.0.1:{self.prefect_port}",
               "XDG_DATA_HOME": str(data), "XDG_CONFIG_HOME": str(data), "HOME": str(data)}
        p = self.start(["caddy", "run", "--config", str(INFRA / "Caddyfile"), "--adapter", "caddyfile"], "caddy.log", env)
        return p, ports, data / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def stop(self) -> None:
        for p in reversed(self.procs):
            kill_tree(p, signal.SIGTERM)
            kill_tree(p)
        self.procs.clear()
        if self.pg is not None:
            self.pg.drop_all()


def on_postgres(prefix: str) -> "Databases":
    """The databases of one test module on the test PostgreSQL (:mod:`postgres`); the test skips,
    saying how to point it at one, where none answers."""
    import pytest

    from postgres import Databases, unreachable

    why = unreachable()
    if why:
        pytest.skip(why)
    return Databases(prefix)


def mlflow_runs(url: str, experiment: str, flt: str = "", view: str = "ACTIVE_ONLY") -> list[dict]:
    """Runs of an experiment through MLflow's REST API (``view``: ACTIVE_ONLY, DELETED_ONLY or ALL)."""
    import json

    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}", timeout=30) as r:
        exp = json.load(r)["experiment"]["experiment_id"]
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp], "filter": flt, "max_results": 1000, "run_view_type": view}
        if token:
            body["page_token"] = token
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            page = json.load(r)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("params", [])}
