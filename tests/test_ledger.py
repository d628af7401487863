"""The run ledger's claims on a real (SQLite) MLflow store, without Prefect: the races that a cluster
(several workers, a tracking server restarted) produces, played step by step."""

import time

import pytest

HEARTBEAT_S = 1.0  # a run is stale after 4 missed beats: 4 s (wide: a loaded CI machine stalls between two calls)


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("QUANTLENS_HEARTBEAT_S", str(HEARTBEAT_S))
    from quantlens.tasks.ledger import RunLedger
    from quantlens.tasks.tracking import Tracker

    t = Tracker("ledger")
    return RunLedger(t, "sweep", "attempt-a")


def _acquire(ledger, key="k"):
    return ledger.acquire(key, "parent", "W4A16 · m", {"setting": "W4A16"}, {})


def _created_earlier(ledger, key, before_run, attempt="attempt-b"):
    """A claimant whose client set its start time before ``before_run``'s but whose run reached the
    store after ``before_run`` had claimed (the request was slow): it sees both, and it is the earlier."""
    from quantlens.tasks.ledger import Lease
    from quantlens.tasks.tracking import HEARTBEAT_TAG, KIND_TAG

    t = ledger.tracker
    start = t.client.get_run(before_run).info.start_time - 1000
    run = t.client.create_run(t.experiment_id, start_time=start, tags={
        KIND_TAG: "eval", HEARTBEAT_TAG: f"{time.time():.3f}", "run_key": key, "attempt": attempt})
    assert t.claim(key, run.info.run_id) is None  # the earliest live run: it owns the key too
    return Lease(ledger, key, run.info.run_id)


def _finished(ledger, key="k"):
    return [r.info.run_id for r in ledger.tracker._search(f"tags.run_key = '{key}' and attributes.status = 'FINISHED'")]


def test_a_claim_race_is_settled_when_the_later_claimant_finishes_first(ledger):
    b = _acquire(ledger)
    assert b.state == "lease"  # it saw only its own run
    a = _created_earlier(ledger, "k", b.run_id)
    ended = b.lease.finish()  # the claim again at the finish: a owns the key, b is withdrawn
    assert (ended.state, ended.run_id) == ("busy", a.run_id)
    gone = ledger.tracker.client.get_run(b.run_id)
    assert gone.info.status == "KILLED" and gone.info.lifecycle_stage == "deleted"
    assert gone.data.tags["quantlens.superseded_by"] == a.run_id
    assert a.finish().state == "lease"
    assert _finished(ledger) == [a.run_id]


def test_a_claim_race_is_settled_when_the_owner_finishes_first(ledger):
    b = _acquire(ledger)
    a = _created_earlier(ledger, "k", b.run_id)
    assert a.finish().state == "lease"
    ended = b.lease.finish()
    assert (ended.state, ended.run_id) == ("done", a.run_id)
    assert _finished(ledger) == [a.run_id]


def test_an_owner_judged_dead_while_the_server_was_down_keeps_its_key(ledger):
    """The tracking server restarts: the owner's beats cannot land, a waiting attempt reads them as
    stopped and marks the run FAILED. The owner was alive: its next beat makes it live again, the
    key is not taken over, and it finishes as the one FINISHED run (the "stale" failure dropped)."""
    from quantlens.tasks.tracking import HEARTBEAT_TAG

    owner = _acquire(ledger)
    t = ledger.tracker
    t.client.set_tag(owner.run_id, HEARTBEAT_TAG, f"{time.time() - 10:.3f}")  # beats lost in the outage
    assert ledger.wait(owner.run_id) == "dead"  # the observer, which did not see the outage, gives up on it
    assert t.client.get_run(owner.run_id).info.status == "FAILED"
    t.client.set_tag(owner.run_id, HEARTBEAT_TAG, f"{time.time():.3f}")  # the server is back: it beats
    assert ledger.wait(owner.run_id) == "busy"
    other = _acquire(ledger)
    assert (other.state, other.run_id) == ("busy", owner.run_id)  # no takeover of a beating run
    assert owner.lease.finish().state == "lease"
    run = t.client.get_run(owner.run_id)
    assert run.info.status == "FINISHED" and "quantlens.failure" not in run.data.tags
    assert _finished(ledger) == [owner.run_id]


def test_a_takeover_of_a_live_owner_is_withdrawn_at_its_finish(ledger):
    """Taken over in the outage (the taker's claim saw no live run), the owner beats again: whoever
    finishes first, one run is FINISHED — the owner's, the earlier."""
    from quantlens.tasks.tracking import HEARTBEAT_TAG

    owner = _acquire(ledger)
    t = ledger.tracker
    t.client.set_tag(owner.run_id, HEARTBEAT_TAG, f"{time.time() - 10:.3f}")
    taker = _acquire(ledger)
    assert taker.state == "lease"  # the owner looked dead
    t.client.set_tag(owner.run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
    ended = taker.lease.finish()
    assert (ended.state, ended.run_id) == ("busy", owner.run_id)
    assert owner.lease.finish().state == "lease"
    assert _finished(ledger) == [owner.run_id]


def test_beats_missed_while_the_server_was_silent_do_not_make_a_run_stale(ledger):
    from quantlens.tasks.tracking import HEARTBEAT_TAG

    owner = _acquire(ledger)
    t = ledger.tracker
    t.client.set_tag(owner.run_id, HEARTBEAT_TAG, f"{time.time() - 10:.3f}")
    t.note_latency(time.time() - 5)  # a call of ours just took 5 s: the server was silent meanwhile
    assert ledger.wait(owner.run_id) == "busy"
    time.sleep(5 * HEARTBEAT_S)  # then 4 beats missed while it answered us
    assert ledger.wait(owner.run_id) == "dead"


def test_a_forced_redo_is_not_withdrawn_for_the_run_it_redoes(ledger):
    first = _acquire(ledger)
    first.lease.finish()
    ledger.force = True
    again = _acquire(ledger)
    assert again.state == "lease" and again.lease.finish().state == "lease"
    assert sorted(_finished(ledger)) == sorted([first.run_id, again.run_id])
