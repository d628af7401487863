"""MLflow: the one place quantlens talks to the tracking store.

Schema (stable; the README documents it): one parent run per sweep (tag ``quantlens.kind=sweep``),
one child run per (model, setting) (tag ``quantlens.kind=eval``) with

- params: model, family, size_b, setting, base, w_bits, a_bits, w_granularity, a_granularity,
  w_group_size, symmetric, transform, transform_p, clip_k, perturbation, seed, revision, seqlen, datasets,
  format (the family: int, cuberoot, nf, fp, mxfp, mxint, nvfp, km) and per part ``w_/a_/kv_format``
  (int4, nf4, fp4-e2m1, mxfp4-e2m1, nvfp4, km3, …) and ``w_/a_/kv_scale`` (fp32, fp16, e8m0, e4m3+tensor)
- metrics: ``<dataset>_ppl`` / ``lambada_acc`` / ``lambada_nll``, perturbation statistics
  (weight_/activation_ delta_l2_mean, rel_error_mean, clipped_fraction, weight_alpha_mean), the lens
  ``weight_/activation_lens_d01`` … ``d10`` (mean |Δ|/|x| by decile of |x|),
  eval_seconds, tokens_per_s
- tags: sweep_id, run_key, git_commit, device, attempt
- artifact: ``layer_stats.csv`` (per-layer ‖Δ‖₂, relative error, α, clipped fraction)

With nothing configured the store is SQLite at ``mlruns/mlflow.db`` with artifacts under
``mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` points it at a server instead.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import pandas as pd

from quantlens.pipeline.errors import TrackingUnavailable

T = TypeVar("T")

KIND_TAG = "quantlens.kind"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI to choose the experiment's view
MODEL_TRAINING = "custom_model_development"
HEARTBEAT_TAG = "quantlens.heartbeat"
STALE = "stale:"
STALE_WHY = f"{STALE} its attempt stopped (no heartbeat)"


def sweep_tag(sweep_id: str) -> str:
    """Tag on every eval run a sweep created or reused: its grid, even across sweeps."""
    return f"quantlens.sweep.{sweep_id}"  # (a stored name: it stays as runs in existing stores carry it)


def heartbeat_interval() -> float:
    """Seconds between heartbeats of a RUNNING eval run; 4 missed beats make it stale (dead)."""
    return float(os.environ.get("QUANTLENS_HEARTBEAT_S", "30"))
RETRYABLE_ATTEMPTS = int(os.environ.get("QUANTLENS_MLFLOW_RETRIES", "6"))


def default_tracking_uri(root: str | Path = ".") -> str:
    return f"sqlite:///{(Path(root) / 'mlruns' / 'mlflow.db').resolve()}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "SERVICE_UNDER_MAINTENANCE"}
_TRANSIENT_TEXT = ("database is locked", "Max retries exceeded", "Connection refused", "Connection reset",
                   "Read timed out", "Bad Gateway", "Service Unavailable", "Gateway Timeout")
_HTTP_5XX = re.compile(r"(status|HTTP|code)\D{0,12}5\d\d", re.I)


def is_transient(err: BaseException) -> bool:
    """Errors a retry can fix: network, 5xx, lock contention. Anything else (a bad argument, a
    missing run, a TypeError) is permanent and raised at once."""
    if isinstance(err, (ConnectionError, TimeoutError)) or (isinstance(err, OSError) and not isinstance(err, FileNotFoundError)):
        return True  # requests' exceptions are OSErrors too
    if getattr(err, "error_code", None) in _TRANSIENT_CODES:
        return True
    text = str(err)
    return any(t in text for t in _TRANSIENT_TEXT) or bool(_HTTP_5XX.search(text))


def _retry(fn: Callable[[], T], what: str, also: tuple[str, ...] = ()) -> T:
    """Retry a tracking call with backoff when the error is transient (a server briefly down must
    not lose a finished result), or its message holds one of ``also`` (races a retry resolves);
    permanent errors are raised at once."""
    delay = 0.5
    for attempt in range(RETRYABLE_ATTEMPTS):
        try:
            return fn()
        except Exception as err:  # mlflow raises MlflowException / requests errors
            if attempt == RETRYABLE_ATTEMPTS - 1 or not (is_transient(err) or any(a in str(err) for a in also)):
                raise
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


def _check_server(uri: str, experiment: str, wait: float = 0.0) -> None:
    """Fail fast (seconds, not MLflow's minutes of HTTP retries) when the server is down, unhealthy,
    refuses our credentials, or would not let us write to the experiment: one request. ``wait`` > 0:
    a server that cannot be reached is asked again for that many seconds (one being restarted)
    before failing; refused credentials fail at once."""
    from quantlens.pipeline.credentials import check_mlflow
    from quantlens.pipeline.errors import TrackingUnavailable

    deadline = time.monotonic() + wait
    while True:
        try:
            return check_mlflow(uri, experiment, timeout=float(os.environ.get("QUANTLENS_MLFLOW_HEALTH_TIMEOUT", "10")))
        except TrackingUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2.0)


def _user_tag() -> dict[str, str]:
    """The UI's User column: the account a server authenticated us as, else the local user."""
    import getpass

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
    return {"mlflow.user": user}


class Tracker:
    def __init__(self, experiment: str, uri: str | None = None, wait: float = 0.0):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        # until when this process last found the server silent (a call slower than a heartbeat: down,
        # restarting): heartbeats others could not write meanwhile do not make their runs stale
        self.silent_until = 0.0
        if self.uri.startswith(("http://", "https://")):
            t0 = time.time()
            _check_server(self.uri, experiment, wait)
            self.note_latency(t0)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment = experiment
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                artifacts = None
                if self.uri.startswith("sqlite:///"):
                    artifacts = (Path(self.uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
                try:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
                except Exception:  # created concurrently by another sweep
                    self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            else:
                self.experiment_id = exp.experiment_id
            if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
                # the UI then opens the experiment on its runs ("Model training"), not on GenAI traces
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        except Exception as err:
            raise TrackingUnavailable(f"MLflow tracking store {self.uri!r} is not reachable: {err}") from None

    def note_latency(self, t0: float) -> None:
        if time.time() - t0 > heartbeat_interval():
            self.silent_until = time.time()

    def _call(self, fn: Callable[[], T], what: str, also: tuple[str, ...] = ()) -> T:
        """:func:`_retry`, noting when the server was silent (MLflow's client retries hide the errors)."""
        t0 = time.time()
        try:
            return _retry(fn, what, also)
        finally:
            self.note_latency(t0)

    # --- sweeps --------------------------------------------------------------------------------
    def parent_run(self, sweep_id: str, name: str, params: dict[str, Any]) -> str:
        """The sweep's parent run: reused by reruns of the same sweep so children accumulate."""
        found = self._search(f"tags.sweep_id = '{sweep_id}' and tags.`{KIND_TAG}` = 'sweep'")
        if found:
            run_id = found[0].info.run_id
            self._call(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen parent")
            return run_id
        run = self._call(
            lambda: self.client.create_run(
                self.experiment_id, run_name=name, tags={"sweep_id": sweep_id, KIND_TAG: "sweep", **_user_tag()}
            ),
            "create parent",
        )
        # Two attempts of one sweep started at once both create a parent: the earliest wins. A run
        # created first may land second, after the other looked and saw only itself: so the one that
        # won looks again once its params are logged, and yields if an earlier one has appeared.
        owner = self._earliest_parent(sweep_id)
        if owner == run.info.run_id:
            self.log(run.info.run_id, params=params)
            owner = self._earliest_parent(sweep_id)
        if owner != run.info.run_id:
            self.discard(run.info.run_id)
        return owner

    def _earliest_parent(self, sweep_id: str) -> str:
        found = self._search(f"tags.sweep_id = '{sweep_id}' and tags.`{KIND_TAG}` = 'sweep'")
        return min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id

    def _runs_with_keys(self, keys: list[str], status: str, narrow: str | None) -> list[Any]:
        """Eval runs of a status whose run_key is in ``keys`` (MLflow filters have no IN for tags:
        narrow server-side, e.g. by revision, and match the keys here)."""
        wanted = set(keys)
        flt = f"tags.`{KIND_TAG}` = 'eval' and attributes.status = '{status}'"
        if narrow:
            flt += f" and {narrow}"
        return [r for r in self._search(flt) if r.data.tags.get("run_key") in wanted]

    def finished_keys(self, keys: list[str], narrow: str | None = None) -> dict[str, str]:
        """run_key → run_id of FINISHED eval runs among ``keys``."""
        out: dict[str, str] = {}
        for r in self._runs_with_keys(keys, "FINISHED", narrow):
            out.setdefault(r.data.tags["run_key"], r.info.run_id)
        return out

    def is_stale(self, run: Any) -> bool:
        """A run whose attempt stopped beating: killed, crashed or cut off — 4 beats missed while
        the server was answering (beats missed while it was silent to us say nothing)."""
        beat = float(run.data.tags.get(HEARTBEAT_TAG, run.info.start_time / 1000))
        return time.time() - max(beat, self.silent_until) > 4 * heartbeat_interval()

    def is_live(self, run: Any) -> bool:
        """RUNNING and beating — or marked FAILED as stale by another attempt while it was in fact
        alive (its beats did not reach the server, which was down): it still beats."""
        st = run.info.status
        if st == "FAILED" and not str(run.data.tags.get("quantlens.failure", "")).startswith(STALE):
            return False
        return st in ("RUNNING", "FAILED") and not self.is_stale(run)

    def fail_stale(self, keys: list[str], attempt: str, narrow: str | None = None) -> int:
        """Runs of these keys left RUNNING by a dead attempt (stale heartbeat) → FAILED."""
        n = 0
        for r in self._runs_with_keys(keys, "RUNNING", narrow):
            if r.data.tags.get("attempt") == attempt or not self.is_stale(r):
                continue
            self.mark_failed(r.info.run_id, STALE_WHY)
            n += 1
        return n

    def mark_failed(self, run_id: str, why: str) -> None:
        self._call(lambda: self.client.set_tag(run_id, "quantlens.failure", why), "tag")
        self._call(lambda: self.client.set_terminated(run_id, status="FAILED"), "fail")

    def claim(self, key: str, run_id: str, force: bool = False) -> tuple[str, str] | None:
        """Optimistic lock on a run key, for sweeps running at once against one store.

        Call after creating ``run_id`` (RUNNING), and again before finishing it. Among live runs of
        the key, a FINISHED one wins, else the earliest (start time, run id). Returns None when
        ``run_id`` owns the key, else (status, run id) of the owner. Two claimants that race both
        see both and agree — at the latest when they finish: a run created with an earlier start
        time may become visible only after a later one claimed (the client sets the start time),
        so the claim at the start is optimistic and the one at the finish decides.
        ``force``: FINISHED runs do not count (the user asked to redo them).
        """
        others = self._search(f"tags.run_key = '{key}' and tags.`{KIND_TAG}` = 'eval'")
        live = []
        for r in others:
            st = r.info.status
            if (st == "FINISHED" and not force) or r.info.run_id == run_id or self.is_live(r):
                live.append(r)
        finished = [r for r in live if r.info.status == "FINISHED"]
        if finished:
            return ("FINISHED", finished[0].info.run_id)
        owner = min(live, key=lambda r: (r.info.start_time, r.info.run_id))
        return None if owner.info.run_id == run_id else ("RUNNING", owner.info.run_id)

    def analysis_plan(self, cfg: Any, keys: dict[str, str], narrow: str | None, force: bool = False) -> list[tuple[Any, str, str, list[str]]]:
        """Mechanism analyses still to do for one model: (setting, its run, the W16A16 run, datasets)
        for every ``cfg.analysis.mechanisms`` setting whose evaluation FINISHED (``keys``: setting
        name → run key). An analysis is done when its run holds ``mechanisms/<dataset>/patching.csv``."""
        if not cfg.analysis.mechanisms:
            return []
        settings = {s.name: s for s in cfg.expanded_settings()}
        ref = next(s for s in settings.values() if s.is_reference)
        finished = self.finished_keys(list(keys.values()), narrow)
        ref_run = finished.get(keys[ref.name])
        plan = []
        for name in cfg.analysis.mechanisms:
            if name not in keys:
                continue  # not a setting of this model (its `settings` leave it out)
            run = finished.get(keys[name])
            if run is None or ref_run is None:
                continue  # its evaluation failed: reported there
            todo = [d for d in cfg.analysis_datasets()
                    if force or not any(a.path.endswith("patching.csv") for a in self.list_artifacts(run, f"mechanisms/{d}"))]
            if todo:
                plan.append((settings[name], run, ref_run, todo))
        return plan

    def run_status(self, run_id: str) -> tuple[str, bool]:
        """(status, live) of a run (:meth:`is_live`); a deleted run reads as ("DELETED", False)."""
        r = self._call(lambda: self.client.get_run(run_id), "get run")
        if r.info.lifecycle_stage == "deleted":
            return "DELETED", False
        return r.info.status, self.is_live(r)

    def discard(self, run_id: str) -> None:
        """Delete a run that lost a claim: it never evaluated anything."""
        self._call(lambda: self.client.delete_run(run_id), "delete")

    def heartbeat(self, run_id: str) -> "Heartbeat":
        return Heartbeat(self, run_id)

    # --- eval runs ------------------------------------------------------------------------------
    def start_eval(self, parent_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self._call(
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={"mlflow.parentRunId": parent_id, KIND_TAG: "eval", HEARTBEAT_TAG: f"{time.time():.3f}", **_user_tag(), **tags},
            ),
            "create eval run",
        )
        self.log(run.info.run_id, params=params)
        return run.info.run_id

    def log(self, run_id: str, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ps = [Param(k, str(v)) for k, v in (params or {}).items()]
        ms = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ps), len(ms), len(ts), 1), 100):
            self._call(
                lambda: self.client.log_batch(run_id, metrics=ms[i : i + 100], params=ps[i : i + 100], tags=ts[i : i + 100]),
                "log",
            )

    def log_rows(self, run_id: str, rows: list[dict[str, Any]], name: str) -> None:
        if not rows:
            return
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / name
            with open(f, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            self._call(lambda: self.client.log_artifact(run_id, str(f)), "artifact")

    def log_frames(self, run_id: str, frames: dict[str, Any]) -> None:
        """DataFrames as artifacts, keyed by artifact path: ``.parquet`` (``per_example/wikitext2.parquet``)
        or ``.csv`` (``mechanisms/wikitext2/patching.csv``); ``.pt``: a dict of tensors."""
        with tempfile.TemporaryDirectory() as d:
            for rel, frame in frames.items():
                f = Path(d) / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                if f.suffix == ".pt":  # tensors (the reference's top-k of the KL error)
                    import torch

                    torch.save(frame, f)
                elif f.suffix == ".csv":
                    frame.to_csv(f, index=False)
                else:
                    frame.to_parquet(f, index=False)
                folder = str(Path(rel).parent) if Path(rel).parent != Path(".") else None
                self._call(lambda: self.client.log_artifact(run_id, str(f), folder), "artifact")

    def read_frames(self, run_id: str, folder: str) -> dict[str, pd.DataFrame]:
        """Every parquet / csv artifact directly under ``folder`` of a run: {file stem: DataFrame}; {} when none."""
        import mlflow.artifacts

        names = [a.path for a in self.list_artifacts(run_id, folder) if a.path.endswith((".parquet", ".csv"))]
        out = {}
        with tempfile.TemporaryDirectory() as d:
            for name in names:
                local = self._call(lambda: mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=d, tracking_uri=self.uri), "download")
                out[Path(name).stem] = pd.read_csv(local) if name.endswith(".csv") else pd.read_parquet(local)
        return out

    def read_tensors(self, run_id: str, name: str) -> dict[str, Any] | None:
        """A ``.pt`` artifact of a run (torch.load), None when the run has none."""
        import mlflow.artifacts
        import torch

        folder = str(Path(name).parent)
        if name not in {a.path for a in self.list_artifacts(run_id, folder)}:
            return None
        with tempfile.TemporaryDirectory() as d:
            local = self._call(lambda: mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=d, tracking_uri=self.uri), "download")
            return torch.load(local)

    def read_tables(self, artifact_uri: str, folders: list[str]) -> dict[str, dict[str, pd.DataFrame]]:
        """The parquet / csv tables of one run under ``folders`` (and one level of sub-folders, e.g.
        ``mechanisms/<dataset>``), read straight from its artifact store: {folder: {file stem: frame}}.
        One listing of the run's root and one per folder present, no run lookups — what a report
        reading hundreds of runs needs (:meth:`read_frames` reads one folder of one run by id)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(artifact_uri)
        present = {a.path for a in self._call(lambda: repo.list_artifacts(), "list") if a.is_dir}
        todo = [(f, True) for f in folders if f in present]
        out: dict[str, dict[str, pd.DataFrame]] = {}
        with tempfile.TemporaryDirectory() as d:
            while todo:
                folder, top = todo.pop()
                for a in self._call(lambda: repo.list_artifacts(folder), "list"):
                    if a.is_dir:
                        if top:
                            todo.append((a.path, False))
                    elif a.path.endswith((".parquet", ".csv")):
                        local = self._call(lambda: repo.download_artifacts(a.path, d), "download")
                        out.setdefault(folder, {})[Path(a.path).stem] = pd.read_csv(local) if a.path.endswith(".csv") else pd.read_parquet(local)
        return out

    def artifact_uri(self, run_id: str) -> str:
        return self._call(lambda: self.client.get_run(run_id), "get run").info.artifact_uri

    def list_artifacts(self, run_id: str, folder: str) -> list[Any]:
        return self._call(lambda: self.client.list_artifacts(run_id, folder), "list")

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self._call(lambda: self.client.log_text(run_id, text, name), "artifact")

    def log_files(self, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
        for f in files:
            self._call(lambda: self.client.log_artifact(run_id, str(f), artifact_path), "artifact")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run; a FINISHED one drops a "stale" failure another attempt gave it while it was alive."""
        tags = self._call(lambda: self.client.get_run(run_id), "get run").data.tags if status == "FINISHED" else {}
        if str(tags.get("quantlens.failure", "")).startswith(STALE):
            self._call(lambda: self.client.delete_tag(run_id, "quantlens.failure"), "untag")
        self._call(lambda: self.client.set_terminated(run_id, status=status), "terminate")

    def withdraw(self, run_id: str, owner: str) -> None:
        """A run that evaluated a key another run owns (both claimed it in a race, or this one was
        judged dead while the server was down): KILLED and deleted, pointing at the owner."""
        self._call(lambda: self.client.set_tag(run_id, "quantlens.superseded_by", owner), "tag")
        self._call(lambda: self.client.set_terminated(run_id, status="KILLED"), "terminate")
        self.discard(run_id)

    # --- reading --------------------------------------------------------------------------------
    def _search(self, filter_string: str) -> list[Any]:
        out, token = [], None
        while True:
            page = self._call(
                lambda: self.client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token),
                "search",
            )
            out.extend(page)
            token = page.token
            if not token:
                return out

    def runs_frame(self, sweep_id: str | None = None, finished_only: bool = True) -> pd.DataFrame:
        """Eval runs as a DataFrame (columns params.*, metrics.*, tags.*): all of the experiment,
        or one sweep's grid (the runs it created or reused); the newest run of each key."""
        import mlflow

        flt = f"tags.`{KIND_TAG}` = 'eval'"
        if finished_only:
            flt += " and attributes.status = 'FINISHED'"
        if sweep_id:
            flt += f" and tags.`{sweep_tag(sweep_id)}` = '1'"
        df = self._call(lambda: mlflow.search_runs([self.experiment_id], filter_string=flt, max_results=100000), "search")
        if finished_only and not df.empty and "tags.run_key" in df:
            df = df.sort_values("end_time").drop_duplicates("tags.run_key", keep="last")
        return df

    def sweep_runs(self, sweep_id: str, status: str) -> list[Any]:
        """Eval runs in a sweep's grid (created or reused by it) with that status."""
        return self._search(f"tags.`{sweep_tag(sweep_id)}` = '1' and tags.`{KIND_TAG}` = 'eval' and attributes.status = '{status}'")

    def describe_sweep(self, parent: str, config: dict[str, Any], description: str, commit: str) -> None:
        """The parent run holds the resolved sweep config (artifact ``sweep_config.yaml``), a
        description (the UI's Description box) and MLflow's standard source tags."""
        import yaml

        self.log(parent, tags={"git_commit": commit, "mlflow.note.content": description,
                               "mlflow.source.git.commit": commit.removesuffix("-dirty"), "mlflow.source.name": "quantlens",
                               "mlflow.source.type": "JOB"})
        self.log_text(parent, yaml.safe_dump(config, sort_keys=False), "sweep_config.yaml")

    def log_inputs(self, run_id: str, datasets: list[dict[str, Any]]) -> None:
        """Datasets as MLflow dataset inputs (the UI's Dataset column and filter): each a dict with
        name, digest, source_type, source, profile (JSON text) and schema."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                                       schema=d.get("schema"), profile=d.get("profile")),
                               tags=[InputTag("mlflow.data.context", "evaluation")]) for d in datasets]
        # Runs evaluating the same dataset at the same moment (models fanned out to workers) race in
        # the server's get-or-create of the dataset row: the loser's retry finds it (SQLite / PostgreSQL).
        self._call(lambda: self.client.log_inputs(run_id, datasets=inputs), "inputs",
               also=("UNIQUE constraint failed: datasets", "duplicate key value violates unique constraint"))

    def attempt_runs(self, attempt: str) -> list[Any]:
        """Eval runs an attempt created (not the reused ones), whatever their status."""
        return self._search(f"tags.attempt = '{attempt}' and tags.`{KIND_TAG}` = 'eval'")

    def status_counts(self, sweep_id: str) -> dict[str, int]:
        runs = self._search(f"tags.sweep_id = '{sweep_id}' and tags.`{KIND_TAG}` = 'eval'")
        counts: dict[str, int] = {}
        for r in runs:
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
        return counts


class Heartbeat:
    """Context manager: a daemon thread re-tags the run every interval while it evaluates, so
    other attempts can tell a live run from one whose process died."""

    def __init__(self, tracker: Tracker, run_id: str):
        import threading

        self.tracker, self.run_id = tracker, run_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(heartbeat_interval()):
            t0 = time.time()
            try:
                self.tracker.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
            except Exception:  # a missed beat is retried at the next interval
                pass
            self.tracker.note_latency(t0)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
