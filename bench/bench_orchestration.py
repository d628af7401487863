"""Per-run orchestration overhead of a sweep (Prefect tasks + MLflow logging), on tiny-opt.

    python bench/bench_orchestration.py [--runs 12]

Runs a real sweep (Prefect ephemeral server, SQLite MLflow store in a temp dir) whose evaluation
is one 128-token window, so nearly all of each run's wall time is orchestration. Prints, per run,
wall_seconds − eval_seconds (patching, Prefect task runs, MLflow calls), and the one-time costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = Path(os.environ.get("QUANTLENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="quantlens-bench-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    os.environ.setdefault("PREFECT_HOME", f"{tmp}/prefect")
    from quantlens.flows.sweep import sweep_flow
    from quantlens.tasks.tracking import Tracker

    settings = [f"W{b}A16" for b in range(2, 16)] + [f"W{b}A8" for b in range(2, 16)]
    cfg = {
        "name": "bench-orchestration",
        "experiment": "bench",
        "models": [str(SHARED / "models" / "tiny-opt")],
        "settings": settings[: args.runs],
        "datasets": [{"name": "wikitext2", "path": str(SHARED / "wikitext2" / "test.txt"), "max_windows": 1}],
        "eval": {"seqlen": 128, "batch_size": 1},
        "hardware": {"device": "cpu"},
    }
    t = time.perf_counter()
    sweep_flow(cfg, aggregate=False)
    total = time.perf_counter() - t
    df = Tracker("bench").runs_frame()
    over = (df["metrics.wall_seconds"] - df["metrics.eval_seconds"]).tolist()
    runs_wall = df["metrics.wall_seconds"].sum()
    print(f"{len(df)} runs in {total:.1f}s total; one-time (server start, download, model load): {total - runs_wall:.1f}s")
    print(f"per-run overhead (wall − eval): median {statistics.median(over):.3f}s, max {max(over):.3f}s, "
          f"mean eval {df['metrics.eval_seconds'].mean():.3f}s")


if __name__ == "__main__":
    main()
