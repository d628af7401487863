"""Real servers on loopback, on the backend users deploy: a Prefect server (PostgreSQL, asyncpg) with
process workers, MLflow tracking servers (PostgreSQL), each store a database of its own.

Deploys infra/prefect.yaml (pointed at a local process pool), runs configs/demo.yaml (one setting of
each kind, less data) through the worker with the models fanned out as separate flow runs, and checks the runs through MLflow's REST
API. Then the faults: a worker killed mid-sweep, the MLflow server down at the start and briefly
down mid-run, two sweeps at once against one store. Every process started here is killed at the end.
"""

import json
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
import yaml

from conftest import MODELS, REPO, SHARED, WIKI_TEST
from servers import BIN, Servers, free_port, kill_tree, mlflow_runs, on_postgres, params, tags

pytestmark = pytest.mark.slow
EVAL = "tags.`quantlens.kind` = 'eval'"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    s = Servers(root, on_postgres("servers"))
    s.env.update({"QUANTLENS_CACHE": str(root / "cache"), "QUANTLENS_SHARED_DATA": str(SHARED),
                  "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    try:
        s.start_prefect()
        s.start_mlflow()
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "test-pool", "--type", "process"],
                       env=s.env, check=True, capture_output=True, timeout=120)
        # infra/prefect.yaml as is, but pulled from this checkout and run by a local process pool
        spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
        spec["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        for d in spec["deployments"]:
            d["work_pool"] = {"name": "test-pool"}
            for sch in d.get("schedules", []):
                sch["active"] = False
        f = root / "prefect.yaml"
        f.write_text(yaml.safe_dump(spec))
        r = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(f)],
                           env=s.env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        s.worker = start_worker(s)
        yield s
    finally:
        s.stop()


def start_worker(s, limit=None, **extra_env):
    # one torch thread per flow-run process: three models at once on a 2-core machine
    extra_env.setdefault("OMP_NUM_THREADS", "1")
    return s.start([str(BIN / "prefect"), "worker", "start", "--pool", "test-pool", "--type", "process",
                    *(["--limit", str(limit)] if limit else [])], "worker.log", {**s.env, **extra_env}, cwd=REPO)


RUNNER = textwrap.dedent("""
    import json, sys
    from prefect.deployments import run_deployment
    fr = run_deployment(name=sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=float(sys.argv[3]))
    print(json.dumps({"id": str(fr.id), "state": fr.state.type.value if fr.state else None}))
""")


def run_deployment(s, name, parameters, timeout=900):
    return subprocess.Popen([sys.executable, "-c", RUNNER, name, json.dumps(parameters), str(timeout)],
                            env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def small_config(root, name, experiment, settings=("W16A16", "W4A16", "W8A8", "W6A16"), max_windows=4):
    cfg = {"name": name, "experiment": experiment, "models": [str(MODELS / "tiny-opt")], "settings": list(settings),
           "datasets": [{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": max_windows}],
           "eval": {"seqlen": 128, "batch_size": 8}, "hardware": {"device": "cpu"}}
    f = root / f"{name}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def finished_unique(url, experiment, n):
    fin = mlflow_runs(url, experiment, f"{EVAL} and attributes.status = 'FINISHED'")
    assert len(fin) == n, [params(r).get("setting") for r in fin]
    assert len({tags(r)["run_key"] for r in fin}) == n
    return fin


def test_deployments_registered_with_schedule(srv):
    r = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=srv.env, capture_output=True, text=True, timeout=120)
    for name in ("quantlens-model/gpu", "quantlens-sweep/nightly", "quantlens-sweep/on-demand"):
        assert name in r.stdout
    r = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "quantlens-sweep/nightly"], env=srv.env,
                       capture_output=True, text=True, timeout=120)
    assert "0 2 * * *" in r.stdout


def demo_subset(root) -> str:
    """configs/demo.yaml with one setting of each kind and less data: the same models, analysis and
    calibration, every kind of step through the worker, in a fraction of the demo's time (the full
    demo's time is measured in the README)."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    keep = {"W16A16", "W8A8", "W4A16-nf4", "W3A16", "W16A16KV4", "W3A16-g32-gptq"}
    cfg["settings"] = [s for s in cfg["settings"] if isinstance(s, str) and s in keep] + [s for s in cfg["settings"] if isinstance(s, dict)][:1]
    cfg["models"] = [str(MODELS / m) for m in ("tiny-opt", "tiny-bloom", "tiny-llama")]
    cfg["datasets"] = [{"name": "wikitext2", "path": str(WIKI_TEST), "max_windows": 48},
                       {"name": "lambada", "path": str(SHARED / "lambada" / "lambada_openai.jsonl"), "limit": 40}]
    f = root / "demo-subset.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return str(f)


def test_demo_through_worker_with_fan_out(srv):
    p = run_deployment(srv, "quantlens-sweep/on-demand", {"config": demo_subset(srv.root),
                       "dispatch": "quantlens-model/gpu", "results_dir": str(srv.root / "results")})
    out, err = p.communicate(timeout=1200)
    assert json.loads(out.strip().splitlines()[-1])["state"] == "COMPLETED", err[-3000:]
    fin = finished_unique(srv.mlflow_url, "quantlens-demo", 3 * 7)
    assert {params(r)["model"] for r in fin} == {"tiny-opt", "tiny-bloom", "tiny-llama"}
    opt = next(r for r in fin if params(r)["model"] == "tiny-opt" and params(r)["setting"] == "W16A16")
    metrics = {m["key"]: m["value"] for m in opt["data"]["metrics"]}
    assert 100 < metrics["wikitext2_ppl"] < 1000 and 0 <= metrics["lambada_acc"] <= 1
    # the three models ran as three flow runs of the model deployment
    body = {"flows": {"name": {"any_": ["quantlens-model"]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    req = urllib.request.Request(srv.prefect_url + "/flow_runs/count", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.load(r) == 3
    assert any(f.name == "fig1_wikitext2_ppl_vs_size.png" for f in (srv.root / "results").rglob("*.png"))
    # and all of it is in PostgreSQL: the runs in MLflow's database, the flow runs in Prefect's
    from postgres import scalar

    assert srv.stores["mlflow.db"].startswith("postgresql://") and srv.stores["prefect"].startswith("postgresql+asyncpg://")
    assert scalar(srv.stores["mlflow.db"], "SELECT count(*) FROM runs WHERE status = 'FINISHED'") >= 3 * 7
    assert scalar(srv.stores["prefect"], "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'") >= 4


def flow_run_parameters(s, flow_run_id: str) -> dict:
    with urllib.request.urlopen(f"{s.prefect_url}/flow_runs/{flow_run_id}", timeout=30) as r:
        return json.load(r)["parameters"]


def worker_running(s, workers, model_index: int, shard: int):
    """The worker whose flow-run process runs that model's shard (a flow-run process carries its id)."""
    import psutil

    for w in workers:
        for p in psutil.Process(w.pid).children(recursive=True):
            try:
                fid = p.environ().get("PREFECT__FLOW_RUN_ID")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if fid:
                par = flow_run_parameters(s, fid)
                if par.get("model_index") == model_index and par.get("shard") == shard:
                    return w
    return None


def model_flow_runs(s, op: str = "not_any_", states: list[str] | None = None) -> int:
    """quantlens-model flow runs on the server (``op`` over state types: any_ / not_any_)."""
    body = {"flows": {"name": {"any_": ["quantlens-model"]}}}
    if states is not None:
        body["flow_runs"] = {"state": {"type": {op: states}}}
    req = urllib.request.Request(s.prefect_url + "/flow_runs/count", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def wait_until(what, check, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"never: {what}")


def test_four_workers_then_a_worker_killed_and_mlflow_restarted_mid_sweep(srv, monkeypatch):
    """Load and faults on the PostgreSQL-backed servers: 2 models × 2 shards fanned out to 4 process
    workers of one pool at once. MLflow is restarted once mid-sweep; the worker evaluating
    tiny-llama/W8A8 is SIGKILLed mid-evaluation. Every other run FINISHES once; the rerun evaluates
    only W8A8; nothing that finished is lost or doubled; every per-example artifact reads back."""
    import pandas as pd

    settings = ("W16A16", "W4A16", "W8A8")  # shards: [W16A16, W4A16], [W16A16, W8A8] (the reference in each, evaluated once)
    cfg = yaml.safe_load(small_config(srv.root, "drill", "drill", settings=settings).read_text())
    models = ("tiny-opt", "tiny-llama")  # (a third model was a third pair of flow runs: time, no new path)
    cfg["models"] = [str(MODELS / m) for m in models]
    cfg["shards"] = 2
    f = srv.root / "drill.yaml"
    f.write_text(yaml.safe_dump(cfg))
    kill_tree(srv.worker)
    base = model_flow_runs(srv)  # (those of earlier tests on this server)
    # one flow run per worker at a time (a GPU node's job): killing one kills only what it runs
    workers = [start_worker(srv, limit=1, QUANTLENS_INJECT_FAULT="tiny-llama:W8A8:sleep") for _ in range(4)]
    t0 = time.monotonic()
    sweep = run_deployment(srv, "quantlens-sweep/on-demand", {"config": str(f), "aggregate": False})
    finished = lambda: mlflow_runs(srv.mlflow_url, "drill", f"{EVAL} and attributes.status = 'FINISHED'")  # noqa: E731
    wait_until("a first run FINISHED", lambda: len(finished()) >= 1)
    mlflow = next(p for p in srv.procs if "mlflow" in " ".join(map(str, p.args)) and str(srv.mlflow_port) in " ".join(map(str, p.args)))
    srv.procs.remove(mlflow)
    kill_tree(mlflow)  # the tracking server restarted once, mid-sweep, on the same address and database
    time.sleep(3)
    srv.start_mlflow()
    wait_until("tiny-llama/W8A8 RUNNING", lambda: any(
        params(r).get("setting") == "W8A8" and params(r).get("model") == "tiny-llama"
        for r in mlflow_runs(srv.mlflow_url, "drill", f"{EVAL} and attributes.status = 'RUNNING'")))
    busy = [w for w in workers if w.poll() is None and worker_running(srv, [w], models.index("tiny-llama"), 1)]
    assert len(busy) == 1, "no single worker holds tiny-llama's second shard"
    kill_tree(busy[0])  # SIGKILL: the worker and its flow-run process die mid-evaluation
    # every other model flow run ends (one starting while MLflow restarted waits for it); the killed
    # one stays RUNNING in Prefect, its MLflow run stale
    wait_until("the other model flow runs final", lambda: model_flow_runs(srv, "any_", ["RUNNING", "PENDING", "SCHEDULED"]) == 1
               and model_flow_runs(srv) == base + 2 * len(models), 900)
    first = time.monotonic() - t0
    before = {r["info"]["run_id"] for r in finished()}
    kill_tree(sweep)  # the sweep waits on the dead model flow run: stop it, and the workers
    for w in workers:
        kill_tree(w)
    srv.worker = start_worker(srv)
    p = run_deployment(srv, "quantlens-sweep/on-demand", {"config": str(f), "aggregate": False})
    out, err = p.communicate(timeout=900)
    assert json.loads(out.strip().splitlines()[-1])["state"] == "COMPLETED", err[-3000:]
    fin = finished_unique(srv.mlflow_url, "drill", len(models) * len(settings))  # nothing lost, nothing doubled
    assert sorted((params(r)["model"], params(r)["setting"]) for r in fin) == sorted((m, s) for m in models for s in settings)
    assert before <= {r["info"]["run_id"] for r in fin}
    redone = [r for r in fin if r["info"]["run_id"] not in before]
    assert [(params(r)["model"], params(r)["setting"]) for r in redone] == [("tiny-llama", "W8A8")]  # only what did not finish
    failed = mlflow_runs(srv.mlflow_url, "drill", f"{EVAL} and attributes.status = 'FAILED'", view="DELETED_ONLY")
    assert [params(r)["setting"] for r in failed] == ["W8A8"] and "stale" in tags(failed[0])["quantlens.failure"]
    from quantlens.tasks.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.mlflow_url)
    tracker = Tracker("drill")
    for r in fin:  # every per-example artifact reads back
        frames = tracker.read_frames(r["info"]["run_id"], "per_example")
        assert isinstance(frames.get("wikitext2"), pd.DataFrame) and len(frames["wikitext2"]) == 4
    print(f"drill: {len(fin)} runs over {2 * len(models)} model flow runs on 4 workers, first pass {first:.0f}s "
          f"(MLflow restarted once, a worker SIGKILLed), rerun redid {len(redone)}")


def test_mlflow_down_at_start_fails_fast_without_evaluating(srv):
    cfg = small_config(srv.root, "down", "down")
    url = f"http://127.0.0.1:{free_port()}"
    env = {**srv.env, "MLFLOW_TRACKING_URI": url, "QUANTLENS_MLFLOW_HEALTH_TIMEOUT": "3"}
    r = subprocess.run([str(BIN / "quantlens"), "run", str(cfg)], env=env, capture_output=True, text=True, timeout=300, cwd=srv.root)
    assert r.returncode == 5, r.stderr[-2000:]
    # the one-request health check answered (its message), not MLflow's client after minutes of retries
    # ("MLflow tracking store … is not reachable: …"), and before Prefect or any model
    assert f"quantlens: MLflow server {url!r} is not reachable (" in r.stderr and "nothing was evaluated" in r.stderr
    assert "MLflow tracking store" not in r.stderr and "Max retries" not in r.stderr
    assert "Loading weights" not in r.stderr and "Task run 'evaluate" not in r.stderr and "Traceback" not in r.stderr


def test_mlflow_briefly_down_mid_run_logging_retried(srv):
    port = free_port()
    mlf = srv.start_mlflow(port, db="flaky.db")
    cfg = small_config(srv.root, "flaky", "flaky", max_windows=96)
    env = {**srv.env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    sweep = subprocess.Popen([str(BIN / "quantlens"), "run", str(cfg), "--results", str(srv.root / "r")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=srv.root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if sweep.poll() is not None:
            pytest.fail("sweep ended before the outage: " + sweep.stderr.read()[-2000:])
        try:
            if mlflow_runs(url, "flaky", f"{EVAL} and attributes.status = 'FINISHED'"):
                break
        except OSError:
            pass
        time.sleep(0.5)
    kill_tree(mlf)  # the tracking server goes away mid-sweep ...
    time.sleep(4)
    srv.start_mlflow(port, db="flaky.db")  # ... and comes back on the same address and store
    out, err = sweep.communicate(timeout=900)
    assert sweep.returncode == 0, err[-3000:]
    finished_unique(url, "flaky", 4)


def test_two_sweeps_at_once_same_store(srv):
    cfg = small_config(srv.root, "twice", "twice", max_windows=32)
    procs = [subprocess.Popen([str(BIN / "quantlens"), "run", str(cfg), "--results", str(srv.root / f"r{i}")],
                              env=srv.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=srv.root)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    finished_unique(srv.mlflow_url, "twice", 4)
    evaluated = sum(int(o[0].split(" evaluated")[0].split()[-1]) for o in outs)
    assert evaluated == 4  # each key evaluated by exactly one of the two sweeps
    parents = mlflow_runs(srv.mlflow_url, "twice", "tags.`quantlens.kind` = 'sweep'")
    assert len(parents) == 1
