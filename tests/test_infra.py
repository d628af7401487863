"""infra/ files validated without a Docker engine or a cluster (the real deploy is in test_servers)."""

import json
import os
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, require_tool

INFRA = REPO / "infra"
SECRETS = {"POSTGRES_PASSWORD": "pw", "S3_ACCESS_KEY": "ak", "S3_SECRET_KEY": "sk", "MLFLOW_ADMIN_PASSWORD": "ap",
           "MLFLOW_WORKER_PASSWORD": "wp", "MLFLOW_FLASK_SERVER_SECRET_KEY": "fk", "PREFECT_AUTH_STRING": "u:p"}


def compose_cmd():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    require_tool("docker-compose")  # fails in CI, skips elsewhere


def test_compose_config_validates():
    env = {**os.environ, **SECRETS}
    r = subprocess.run([*compose_cmd(), "-f", str(INFRA / "docker-compose.yml"), "config"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rendered = yaml.safe_load(r.stdout)
    assert {"postgres", "minio", "mlflow", "mlflow-users", "prefect", "proxy"} <= set(rendered["services"])
    env = {name: svc.get("environment", {}) for name, svc in rendered["services"].items()}
    assert env["prefect"]["PREFECT_SERVER_API_AUTH_STRING"] == "u:p"
    assert env["mlflow"]["MLFLOW_ADMIN_PASSWORD"] == "ap" and env["mlflow-users"]["MLFLOW_WORKER_PASSWORD"] == "wp"


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_without_each_secret(missing):
    env = {**{k: v for k, v in os.environ.items() if k not in SECRETS}, **{k: v for k, v in SECRETS.items() if k != missing}}
    r = subprocess.run([*compose_cmd(), "-f", str(INFRA / "docker-compose.yml"), "config"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and f"set {missing}" in (r.stderr + r.stdout)


def test_only_the_tls_proxy_is_published_and_no_secret_is_in_the_files():
    spec = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = spec["services"]
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"proxy"}, published  # MLflow, Prefect, PostgreSQL, MinIO: internal network only
    assert spec["networks"]["internal"]["internal"] is True
    for name, svc in services.items():
        assert svc["networks"] == (["internal", "edge"] if name == "proxy" else ["internal"]), name
    assert sorted(services["proxy"]["ports"]) == ["4443:4443", "5443:5443"]
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in services["proxy"]["volumes"]
    text = (INFRA / "docker-compose.yml").read_text()
    for var in SECRETS:
        assert f"${{{var}:?" in text  # required from the environment, no default value
    assert "postgresql://" in text and services["mlflow"]["build"]["dockerfile"] == "infra/mlflow-server.Dockerfile"
    script = (INFRA / "mlflow-server.sh").read_text()
    assert "--app-name basic-auth" in script and "--serve-artifacts" in script and "default_permission = READ" in script
    assert 'ENTRYPOINT ["/opt/quantlens/mlflow-server.sh"]' in (INFRA / "mlflow-server.Dockerfile").read_text()
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if line and not line.startswith("#"))
    assert set(SECRETS) <= set(example) and all(not example[k] for k in SECRETS)  # names only, never values


def test_caddyfile_validates():
    require_tool("caddy")
    for tls in ("internal", "ops@example.org"):
        env = {**os.environ, "QUANTLENS_TLS": tls, "QUANTLENS_HOST": "quantlens.example.org", "XDG_DATA_HOME": "/nonexistent-ok"}
        r = subprocess.run(["caddy", "adapt", "--config", str(INFRA / "Caddyfile"), "--adapter", "caddyfile"], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cfg = json.loads(r.stdout)
        servers = cfg["apps"]["http"]["servers"]
        listen = sorted(addr for srv in servers.values() for addr in srv["listen"])
        assert listen == ["0.0.0.0:4443", "0.0.0.0:5443"], listen
        upstreams = sorted(u["dial"] for srv in servers.values() for route in srv["routes"] for h in route["handle"]
                           for sub in h.get("routes", [{"handle": [h]}]) for hh in sub["handle"] for u in hh.get("upstreams", []))
        assert upstreams == ["mlflow:5000", "prefect:4200"], upstreams
        issuers = json.dumps(cfg["apps"]["tls"])
        assert ("internal" in issuers) if tls == "internal" else ("acme" in issuers and "ops@example.org" in issuers)


def test_gpu_pool_template():
    t = json.loads((INFRA / "gpu-pool-base-job-template.json").read_text())
    container = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert t["variables"]["properties"]["gpus"]["default"] == 1
    spec = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == "{{ node_selector }}"
    assert any(v["name"] == "hf-cache" and "persistentVolumeClaim" in v for v in spec["volumes"])
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "{{ mlflow_tracking_uri }}"
    for var, key in (("MLFLOW_TRACKING_USERNAME", "mlflow-username"), ("MLFLOW_TRACKING_PASSWORD", "mlflow-password"),
                     ("PREFECT_API_AUTH_STRING", "prefect-auth-string")):  # credentials from the cluster's secret, not the file
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "quantlens-secrets", "key": key}
    assert env["MLFLOW_TRACKING_SERVER_CERT_PATH"]["value"] == env["PREFECT_API_SSL_CERT_FILE"]["value"] == "{{ ca_cert_path }}"
    assert not any(name.startswith("AWS_") for name in env)  # artifacts go through the MLflow server
    # every {{ variable }} used in the job configuration is declared
    import re

    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(t["job_configuration"])))
    assert used <= set(t["variables"]["properties"]), used - set(t["variables"]["properties"])


def test_prefect_yaml_entrypoints_and_schedule():
    import importlib

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    names = {}
    for d in spec["deployments"]:
        module, fn = d["entrypoint"].split(":")
        obj = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), fn)
        names[d["name"]] = obj.name
    assert names == {"gpu": "quantlens-model", "nightly": "quantlens-sweep", "on-demand": "quantlens-sweep"}
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["parameters"]["dispatch"] == "quantlens-model/gpu"  # what the sweep fans out to
    assert (REPO / nightly["parameters"]["config"]).is_file()
    import sys
    from pathlib import Path

    r = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deploy", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--prefect-file" in r.stdout


def test_dockerfile_installs_the_project():
    text = (INFRA / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("FROM pytorch/pytorch:") and "cuda" in lines[0]
    for part in ("COPY quantlens", "COPY flows", "COPY tasks", "prefect-kubernetes", "USER quantlens"):
        assert part in text
