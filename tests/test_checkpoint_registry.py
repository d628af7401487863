"""Checkpoint layouts are a registry (quantlens.checkpoints.layouts): one module per layout, found
without being named; a checkpoint's quantization_config picks its reader; an unknown method is
refused in one line naming what quantlens reads; a new layout is one new module."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from quantlens.checkpoints import layouts as L
from quantlens.checkpoints import released as R
from quantlens.errors import ConfigError


def test_every_shipped_layout_is_registered_in_order():
    assert list(L.layouts()) == ["gptq", "awq", "compressed-tensors", "bitsandbytes", "gguf"]
    assert L.reads().startswith("GPTQ (v1/v2), AWQ (GEMM), compressed-tensors")


@pytest.mark.parametrize("q, method, layout", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 32, "desc_act": True}, "gptq", "gptq-v1"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}, "gptq", "gptq-v2"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}, "awq", "awq-gemm"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bnb", "bnb-nf4"),
])
def test_the_quantization_config_picks_the_reader(tmp_path, q, method, layout):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": q}))
    r = R.describe(tmp_path)
    assert (r.method, r.layout) == (method, layout)


def test_a_librarys_own_file_stands_for_quantization_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 64, "version": "GEMM"}))
    assert (R.describe(tmp_path).method, R.describe(tmp_path).group_size) == ("awq", 64)


def test_an_unknown_method_is_one_line_naming_what_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "hqq"}}))
    with pytest.raises(ConfigError) as err:
        R.describe(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "'hqq' is not one quantlens reads" in msg
    assert all(lay.reads in msg for lay in L.layouts().values())


def test_a_new_layout_is_one_new_module(tmp_path, monkeypatch):
    """A module dropped into the package (here: on its path, from a temporary folder) is found and reads."""
    (tmp_path / "toy_layout.py").write_text(textwrap.dedent('''
        from quantlens.checkpoints.layouts import Layout

        LAYOUT = Layout("toy", "toy (test)", lambda q, what: dict(method="toy", layout="toy-v1", bits=int(q["bits"]),
                        group_size=None, symmetric=True, act_order=False),
                        lambda keys, r: {}, lambda prefix, parts, r: None, lambda prefix, shapes, load, r: None)
    '''))
    import quantlens.checkpoints as pkg

    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    L.layouts.cache_clear()
    try:
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "toy", "bits": 2}}))
        r = R.describe(tmp_path)
        assert (r.method, r.layout, r.bits) == ("toy", "toy-v1", 2)
        assert "toy (test)" in L.reads()
    finally:
        monkeypatch.undo()
        L.layouts.cache_clear()
        sys.modules.pop("quantlens.checkpoints.toy_layout", None)
    assert "toy" not in L.layouts()
