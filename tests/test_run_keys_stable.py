"""A store written by an earlier version is read with nothing re-evaluated: every shipped config's
sweep id, run keys and setting params equal those recorded in tests/data/run_keys.json (written by
scripts/golden_run_keys.py before the pipeline's redesign; regenerate only with EVAL_PROTOCOL bumped)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_keys_and_sweep_ids_unchanged():
    spec = importlib.util.spec_from_file_location("golden_run_keys", ROOT / "scripts/golden_run_keys.py")
    golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(golden)
    want = json.loads((ROOT / "tests/data/run_keys.json").read_text())
    got = golden.compute()
    assert sorted(got) == sorted(want)
    for config, w in want.items():
        assert got[config]["sweep_id"] == w["sweep_id"], config
        changed = [run for run, kp in w["runs"].items() if got[config]["runs"].get(run) != kp]
        assert not changed and len(got[config]["runs"]) == len(w["runs"]), (config, changed[:5])
