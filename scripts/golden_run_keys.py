"""Write tests/data/run_keys.json: every shipped config's sweep id, run keys and (a digest of) each run's setting params, as
today's code computes them (revision fixed to "rev0"). tests/test_run_keys_stable.py checks that a
refactor leaves them unchanged: a store written before it is read with nothing re-evaluated."""

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# A local file's identity is where it lies (a model path is resolved against its config's folder) and,
# for a checkpoint folder, its files' times, which differ in every checkout: the golden places the
# shared data at one fixed (absent) path and names the demo's released checkpoint by a hub id.
PORTABLE_ENV = {"QUANTLENS_SHARED_DATA": "/quantlens-golden/shared/data",
                "QUANTLENS_DEMO_CHECKPOINT": "quantlens-golden/tiny-llama-gptq-w3g32", "HF_HUB_OFFLINE": "1"}


def compute() -> dict:
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, PORTABLE_ENV):
        return _compute()


def _compute() -> dict:
    from quantlens.pipeline.sweep import load_config, run_key, sweep_id

    out = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        keys = {}
        for m in cfg.models:
            for s in cfg.settings_for(m):
                params = json.dumps({k: str(v) for k, v in s.flat_params().items()}, sort_keys=True)
                keys[f"{m.label()}|{s.name}"] = [run_key("rev0", m.ref, s, cfg), hashlib.sha256(params.encode()).hexdigest()[:12]]
        out[path.name] = {"sweep_id": sweep_id(cfg), "runs": keys}
    return out


if __name__ == "__main__":
    data = compute()
    (ROOT / "tests/data/run_keys.json").write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    print(sum(len(v["runs"]) for v in data.values()), "runs of", len(data), "configs", file=sys.stderr)
