"""The authenticated, TLS-fronted control plane of infra/, for real on 127.0.0.1.

MLflow runs with its authentication app through infra/mlflow-server.sh, Prefect with its API auth
string, and infra/Caddyfile terminates TLS in front of both with its own CA — the compose stack's
pieces, without containers. The workers' account is made with infra/mlflow_users.py. Then:
anonymous clients are refused; `quantlens run` without or with wrong credentials, with a read-only
user, or without the CA fails in preflight in seconds with one line; with the right ones a sweep of
a trained model logs its runs and its flow run. Every process started here is killed at the end.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from conftest import MODELS, SHARED, WIKI_TEST, require_tool
from servers import INFRA, Servers, on_postgres, wait_http

pytestmark = pytest.mark.slow

ADMIN_PW, WORKER_PW, ANALYST_PW = "admin-pw-0123456789", "worker-pw-0123456789", "analyst-pw-0123456789"
PREFECT_AUTH = "quantlens:prefect-pw-0123456789"
EXPERIMENT = "cp-sweep"


def request(url: str, *, auth: str | None = None, body: dict | None = None, ca=None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    ctx = ssl.create_default_context(cafile=str(ca)) if url.startswith("https") else None
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    require_tool("caddy")
    root = tmp_path_factory.mktemp("control-plane")
    s = Servers(root, on_postgres("plane"))  # MLflow's tracking and auth stores and Prefect's, as infra/ runs them
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        s.env.pop(var)
    try:
        prefect, mlflow = s.start_prefect_auth(PREFECT_AUTH), s.start_mlflow_auth(ADMIN_PW)  # start together, wait together
        _, ports, ca = s.start_proxy()
        wait_http(f"http://127.0.0.1:{s.mlflow_port}/health", 180, mlflow)
        wait_http(f"http://127.0.0.1:{s.prefect_port}/api/health", 180, prefect)
        s.mlflow = f"https://localhost:{ports['mlflow']}"
        s.prefect = f"https://localhost:{ports['prefect']}/api"
        s.ca = ca
        deadline = time.monotonic() + 60
        while True:  # the proxy's CA and certificate are made at its first start
            try:
                if ca.is_file() and request(s.mlflow + "/health", ca=ca)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root / "caddy.log").read_text()[-2000:]
            time.sleep(0.5)
        admin = {**s.env, "MLFLOW_TRACKING_URI": s.mlflow, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PW,
                 "MLFLOW_TRACKING_SERVER_CERT_PATH": str(ca), "WORKER_PW": WORKER_PW, "ANALYST_PW": ANALYST_PW}
        s.admin_env = admin
        for user, var in (("quantlens-worker", "WORKER_PW"), ("analyst", "ANALYST_PW")):
            r = users("ensure-user", "--user", user, "--password-env", var, env=admin)
            assert r.returncode == 0 and f"created MLflow user '{user}'" in r.stdout, r.stdout + r.stderr
        # an experiment the admin made: the analyst only reads it (default permission READ)
        code, _ = request(s.mlflow + "/api/2.0/mlflow/experiments/create", auth=f"admin:{ADMIN_PW}", body={"name": "admin-made"}, ca=ca)
        assert code == 200
        yield s
    finally:
        s.stop()


def users(*args, env):
    return subprocess.run([sys.executable, str(INFRA / "mlflow_users.py"), *args], env=env, capture_output=True, text=True, timeout=60)


def config(tmp_path, experiment=EXPERIMENT) -> str:
    cfg = {"name": "cp", "experiment": experiment, "models": [str(MODELS / "tiny-opt")], "settings": ["W16A16", "W4A16"],
           "datasets": [{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 8}],
           "eval": {"seqlen": 128, "batch_size": 8}, "hardware": {"device": "cpu"}}
    f = tmp_path / "cp.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return str(f)


def quantlens(plane, tmp_path, cfg, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in plane.env.items() if not k.startswith(("MLFLOW_TRACKING_", "PREFECT_API_"))}
    full.update({"MLFLOW_TRACKING_URI": plane.mlflow, "QUANTLENS_CACHE": str(tmp_path / "cache"),
                 "QUANTLENS_SHARED_DATA": str(SHARED), "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect")})
    full.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", "run", cfg, "--results", str(tmp_path / "results")],
                          cwd=tmp_path, env=full, capture_output=True, text=True, timeout=600)


def worker(plane, **extra):
    return {"MLFLOW_TRACKING_USERNAME": "quantlens-worker", "MLFLOW_TRACKING_PASSWORD": WORKER_PW,
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(plane.ca), **extra}


def one_line_failure(r, code: int) -> str:
    assert r.returncode == code, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_anonymous_clients_cannot_read_or_write(plane):
    search = {"experiment_ids": ["0"], "max_results": 1}
    for base, ca in ((plane.mlflow, plane.ca), (f"http://127.0.0.1:{plane.mlflow_port}", None)):
        assert request(base + "/api/2.0/mlflow/runs/search", body=search, ca=ca)[0] == 401
        assert request(base + "/api/2.0/mlflow/runs/create", body={"experiment_id": "0"}, ca=ca)[0] == 401
        assert request(base + "/api/2.0/mlflow/runs/search", auth="admin:wrong-password", body=search, ca=ca)[0] == 401
        assert request(base + "/api/2.0/mlflow/runs/search", auth=f"admin:{ADMIN_PW}", body=search, ca=ca)[0] == 200
    for base, ca in ((plane.prefect, plane.ca), (f"http://127.0.0.1:{plane.prefect_port}/api", None)):
        assert request(base + "/flow_runs/filter", body={}, ca=ca)[0] == 401
        assert request(base + "/flows/", body={"name": "intruder"}, ca=ca)[0] == 401
        assert request(base + "/flow_runs/filter", auth="quantlens:wrong", body={}, ca=ca)[0] == 401
        assert request(base + "/flow_runs/filter", auth=PREFECT_AUTH, body={}, ca=ca)[0] == 200
        assert request(base + "/health", ca=ca)[0] == 200  # probes stay open
    # TLS is real: without the proxy's CA a client refuses the certificate
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(plane.mlflow + "/health", timeout=10)


@pytest.mark.parametrize("who", ["none", "wrong"])
def test_run_without_valid_mlflow_credentials_fails_in_preflight(plane, tmp_path, who):
    env = {"MLFLOW_TRACKING_SERVER_CERT_PATH": str(plane.ca)}
    if who == "wrong":
        env.update(MLFLOW_TRACKING_USERNAME="quantlens-worker", MLFLOW_TRACKING_PASSWORD="not-the-password")
    r = quantlens(plane, tmp_path, config(tmp_path), **env)
    line = one_line_failure(r, 6)  # the one-request check's answer: a refusal is never retried
    assert line.startswith(f"quantlens: MLflow server {plane.mlflow} refused the credentials")
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line
    assert ("no credentials" if who == "none" else "user 'quantlens-worker'") in line
    assert r.stdout == "" and not (tmp_path / "results").exists()  # nothing planned, started or written


def test_read_only_user_and_untrusted_certificate_fail_in_preflight(plane, tmp_path):
    r = quantlens(plane, tmp_path, config(tmp_path, experiment="admin-made"), MLFLOW_TRACKING_USERNAME="analyst",
                     MLFLOW_TRACKING_PASSWORD=ANALYST_PW, MLFLOW_TRACKING_SERVER_CERT_PATH=str(plane.ca))
    line = one_line_failure(r, 6)
    assert "user 'analyst' has READ permission on experiment 'admin-made' and cannot log runs" in line
    # granted EDIT by the admin, the same user passes preflight (a dry run stops right after it)
    g = users("grant", "--user", "analyst", "--experiment", "admin-made", "--permission", "EDIT", env=plane.admin_env)
    assert g.returncode == 0, g.stderr
    full = {**plane.env, "MLFLOW_TRACKING_URI": plane.mlflow, "MLFLOW_TRACKING_USERNAME": "analyst", "MLFLOW_TRACKING_PASSWORD": ANALYST_PW,
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(plane.ca), "QUANTLENS_SHARED_DATA": str(SHARED)}
    ok = subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", "run", config(tmp_path, experiment="admin-made"), "--dry-run"],
                        cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "2 to run" in ok.stdout, ok.stdout + ok.stderr
    r = quantlens(plane, tmp_path, config(tmp_path), **{**worker(plane), "MLFLOW_TRACKING_SERVER_CERT_PATH": None})
    line = one_line_failure(r, 5)
    assert "TLS certificate is not trusted" in line and "set MLFLOW_TRACKING_SERVER_CERT_PATH" in line


def test_run_without_prefect_credentials_fails_in_preflight(plane, tmp_path):
    r = quantlens(plane, tmp_path, config(tmp_path), **worker(plane, PREFECT_API_URL=plane.prefect,
                                                              PREFECT_API_SSL_CERT_FILE=str(plane.ca)))
    line = one_line_failure(r, 6)
    assert line.startswith(f"quantlens: Prefect API {plane.prefect} refused the credentials (no credentials)")
    assert "set PREFECT_API_AUTH_STRING" in line
    assert r.stdout == "" and not (tmp_path / "results").exists()  # refused before the flow: nothing evaluated


def test_sweep_with_credentials_logs_its_runs_through_tls(plane, tmp_path):
    r = quantlens(plane, tmp_path, config(tmp_path), **worker(plane, PREFECT_API_URL=plane.prefect,
                                                                 PREFECT_API_SSL_CERT_FILE=str(plane.ca), PREFECT_API_AUTH_STRING=PREFECT_AUTH))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "2 evaluated" in r.stdout
    # read back as the admin, through the proxy: the worker's two runs, finished, with their numbers
    code, out = request(plane.mlflow + f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}",
                        auth=f"admin:{ADMIN_PW}", ca=plane.ca)
    exp = json.loads(out)["experiment"]["experiment_id"]
    code, out = request(plane.mlflow + "/api/2.0/mlflow/runs/search", auth=f"admin:{ADMIN_PW}", ca=plane.ca,
                        body={"experiment_ids": [exp], "filter": "tags.`quantlens.kind` = 'eval'"})
    runs = json.loads(out)["runs"]
    assert sorted(r["info"]["run_name"].split(" · ")[0] for r in runs) == ["W16A16", "W4A16"]
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    assert {r["info"]["user_id"] for r in runs} == {"quantlens-worker"}  # logged as the workers' account
    for run in runs:
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert 50 < metrics["wikitext2_ppl"] < 400
    # ... and the sweep's flow run is on the authenticated Prefect server
    code, out = request(plane.prefect + "/flow_runs/filter", auth=PREFECT_AUTH, ca=plane.ca, body={})
    states = [fr["state_type"] for fr in json.loads(out)]
    assert code == 200 and states and "COMPLETED" in states
