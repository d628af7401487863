"""The prepared GPU check runs end to end in its --smoke mode (tiny shapes, CPU)."""

import json
import subprocess
import sys

from conftest import REPO


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and [x["shape"] for x in data["results"]] == ["tiny-opt", "tiny-llama"]
    first = data["results"][0]
    for s in ("W16A16", "W4A16", "W8A8", "W8A8-nu"):
        assert first[s]["tokens_per_s"] > 0 and first[s]["x_w16a16"] > 0
    assert first["W16A16"]["x_w16a16"] == 1.0 and first["stream_x_single"] > 0
    assert "tok/s W16A16" in r.stdout and "tiny-llama" in r.stdout
