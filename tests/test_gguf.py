"""A real pretrained model read from its GGUF file (SmolLM2-135M-Instruct, llama.cpp's Q4_1): the header
read without dequantizing, one conversion into a cached safetensors folder equal to transformers' own
GGUF load, W16A16 equal to Hugging Face's own loss, a quantized setting end to end through the CLI, and
a cut or foreign file refused in one line before anything runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, SHARED

SMOL_DIR = SHARED / "models" / "smollm2-135m"
SMOL = SMOL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # shared/data/models/smollm2-135m/README.md
WIKI = SHARED / "wikitext2" / "wiki.test.raw"

pytestmark = pytest.mark.skipif(not SMOL.is_file(), reason=f"no {SMOL}")


@pytest.fixture(scope="module")
def converted():
    """The file converted once (conftest's QUANTLENS_GGUF_CACHE is shared by every test of the session)."""
    from quantlens.model.loading import download, resolve_model

    info = resolve_model(str(SMOL))
    return info, download(info)


@pytest.fixture(scope="module")
def reference():
    """transformers' own load of the GGUF file (model, tokenizer): the independent side of the checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(SMOL_DIR), gguf_file=SMOL.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(SMOL_DIR), gguf_file=SMOL.name)


def test_header_is_read_without_dequantizing(monkeypatch):
    from quantlens.model import gguf

    monkeypatch.setattr("gguf.dequantize", lambda *a, **k: pytest.fail("the header read dequantized a tensor"))
    h = gguf.read_header(SMOL)
    assert h.sha256 == SHA256 and h.architecture == "llama"
    assert h.tensors == 272 and h.quant_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert h.params == 134_515_008
    assert h.quant_summary() == "Q4_1×210, F32×61, Q8_0×1"


def test_converted_once_equal_to_transformers_own_gguf_load(converted, reference, monkeypatch):
    from safetensors.torch import load_file

    from quantlens.model import gguf
    from quantlens.model.loading import download, local_revision, resolve_model

    info, snap = converted
    assert info.name == "SmolLM2-135M-Instruct.Q4_1" and info.family == "llama"
    assert snap.revision == local_revision(info) == "gguf-" + SHA256[:12]
    assert Path(snap.path).parent == gguf.cache_root()
    cfg = json.loads((Path(snap.path) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and "quantization_config" not in cfg
    mine = load_file(str(Path(snap.path) / gguf.WEIGHTS_FILE))
    theirs = reference[0].state_dict()
    assert set(mine) == set(theirs) - {"lm_head.weight"}  # tied to the embeddings
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # a second sweep reads no GGUF: resolving and downloading again touch neither the file's tensors nor transformers' GGUF reader
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("converted again"))
    monkeypatch.setattr("gguf.GGUFReader", lambda *a, **k: pytest.fail("the GGUF file was read again"))
    again = download(resolve_model(str(SMOL_DIR), gguf_file=SMOL.name))
    assert again == snap


def test_w16a16_equals_hugging_face_own_loss(converted, reference):
    """quantlens' perplexity of the model loaded from the converted folder = exp of the mean of the
    loss transformers computes for each window, with the model transformers loads from the GGUF."""
    from quantlens.evaluation.evaluate import evaluate_dataset
    from quantlens.model.loading import load_model

    _, snap = converted
    model, tok = load_model(snap, device="cpu", dtype="float32")
    got = evaluate_dataset(model, tok, "wikitext2", seqlen=256, max_windows=4, batch_size=4, path=str(WIKI))
    ref, ref_tok = reference
    ids = ref_tok(WIKI.read_text(), return_tensors="pt").input_ids[0]
    with torch.no_grad():
        losses = [ref(ids[i * 256:(i + 1) * 256][None], labels=ids[i * 256:(i + 1) * 256][None]).loss.item() for i in range(4)]
    ppl = math.exp(sum(losses) / 4)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert 30 < ppl < 60  # a real model: 38.6 on the first 16 windows (the model's README)


def _cli(*args, env, cwd):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=full, timeout=600)


def _config(tmp_path, model, **extra) -> Path:
    cfg = {"name": "smol", "experiment": "smol", "models": [model], "settings": ["W16A16", "W4A16-g32"],
           "datasets": [{"name": "wikitext2", "path": str(WIKI), "max_windows": 4}],
           "eval": {"seqlen": 128, "batch_size": 4}, "hardware": {"device": "cpu"}, **extra}
    f = tmp_path / "smol.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def test_quantized_setting_end_to_end_through_the_cli(converted, tmp_path):
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "QUANTLENS_CACHE": str(tmp_path / "cache")}
    cfg = _config(tmp_path, {"ref": str(SMOL_DIR), "gguf_file": SMOL.name})
    r = _cli("run", str(cfg), "--results", str(tmp_path / "results"), env=store, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SmolLM2-135M-Instruct.Q4_1/W4A16-g32: wikitext2_ppl=" in r.stderr, r.stderr
    with closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        params = dict(db.execute("SELECT r.name || '|' || p.key, p.value FROM params p JOIN runs r USING (run_uuid) "
                                 "WHERE p.key LIKE 'gguf%' OR p.key IN ('revision', 'setting')"))
        ppl = dict(db.execute("SELECT p.value, m.value FROM metrics m JOIN params p USING (run_uuid) "
                              "WHERE m.key = 'wikitext2_ppl' AND p.key = 'setting'"))
    named = {k.split("|")[1]: v for k, v in params.items() if "W4A16-g32" in k}
    assert named["gguf_file"] == SMOL.name and named["gguf_quant_types"] == "Q4_1×210, F32×61, Q8_0×1"
    assert named["gguf_sha256"] == SHA256 and named["revision"] == "gguf-" + SHA256[:12]
    assert set(ppl) == {"W16A16", "W4A16-g32"} and ppl["W4A16-g32"] > 1.1 * ppl["W16A16"] > 30
    again = _cli("run", str(cfg), env=store, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to evaluate" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("cut", ["header", "tensors", "magic"])
def test_a_cut_or_foreign_file_is_one_line_before_anything_runs(tmp_path, cut):
    bad = tmp_path / f"cut-{cut}.gguf"
    with open(SMOL, "rb") as src, open(bad, "wb") as dst:
        if cut == "magic":
            dst.write(b"\x00" * 64)
        else:
            dst.write(src.read(1_000_000 if cut == "header" else 20_000_000))
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "QUANTLENS_CACHE": str(tmp_path / "cache")}
    r = _cli("run", str(_config(tmp_path, str(bad))), env=store, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    said = {"header": "not a readable GGUF file (truncated or corrupt", "tensors": "not a readable GGUF file (truncated or corrupt",
            "magic": "not a GGUF file"}[cut]
    assert said in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing opened


def test_an_architecture_transformers_cannot_load_is_one_line(tmp_path):
    import gguf as gg

    from quantlens.model import gguf
    from quantlens.quantize.settings import ConfigError

    f = tmp_path / "odd.gguf"
    w = gg.GGUFWriter(str(f), "no-such-arch")
    w.add_tensor("blk.0.w", torch.zeros(4, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"GGUF architecture 'no-such-arch' is not one transformers' GGUF loader reads"):
        gguf.read_header(f)
    assert not gguf.folder_for(f).exists()


def test_stream_reads_the_converted_folder_as_single_does(converted):
    """placement: stream reads each block from the converted safetensors: the same numbers as the model
    loaded whole (the embedding is stored under its own name, the tied head with it)."""
    from quantlens.evaluation.evaluate import evaluate_dataset
    from quantlens.model.loading import load_model
    from quantlens.quantize.patch import quantize_

    _, snap = converted
    got = {}
    for placement in ("single", "stream"):
        model, tok = load_model(snap, device="cpu", dtype="float32", placement=placement)
        quantize_(model, "W4A16-g32")
        got[placement] = evaluate_dataset(model, tok, "wikitext2", seqlen=128, max_windows=2, batch_size=2, path=str(WIKI))["ppl"]
    assert got["stream"] == got["single"]


def test_each_step_parses_the_file_once_and_leaves_the_gguf_package_as_it_was(tmp_path, monkeypatch):
    """transformers' loader makes a reader (parsing the whole vocabulary) for the config, the tokenizer
    and the weights: inside a step quantlens shares one, so staging parses the file once (the header,
    the config, the tokenizer and the weights' llama.cpp types) and converting once more."""
    import gguf as gg

    from quantlens.model import gguf

    made = []

    class Counted(gg.GGUFReader):
        def __init__(self, path, mode="r"):
            made.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gg, "GGUFReader", Counted)
    monkeypatch.setenv("QUANTLENS_GGUF_CACHE", str(tmp_path / "gguf"))
    folder, _ = gguf.stage(SMOL)
    assert len(made) == 1 and (folder / gguf.TYPES_FILE).is_file()
    assert gguf.tensor_types(folder)["model.layers.0.self_attn.q_proj.weight"][0] == "Q4_1"
    gguf.convert(SMOL)
    assert len(made) == 2 and gguf.has_weights(folder)
    assert gg.GGUFReader is Counted and not hasattr(gg.get_tensor_name_map, "cache_info")  # restored after each step
    with pytest.raises(RuntimeError), gguf.read_once():
        raise RuntimeError("a step that fails")
    assert gg.GGUFReader is Counted  # restored on failure too
