"""infra/ files validated without a Docker engine or a cluster (the real deploy is in test_servers)."""

import json
import os
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO

INFRA = REPO / "infra"
SECRETS = {"POSTGRES_PASSWORD": "pw", "S3_ACCESS_KEY": "ak", "S3_SECRET_KEY": "sk"}


def compose_cmd():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if os.environ.get("CI"):
        pytest.fail("docker-compose is missing: scripts/install.sh installs it (Debian package docker-compose)")
    pytest.skip("no docker compose here; scripts/install.sh installs it")


def test_compose_config_validates():
    env = {**os.environ, **SECRETS}
    r = subprocess.run([*compose_cmd(), "-f", str(INFRA / "docker-compose.yml"), "config"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rendered = yaml.safe_load(r.stdout)
    assert {"postgres", "minio", "mlflow", "prefect"} <= set(rendered["services"])


def test_compose_refuses_without_secrets():
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    r = subprocess.run([*compose_cmd(), "-f", str(INFRA / "docker-compose.yml"), "config"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "set POSTGRES_PASSWORD" in (r.stderr + r.stdout)


def test_compose_binds_localhost_and_holds_no_secret():
    spec = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    ports = [p for s in spec["services"].values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    text = (INFRA / "docker-compose.yml").read_text()
    for var in SECRETS:
        assert f"${{{var}:?" in text  # required from the environment, no default value
    assert "mlflow server" in text and "--artifacts-destination s3://" in text and "postgresql://" in text


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
    assert "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]  # secrets from the cluster, not the file
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
