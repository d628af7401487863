"""GGUF files as released checkpoints of their base model (SmolLM2-135M-Instruct, shared): a file the
``gguf`` package writes — every block weight re-quantized to Q4_0 with gguf's own quantizer — reads back
as a checkpoint setting with exactly the perplexity of quantlens' own W4A16-q4_0 (the two quantizers agree
bit for bit); the model's own file, or a float export of it, read back as a checkpoint changes nothing; a type quantlens does not
know, or another model's file, is one line before anything is evaluated."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import SHARED

SMOL = SHARED / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "wikitext2" / "wiki.test.raw"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SMOL.is_file(), reason=f"no {SMOL}")]


def rewrite(src: Path, dst: Path, qtype: str, only: str = "blk.") -> Path:
    """``src`` written again by gguf's GGUFWriter, its tensors named ``only…`` (2-D, quantized in the
    file) dequantized and re-quantized to ``qtype`` by gguf's own quantizer; everything else as it was."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub)
    target = gguf.GGMLQuantizationType[qtype]
    for t in r.tensors:
        shape = [int(d) for d in reversed(t.shape)]  # numpy order: rows, then the row's values
        if t.name.startswith(only) and len(shape) == 2 and t.tensor_type not in (gguf.GGMLQuantizationType.F32,):
            x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            if qtype == "F32":  # a float export of the same weights
                w.add_tensor(t.name, x)
                continue
            w.add_tensor(t.name, gguf.quants.quantize(x, target), raw_dtype=target)  # (bytes per row: the writer reads the shape)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, np.asarray(t.data).reshape(shape))
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {"q4_0": rewrite(SMOL, d / "SmolLM2.Q4_0.gguf", "Q4_0"), "f32": rewrite(SMOL, d / "SmolLM2.F32.gguf", "F32"),
            "tq2_0": rewrite(SMOL, d / "SmolLM2.TQ2_0.gguf", "TQ2_0", only="blk.0.ffn_down")}


def _run(tmp_path: Path, settings: list, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cfg = {"name": "ggufck", "experiment": "ggufck", "models": [str(SMOL)], "settings": settings,
           "datasets": [{"name": "wikitext2", "path": str(WIKI), "max_windows": 4}],
           "eval": {"seqlen": 128, "batch_size": 4}, "hardware": {"device": "cpu"}}
    f = tmp_path / "ggufck.yaml"
    f.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", "run", str(f), "--results", str(tmp_path / "r")],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)


def test_a_gguf_file_reads_back_as_a_checkpoint_of_its_base(files, tmp_path):
    r = _run(tmp_path, ["W16A16", "W4A16-q4_0", {"name": "gguf-q4_0", "checkpoint": str(files["q4_0"])},
                        {"name": "own-file", "checkpoint": str(SMOL)}, {"name": "f32-export", "checkpoint": str(files["f32"])}])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        ppl = dict(db.execute("SELECT p.value, m.value FROM metrics m JOIN params p USING (run_uuid) "
                              "WHERE m.key = 'wikitext2_ppl' AND p.key = 'setting'"))
        params = dict(db.execute("SELECT p.key, p.value FROM params p JOIN params s USING (run_uuid) "
                                 "WHERE s.key = 'setting' AND s.value = 'gguf-q4_0'"))
        err = dict(db.execute("SELECT p.value, m.value FROM metrics m JOIN params p USING (run_uuid) "
                              "WHERE m.key = 'weight_rel_error_mean' AND p.key = 'setting'"))
    assert ppl["gguf-q4_0"] == ppl["W4A16-q4_0"] != ppl["W16A16"]  # gguf's Q4_0 and ours: bit for bit, so the same model
    assert err["gguf-q4_0"] == err["W4A16-q4_0"] > 0
    assert (params["checkpoint_method"], params["checkpoint_layout"], params["w_format"]) == ("gguf", "gguf-q4_0", "q4_0")
    assert params["checkpoint_quantized_layers"] == str(30 * 7) and params["checkpoint_changed_tensors"] == "0"
    assert ppl["own-file"] == ppl["W16A16"] and err["own-file"] == 0.0  # its own file changes nothing
    assert ppl["f32-export"] == ppl["W16A16"] and err["f32-export"] == 0.0  # nor a float export of its weights


def test_an_unknown_type_or_another_models_file_is_one_line_before_anything_runs(files, tmp_path):
    r = _run(tmp_path, ["W16A16", {"name": "tq", "checkpoint": str(files["tq2_0"])}])
    assert r.returncode != 0
    assert "GGUF type TQ2_0 is not one quantlens reads" in r.stderr, r.stderr[-3000:]
    assert "wikitext2_ppl=" not in r.stderr and "Traceback" not in r.stderr
