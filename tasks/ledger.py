"""The run ledger: one object owns the identity and the lifecycle of every (model, setting) run.

Identity: a run key (:func:`quantlens.pipeline.sweep.run_key`: model revision, setting, datasets, eval
options, code version). Lifecycle, on the MLflow store (so it works across processes, workers and
machines):

- :meth:`RunLedger.plan` — the grid with each run's key and state (``done`` / ``todo`` /
  ``running`` elsewhere / ``failed`` last time); the CLI's ``--dry-run``, its "nothing to do" fast
  path and the model flow all read it;
- :meth:`RunLedger.acquire` — ``done`` (a FINISHED run exists: reuse it), ``busy`` (a live attempt
  holds the key: wait for it) or a :class:`Lease` (this attempt evaluates it; the lease beats a
  heartbeat so others can tell a live run from a dead one);
- :meth:`Lease.finish` / :meth:`Lease.fail` — terminal states; a failed run keeps its traceback as
  the artifact ``failure.log``, and once the key has a FINISHED run the superseded FAILED runs are
  soft-deleted (out of the MLflow UI's default view, restorable from its "Deleted" filter).

Concurrency (two sweeps, or a rerun beside a live worker) is an optimistic claim: among live runs of
a key the FINISHED one, else the earliest, owns it. Prefect's own concurrency slots would serialise
*evaluations*, not decide who owns a key across sweeps, and its result caching cannot see runs made
by other sweeps or by hand — so the ledger stays on MLflow, the store users already read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from quantlens.pipeline.sweep_plan import SweepPlan
from quantlens.tasks.tracking import KIND_TAG, STALE_WHY, Heartbeat, Tracker, heartbeat_interval, sweep_tag

State = Literal["done", "todo", "running", "failed"]


@dataclass(frozen=True)
class PlannedRun:
    model: str
    ref: str
    setting: str
    key: str | None  # None: the model's revision is known only after download (hub, not cached)
    state: State
    run_id: str | None = None


@dataclass
class Lease:
    """This attempt owns ``key`` and evaluates it in ``run_id``."""

    ledger: "RunLedger"
    key: str
    run_id: str
    _beat: Heartbeat | None = None

    def __enter__(self) -> "Lease":
        self._beat = self.ledger.tracker.heartbeat(self.run_id).__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._beat is not None:
            self._beat.__exit__(*exc)

    def finish(self) -> "Acquired":
        """FINISHED, if this run still owns the key — else (another claimant raced it, or judged it
        dead while the server was down and took the key over) withdrawn: ``done`` with the run that
        finished the key, or ``busy`` with the live run that owns it."""
        owner = self.ledger.tracker.claim(self.key, self.run_id, self.ledger.force)
        if owner is not None:
            self.ledger.tracker.withdraw(self.run_id, owner[1])
            return Acquired("done" if owner[0] == "FINISHED" else "busy", owner[1])
        self.ledger.tracker.finish(self.run_id, "FINISHED")
        self.ledger.hide_superseded(self.key, self.run_id)
        return Acquired("lease", self.run_id, self)

    def fail(self, why: str, log_text: str | None = None) -> None:
        if log_text:
            self.ledger.tracker.log_text(self.run_id, log_text, "failure.log")
        self.ledger.tracker.mark_failed(self.run_id, why[:4000])


@dataclass(frozen=True)
class Acquired:
    state: Literal["done", "busy", "lease"]
    run_id: str
    lease: Lease | None = None


class RunLedger:
    def __init__(self, tracker: Tracker, sweep_id: str, attempt: str, force: bool = False):
        self.tracker, self.sweep_id, self.attempt, self.force = tracker, sweep_id, attempt, force

    # --- identity ---------------------------------------------------------------------------------
    @staticmethod
    def narrow(revision: str) -> str:
        return f"params.revision = '{revision}'"

    # --- planning ---------------------------------------------------------------------------------
    def plan(self, plan: SweepPlan) -> list[PlannedRun]:
        """The whole grid's state without downloading anything: revisions of local folders and of
        cached hub snapshots are known (the plan holds them), others are ``todo`` with no key yet."""
        out: list[PlannedRun] = []
        for mp in plan.models:
            name = mp.entry.info().name
            if mp.revision is None:
                out += [PlannedRun(name, mp.ref, s.name, None, "todo") for s in mp.settings]
                continue
            keys = mp.keys(plan.config, mp.revision)
            states = self.states(list(keys.values()), mp.revision)
            for s in mp.settings:
                state, run_id = states.get(keys[s.name], ("todo", None))
                out.append(PlannedRun(name, mp.ref, s.name, keys[s.name], state, run_id))
        return out

    def states(self, keys: list[str], revision: str | None = None) -> dict[str, tuple[State, str]]:
        """key → (state, run id) of the keys that have runs: FINISHED wins, then a live RUNNING
        run, then FAILED (a RUNNING run whose heartbeat stopped counts as failed)."""
        wanted = set(keys)
        flt = f"tags.`{KIND_TAG}` = 'eval'" + (f" and {self.narrow(revision)}" if revision else "")
        rank = {"done": 0, "running": 1, "failed": 2}
        out: dict[str, tuple[State, str]] = {}
        for r in self.tracker._search(flt):
            key = r.data.tags.get("run_key")
            if key not in wanted:
                continue
            st = r.info.status
            state: State = "done" if st == "FINISHED" else "running" if st == "RUNNING" and not self.tracker.is_stale(r) else "failed"
            if self.force and state == "done":
                state = "todo"
            if key not in out or rank.get(state, 3) < rank.get(out[key][0], 3):
                out[key] = (state, r.info.run_id)
        return out

    def open_keys(self, keys: dict[str, str], revision: str) -> tuple[dict[str, str], int]:
        """For one model: (setting → run id of keys already FINISHED, now counted in this sweep's
        grid; number of dead runs of earlier attempts marked FAILED)."""
        narrow = self.narrow(revision)
        done = {} if self.force else self.tracker.finished_keys(list(keys.values()), narrow)
        reaped = self.tracker.fail_stale(list(keys.values()), self.attempt, narrow)
        reused = {}
        for setting, key in keys.items():
            if key in done:
                self.tracker.log(done[key], tags={sweep_tag(self.sweep_id): "1"})
                reused[setting] = done[key]
        return reused, reaped

    # --- lifecycle --------------------------------------------------------------------------------
    def acquire(self, key: str, parent_run_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Acquired:
        """Create this attempt's run for ``key`` and claim the key."""
        run_id = self.tracker.start_eval(
            parent_run_id, run_name, params,
            {"sweep_id": self.sweep_id, sweep_tag(self.sweep_id): "1", "run_key": key, "attempt": self.attempt, **tags},
        )
        owner = self.tracker.claim(key, run_id, self.force)
        if owner is None:
            return Acquired("lease", run_id, Lease(self, key, run_id))
        self.tracker.discard(run_id)
        if owner[0] == "FINISHED":
            self.tracker.log(owner[1], tags={sweep_tag(self.sweep_id): "1"})
            return Acquired("done", owner[1])
        return Acquired("busy", owner[1])

    def wait(self, owner_run_id: str) -> Literal["done", "busy", "dead"]:
        """State of a key held by another attempt: finished, still live, or dead (failed, deleted
        or silent for 4 heartbeats — then marked FAILED and free to take over)."""
        status, live = self.tracker.run_status(owner_run_id)
        if status == "FINISHED":
            self.tracker.log(owner_run_id, tags={sweep_tag(self.sweep_id): "1"})
            return "done"
        if live:
            return "busy"
        if status == "RUNNING":
            self.tracker.mark_failed(owner_run_id, STALE_WHY)
        return "dead"

    @staticmethod
    def poll_interval() -> float:
        return min(5.0, heartbeat_interval())

    def hide_superseded(self, key: str, finished_run_id: str) -> None:
        """FAILED runs of a key that now has a FINISHED run leave the UI's default view (soft delete)."""
        for r in self.tracker._search(f"tags.run_key = '{key}' and tags.`{KIND_TAG}` = 'eval' and attributes.status = 'FAILED'"):
            if r.info.run_id != finished_run_id:
                self.tracker.client.set_tag(r.info.run_id, "quantlens.superseded_by", finished_run_id)
                self.tracker.discard(r.info.run_id)

