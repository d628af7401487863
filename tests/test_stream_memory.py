"""placement: stream holds one block, not the model: peak host memory of a sweep on 4 vs 16 layers.

bench/bench_stream_memory.py --quick, asserted: going from 4 to 16 layers adds less than two
blocks of host memory with ``stream`` (the checkpoint is read block by block), where a model held in
memory adds about two copies of the 12 extra blocks (originals and quantized weights) — which is
also what shows the measurement can see a growth. Transfers: each block once per setting layer-wise,
once per batch with per-batch streaming.
"""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_stream_memory as bench  # noqa: E402

pytestmark = pytest.mark.slow


def test_stream_sweep_memory_does_not_grow_with_layers(tmp_path):
    res = bench.run(hidden=512, vocab=2048, windows=8, batch=4, root=tmp_path)
    block = res["block_bytes"]
    print(bench.report(res))
    assert res["growth_stream"] < 2 * block, bench.report(res)
    assert res["growth_in-memory"] > 12 * block, bench.report(res)  # ≈ 24 blocks: the measurement sees growth
    for layers, modes in res["layers"].items():
        for st in bench.SETTINGS:
            assert modes["stream"]["moved"][st] == layers * block  # each block once per (setting, dataset)
            assert modes["in-memory"]["moved"][st] == layers * block * 2  # once per batch (8 windows / 4)
        ppl = modes["stream"]["ppl"]
        assert ppl["W16A16"] != ppl["W4A16"]  # the settings were applied to the streamed weights
