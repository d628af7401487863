"""The sweep's plan (memory, placement, time per model) and the preflight checks that need it."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantlens.model import footprint as F
from quantlens.pipeline import plan as P
from quantlens.pipeline.errors import PreflightError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUANTLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
MODELS = DATA / "models"
WIKI = DATA / "wikitext2" / "wiki.test.raw"
TRAINED = ["tiny-opt", "tiny-bloom", "tiny-llama"]

# Parameter counts of the published checkpoints (model.num_parameters() of each).
PUBLISHED = {
    "opt-350m": 331_196_416, "opt-1.3b": 1_315_758_080, "bloom-560m": 559_214_592, "bloom-7b1": 7_069_016_064,
    "llama-7b": 6_738_415_616, "qwen2.5-7b": 7_615_616_512, "llama-3-8b": 8_030_261_248,
    "mistral-nemo-12b": 12_247_782_400, "llama-3-70b": 70_553_706_496,
    # the Pythia paper's totals (Biderman et al. 2023, table 1)
    "pythia-70m": 70_426_624, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016, "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808, "pythia-2.8b": 2_775_208_960, "pythia-6.9b": 6_857_302_016, "pythia-12b": 11_846_072_320,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registry_dimensions_give_the_published_parameter_counts(name):
    assert P.shape_from_config(P.REGISTRY_CONFIGS[name]).params == PUBLISHED[name]


def test_every_registry_model_can_be_planned():
    from quantlens.model.loading import registry

    assert set(registry()) == set(P.REGISTRY_CONFIGS)
    for name, info in registry().items():
        assert P.shape_from_config(P.REGISTRY_CONFIGS[name]).params / 1e9 == pytest.approx(info.size_b, rel=0.06), name


@pytest.mark.parametrize("name", TRAINED)
def test_checkpoint_headers_config_and_loaded_model_agree(name):
    from quantlens.model.loading import load_model

    folder = MODELS / name
    header = P.shape_from_checkpoint(folder)
    computed = P.shape_from_config(json.loads((folder / "config.json").read_text()))
    model, _ = load_model(str(folder), device="cpu", placement="single")
    assert header.params == computed.params == model.num_parameters()
    assert header.block_params == computed.block_params
    assert header.largest_linear == computed.largest_linear
    for tensor, n_in in header.linears.items():  # every block linear's input features, from the header alone
        module = model.get_submodule(tensor.removesuffix(".weight")) if not tensor.startswith(("model.", "transformer.")) \
            else model.base_model.get_submodule(tensor.split(".", 1)[1].removesuffix(".weight"))
        assert module.in_features == n_in, tensor


MEASURE = r"""
import json, os, sys, threading, torch
from quantlens.evaluation.evaluate import perplexity
from quantlens.model.footprint import _forward_bytes, shape_from_checkpoint
from quantlens.model.loading import load_model
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
path, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, _ = load_model(path, device="cpu", dtype="float32", placement="single")
ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
perplexity(model, ids[:1], batch_size=1)  # allocator warm, weights touched
base, peak, stop = rss(), [0], threading.Event()
def watch():  # the RSS during the forward, sampled: an earlier peak of the process does not hide it
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        stop.wait(0.0005)
t = threading.Thread(target=watch); t.start()
perplexity(model, ids, batch_size=B)
stop.set(); t.join()
print(json.dumps({"measured": peak[0] - base, "estimated": B * _forward_bytes(shape_from_checkpoint(path), T, 4, False)}))
"""


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-bloom"])
def test_forward_memory_estimate_matches_the_measured_peak_on_cpu(name):
    """A batch of 64 × 128 tokens: the process' peak RSS grows by what the plan says, within 20 %."""
    # glibc's mmap threshold fixed: every large tensor is its own mapping, returned when freed, so RSS
    # follows the live tensors (a dynamic threshold keeps freed chunks in the heap or not, ±30 % here)
    r = subprocess.run([sys.executable, "-c", MEASURE, str(MODELS / name), "64", "128"], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["estimated"] > 300e6  # the logits dominate: the comparison is not lost in allocator noise
    assert 0.75 < got["measured"] / got["estimated"] < 1.25, got


def _work(**kw):
    base = dict(seqlen=2048, tokens=1.3e6, examples=268, settings=4)
    base.update(kw)
    return P.Workload(**base)


def _plan(name, target, **kw):
    return P.estimate(name, P.shape_from_config(P.REGISTRY_CONFIGS[name], "registry"), target, _work(**kw))


def test_auto_placement_follows_the_memory_estimate():
    one80 = P.planned_target(gpu_memory=80)
    assert _plan("opt-1.3b", one80).placement == "single"
    e = _plan("opt-66b", one80)
    assert e.placement == "stream" and not e.fits["single"] and e.fits["stream"]
    assert e.peak_gib["stream"] < 80 * F.USABLE
    assert _plan("opt-66b", P.planned_target(gpu_memory=80, gpus=2)).placement == "device_map"
    assert _plan("llama-65b", P.planned_target("B200")).placement == "single"  # 131 GB on a 180 GiB GPU
    # the batch the plan assumes is the evaluation's own choice for the memory left
    assert e.batch["single"] == 1 and _plan("opt-1.3b", one80).batch["single"] == F.auto_batch(
        (80 * F.USABLE - F.CONTEXT_GIB) * F.GIB - P.shape_from_config(P.REGISTRY_CONFIGS["opt-1.3b"]).params * 2, 2048, 50272, 2048)


def test_a_single_placement_that_cannot_fit_says_what_to_use():
    e = _plan("opt-66b", P.planned_target(gpu_memory=80), placement="single")
    msg = P.placement_error(e)
    assert msg.startswith("model opt-66b: placement: single needs ≈ 1") and "use placement: stream" in msg
    assert P.placement_error(_plan("opt-66b", P.planned_target(gpu_memory=80, gpus=2), placement="single")).endswith(
        "use placement: device_map or stream")
    assert P.placement_error(_plan("opt-1.3b", P.planned_target(gpu_memory=80), placement="single")) is None
    assert P.placement_error(_plan("opt-1.3b", P.planned_target(gpu_memory=80), placement="device_map")) is None  # 1 GPU: as single
    assert "use placement: stream" in P.placement_error(_plan("opt-66b", P.planned_target(gpu_memory=80), placement="device_map"))


def test_time_is_two_flops_per_parameter_and_token_at_the_stated_share():
    t = P.planned_target("H100")
    e = _plan("llama-7b", t, tokens=1e6)
    assert e.seconds_per_setting == pytest.approx(2 * 6_738_415_616 * 1e6 / (989e12 * F.DEFAULT_MFU))
    assert e.seconds == pytest.approx(4 * e.seconds_per_setting)
    s = _plan("opt-66b", t, tokens=1e6, placement="stream")  # stream also reads every weight once per setting
    assert s.seconds_per_setting == pytest.approx(2 * s.shape.params * 1e6 / (989e12 * F.DEFAULT_MFU) + s.shape.params * 2 / 2e9)


def test_gpu_check_calibration_is_used_for_that_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLENS_CACHE", str(tmp_path))
    assert P.planned_target("H100").mfu == F.DEFAULT_MFU
    F.record_calibration("NVIDIA H100 80GB HBM3", 0.52)
    t = P.planned_target("H100")
    assert t.mfu == 0.52 and t.calibrated and "measured by bench/gpu_check.py" in t.describe()
    assert not P.planned_target("A100-40GB").calibrated and P.planned_target("A100-40GB").memory_gib == 40


def test_unknown_gpu_name_is_a_config_error():
    from quantlens.quantize.settings import ConfigError

    with pytest.raises(ConfigError, match="unknown GPU 'K80'"):
        P.planned_target("K80")


def test_disk_check_names_the_cache_and_sizes(tmp_path, monkeypatch):
    from quantlens.pipeline import preflight as pf

    monkeypatch.setattr(pf, "hf_cache_dir", lambda: tmp_path / "hub")
    pf.check_disk(1e6)
    with pytest.raises(PreflightError, match=r"downloads need ≈ 1000000\.0 GB in .*hub and .* GB are free"):
        pf.check_disk(1e15)


def test_text_check(tmp_path):
    from quantlens.pipeline.preflight import check_text

    (tmp_path / "ok.txt").write_text("héllo\n" * 10)
    check_text(tmp_path / "ok.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(PreflightError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        check_text(tmp_path / "latin1.txt")
    (tmp_path / "x.parquet").write_text("nope")
    with pytest.raises(PreflightError, match="not a parquet file"):
        check_text(tmp_path / "x.parquet")


# --- The command line -----------------------------------------------------------------------------
def cli(*args, env=None, timeout=120):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "quantlens.pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=full, timeout=timeout)


@pytest.fixture
def store(tmp_path):
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "QUANTLENS_CACHE": str(tmp_path / "cache")}


def write(tmp_path, **cfg):
    base = {"name": "plan", "experiment": "plan", "models": [str(MODELS / "tiny-opt")], "settings": ["W16A16", "W4A16"],
            "datasets": [{"name": "wikitext2", "path": str(WIKI), "max_windows": 4}],
            "eval": {"seqlen": 128, "batch_size": 4}, "hardware": {"device": "cpu"}}
    base.update(cfg)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(base))
    return f


def one_line(r):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def store_file(store) -> Path:
    """The test store's database: the CLI opens the tracking store only after preflight, so a
    preflight answer leaves none (nothing started: no Prefect, no model loaded, no run)."""
    return Path(store["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_line(tmp_path, store):
    line = one_line(cli("run", str(write(tmp_path, hardware={"device": "cuda"})), env=store))
    assert "hardware.device: 'cuda', but CUDA is not available here" in line and "CUDA_VISIBLE_DEVICES" in line
    assert not store_file(store).exists()


def test_not_a_device_is_a_config_error(tmp_path, store):
    line = one_line(cli("run", str(write(tmp_path, hardware={"device": "tpu9"})), env=store))
    assert "hardware.device" in line and "'tpu9' is not a device" in line


def test_group_size_that_does_not_divide_a_linear_is_one_line(tmp_path, store):
    line = one_line(cli("run", str(write(tmp_path, settings=["W16A16", "W4A16-g7"])), env=store))
    assert not store_file(store).exists()  # shapes from the safetensors headers: no model loaded, nothing started
    assert re.fullmatch(r"quantlens: setting W4A16-g7: weights group size 7 does not divide the 128 input features of "
                        r"model\.decoder\.layers\.0\.[a-z_.0-9]+\.weight \(model .*tiny-opt\); "
                        r"group sizes that divide every linear: 16, 32, 64, 128", line), line


def test_a_format_block_that_does_not_fit_is_one_line_naming_setting_layer_and_shape(tmp_path, store):
    line = one_line(cli("run", str(write(tmp_path, settings=["W16A16", "W4A16-nf4", "W4A16-g256-nf4"])), env=store))
    assert not store_file(store).exists()
    assert re.match(r"quantlens: setting W4A16-g256-nf4: weights group size 256 does not divide the 128 input features of "
                    r"model\.decoder\.layers\.0\.", line), line
    kv = {"name": "kv4-nvfp-b24", "kv": {"bits": 4, "format": "fp", "scale": "e4m3", "group_size": 24}}
    line = one_line(cli("run", str(write(tmp_path, settings=["W16A16", "W16A16KV4-nvfp4", kv])), env=store))
    assert line.startswith("quantlens: setting kv4-nvfp-b24: kv group size 24 does not divide the head_dim 32 of the attention heads"), line
    line = one_line(cli("run", str(write(tmp_path, settings=["W16A16", "W5A16-fp"])), env=store))
    assert "W5A16-fp" in line and "no FP format has 5 bits" in line, line


def test_binary_dataset_file_is_one_line(tmp_path, store):
    blob = tmp_path / "wiki.bin"
    blob.write_bytes(bytes(range(256)) * 64)
    line = one_line(cli("run", str(write(tmp_path, datasets=[{"name": "wikitext2", "path": str(blob)}])), env=store))
    assert line.startswith(f"quantlens: dataset wikitext2: {blob} is not text (a NUL byte at offset 0)")
    assert not store_file(store).exists()


def test_window_longer_than_the_model_positions_is_one_line(tmp_path, store):
    """tiny-opt has 2,048 positions: a longer window is refused in preflight, not cut down or run."""
    tiny = MODELS / "tiny-opt"
    line = one_line(cli("run", str(write(tmp_path, eval={"seqlen": 10_000_000, "batch_size": 4})), env=store))
    assert line == (f"quantlens: dataset wikitext2: seqlen 10000000 (eval.seqlen) is longer than model {tiny} can take "
                    "(its max_position_embeddings is 2048): use a seqlen of at most 2048")
    assert not store_file(store).exists()  # before the store, Prefect or any model load
    one = [{"name": "wikitext2", "path": str(WIKI), "max_windows": 4, "seqlen": 4096}]
    line = one_line(cli("run", str(write(tmp_path, datasets=one)), env=store))
    assert line.startswith("quantlens: dataset wikitext2: seqlen 4096 is longer than model") and "is 2048" in line
    docs = [{"name": "wikitext2", "path": str(WIKI), "max_windows": 4, "examples": "documents", "example_len": 2048}]
    line = one_line(cli("run", str(write(tmp_path, datasets=docs)), env=store))
    assert line == (f"quantlens: dataset wikitext2: example_len 2048 + BOS is longer than model {tiny} can take "
                    "(its max_position_embeddings is 2048): use an example_len of at most 2047")
    r = cli("run", str(write(tmp_path, eval={"seqlen": 2048, "batch_size": 4})), "--dry-run", env=store)
    assert r.returncode == 0 and "2 to run" in r.stdout, r.stderr  # as long as the positions: fine


def test_window_longer_than_the_whole_text_is_one_line(tmp_path, store):
    """A text with fewer bytes than one window has tokens makes no window: refused in preflight."""
    short = tmp_path / "short.raw"
    short.write_bytes(WIKI.read_bytes()[:100])
    line = one_line(cli("run", str(write(tmp_path, datasets=[{"name": "wikitext2", "path": str(short)}])), env=store))
    assert line == (f"quantlens: dataset wikitext2: seqlen 128 (eval.seqlen) is longer than its whole text: {short} has "
                    "100 bytes, so fewer than 128 tokens and no window; use a smaller seqlen or a longer text")
    assert not store_file(store).exists()
    r = cli("run", str(write(tmp_path, datasets=[{"name": "wikitext2", "path": str(short)}], eval={"seqlen": 64})),
            "--dry-run", env=store)
    assert r.returncode == 0, r.stderr  # 100 bytes may hold a 64-token window: the tokenizer decides


def test_planning_flags_need_a_dry_run_and_a_gpu(tmp_path, store):
    cfg = str(write(tmp_path))
    assert "use them with --dry-run" in one_line(cli("run", cfg, "--gpu-memory", "80", env=store))
    assert "--gpus: say which GPU" in one_line(cli("run", cfg, "--dry-run", "--gpus", "2", env=store))
    many = str(write(tmp_path, models=[{"ref": str(MODELS / "tiny-opt"), "gpus": 4}]))
    assert "gpus: 4, but the planned node has 2 GPU(s)" in one_line(cli("run", many, "--dry-run", "--gpu", "H100", "--gpus", "2", env=store))


def test_dry_run_plans_the_trained_model_on_this_machine(tmp_path, store):
    r = cli("run", str(write(tmp_path)), "--dry-run", env=store)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("plan for CPU (")
    assert lines[1].startswith("tiny-opt: 0.00138B params, 0.00553 GB in float32 [checkpoint headers]")
    assert "→ single: on the CPU" in lines[2] and "per setting" in lines[2]


def test_paper_grid_is_planned_offline_for_an_80_gib_gpu(tmp_path, store):
    env = {**store, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = cli("run", "configs/paper-fig1-sizes.yaml", "--dry-run", "--gpu-memory", "80", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    # every model planned from the registry: nothing downloaded, no config built, no weights read
    models = yaml.safe_load((REPO / "configs" / "paper-fig1-sizes.yaml").read_text())["models"]
    sized = [line for line in out if re.match(r"^[\w.-]+: [\d.]+B params", line)]
    assert [line.split(":")[0] for line in sized] == models and all(line.endswith("[registry, not cached]") for line in sized)
    assert not [f for f in (tmp_path / "hf").rglob("*") if f.is_file()]
    assert not (Path(store["QUANTLENS_CACHE"]) / "anatomy").exists()

    def plan_of(model):
        i = next(i for i, line in enumerate(out) if line.startswith(model + ":"))
        assert "not cached" in out[i] and "GB in bfloat16" in out[i]
        return out[i + 1]

    assert "→ stream:" in plan_of("opt-66b") and "single 1" in plan_of("opt-66b") and "✗" in plan_of("opt-66b")
    assert "→ single:" in plan_of("opt-1.3b") and "per setting" in plan_of("opt-1.3b") and "GiB" in plan_of("opt-1.3b")
    assert any(line.startswith("grid: ≈ ") for line in out)
    r = cli("run", "configs/paper-fig1-sizes.yaml", "--dry-run", "--gpu", "H100", "--gpus", "2", env=env)
    i = next(i for i, line in enumerate(r.stdout.splitlines()) if line.startswith("opt-66b:"))
    assert "→ device_map:" in r.stdout.splitlines()[i + 1]


def test_a_sharded_figure_1_grid_has_a_shorter_critical_path(tmp_path, store):
    """The 66B model's settings over 3 shards: its longest shard, and the grid's critical path with a
    GPU per model flow run, against the unsharded one (planned offline, from the registry)."""
    env = {**store, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cfg = yaml.safe_load((REPO / "configs" / "paper-fig1-sizes.yaml").read_text())
    plain = cli("run", "configs/paper-fig1-sizes.yaml", "--dry-run", "--gpu", "H100", env=env).stdout.splitlines()
    cfg["models"] = [{"ref": m, "shards": 3} if m in ("opt-66b", "llama-65b") else m for m in cfg["models"]]
    f = tmp_path / "fig1-sharded.yaml"
    f.write_text(yaml.safe_dump(cfg))
    r = cli("run", str(f), "--dry-run", "--gpu", "H100", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    i = next(i for i, line in enumerate(out) if line.startswith("opt-66b:"))
    assert any(line.strip().startswith("3 shards (model flow runs") for line in out[i:i + 4])

    def minutes(lines):
        line = next(x for x in lines if x.startswith("critical path: "))
        v, unit = re.search(r"≈ ([\d.]+) (min|h)", line).groups()
        return line, float(v) * (60 if unit == "h" else 1)

    (sharded_line, sharded), (_, plain_path) = minutes(out), minutes(plain)
    assert sharded < plain_path and "unsharded ≈" in sharded_line


def test_released_token_ids_of_another_tokenizer_and_a_model_without_one_are_one_line(tmp_path, store):
    import shutil

    qwen = {"name": "qerror", "path": str(MODELS.parent / "qerror" / "Qwen2.5-7B"), "limit": 4}
    line = one_line(cli("run", str(write(tmp_path, datasets=[qwen])), env=store))
    assert not store_file(store).exists()
    assert re.match(r"quantlens: dataset qerror: token id 1\d{5} is outside the vocabulary of model .*tiny-opt \(\d+ tokens\)", line), line
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (MODELS / "tiny-opt").iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, bare / f.name)
    line = one_line(cli("run", str(write(tmp_path, models=[str(bare)])), env=store))
    assert line.startswith(f"quantlens: model {bare}: no tokenizer in {bare}, and dataset wikitext2 is text"), line
    blob = tmp_path / "ids.pt"
    __import__("torch").save(__import__("torch").randn(3, 8), blob)
    line = one_line(cli("run", str(write(tmp_path, datasets=[{"name": "qerror", "path": str(blob)}])), env=store))
    assert "not a [rows, tokens] tensor of token ids" in line, line


# --- Mixtures of experts and the Pythia ladder ----------------------------------------------------
# (total, active, active counted with the input embedding): the publishers' figures. DeepSeek and
# OpenAI leave the input embedding (a lookup, no FLOPs) out of "active"; Mistral, Qwen and AI2 count it.
PUBLISHED_MOE = {
    "mixtral-8x7b": (46.7e9, 12.9e9, True), "qwen3-30b-a3b": (30.5e9, 3.3e9, True),
    "deepseek-v2-lite": (15.7e9, 2.4e9, False), "olmoe-1b-7b": (6.9e9, 1.3e9, True), "gpt-oss-20b": (21e9, 3.6e9, False),
    # Meta's 109B / 400B total, 17B active (its totals count the vision encoder, ≈1B, that AutoModelForCausalLM
    # does not load); Qwen's 35B, 3B active (the text model: the count 34.7B; 2.9B active without the embedding)
    "llama-4-scout-17b-16e": (109e9, 17e9, True), "llama-4-maverick-17b-128e": (400e9, 17e9, True),
    "qwen3.5-35b-a3b": (35e9, 3e9, False),
}
# The hybrids' published totals (model cards: Nemotron-H 8B, dense; Granite-4.0-H-Tiny 7B, whose "1B
# active" is rounded: the count gives 1.3B without the embedding, so only its total is checked)
PUBLISHED_HYBRID = {"nemotron-h-8b": 8e9, "granite-4.0-h-tiny": 7e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MOE))
def test_moe_registry_counts_land_on_the_published_total_and_active_sizes(name):
    s = P.shape_from_config(P.REGISTRY_CONFIGS[name])
    total, active, with_embedding = PUBLISHED_MOE[name]
    assert s.params == pytest.approx(total, rel=0.03)
    assert s.active_params - (0 if with_embedding else s.vocab * s.hidden) == pytest.approx(active, rel=0.03)
    assert s.active_params < s.params / 3  # time counts the experts a token uses, memory all of them


@pytest.mark.parametrize("name", sorted(PUBLISHED_HYBRID))
def test_hybrid_registry_counts_land_on_the_published_totals(name):
    cfg = P.REGISTRY_CONFIGS[name]
    s = P.shape_from_config(cfg)
    assert s.params == pytest.approx(PUBLISHED_HYBRID[name], rel=0.03)
    assert {"linear_attention", "full_attention"} <= set(F.layer_kinds(cfg))  # Mamba-2 blocks and attention ones
    assert (s.active_params == s.params) == (s.experts == 0)
    assert s.block_params > (s.params - s.outside_params) / s.layers  # blocks of several sizes: the largest held


def _hf_config(model_type: str, **kw):
    from transformers import AutoConfig

    base = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=200)
    if model_type != "gpt_neox":
        base["num_key_value_heads"] = 2
    return AutoConfig.for_model(model_type, **{**base, **kw})


MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=48,
           n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1)
DELTANET = dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"], head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2)
NEMOTRON = dict(mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, head_dim=16, n_routed_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=48, moe_shared_expert_intermediate_size=80, n_group=1, topk_group=1)
SMALL = {  # small configs of each family, every feature the count reads switched on
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      decoder_sparse_step=2, mlp_only_layers=[0]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=32),
    "deepseek_v2": dict(MLA, q_lora_rank=None, n_shared_experts=2),
    "deepseek_v3": dict(MLA, q_lora_rank=24, n_shared_experts=1, n_group=2, topk_group=1),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "gpt_neox": dict(),
    "gpt_neox-tied": dict(tie_word_embeddings=True),
    # Llama-4: routed experts ([E, in, out]) and a shared one in every block (Scout), between dense blocks of
    # intermediate_size_mlp (Maverick)
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=48, intermediate_size_mlp=96, head_dim=16),
    "llama4_text-maverick": dict(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=1, intermediate_size=48,
                                 intermediate_size_mlp=96, head_dim=16, interleave_moe_layer_step=2, use_qk_norm=False),
    # hybrids: each block counted as its kind (gated DeltaNet, Mamba-1 / Mamba-2, short convolution, attention)
    "qwen3_next": dict(DELTANET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                       mlp_only_layers=[1], attention_bias=True),
    "qwen3_5_text": dict(DELTANET),
    "qwen3_5_moe_text": dict(DELTANET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80),
    "granitemoehybrid": dict(MAMBA2, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=80, attention_bias=True, mamba_proj_bias=True),
    "granitemoehybrid-dense": dict(MAMBA2, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], num_local_experts=0,
                                   num_experts_per_tok=0, shared_intermediate_size=80),
    "bamba": dict(MAMBA2, attn_layer_indices=[1], mlp_bias=True, attention_bias=True),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_rms_norm=True,
                      projectors_bias=True, head_dim=16),  # Mamba-2 beside the attention in every block
    "nemotron_h": dict(NEMOTRON, num_hidden_layers=4, hybrid_override_pattern="M*-E", mlp_bias=True, use_bias=True, use_conv_bias=False),
    "nemotron_h-latent": dict(NEMOTRON, num_hidden_layers=3, hybrid_override_pattern="ME*", moe_latent_size=32),
    "nemotron_h-dense": dict(NEMOTRON, num_hidden_layers=3, hybrid_override_pattern="M*-"),  # n_routed_experts, no moe block
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2, mamba_proj_bias=True),
    "lfm2": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], conv_bias=True, block_multiple_of=16),
    "lfm2_moe": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=48, num_dense_layers=1),
    # Zamba2: a transformer block shared by the hybrid layers (counted once, in its first block), LoRA adapters a layer
    # Gemma-3n: per-layer MLP widths, the last blocks without k/v (they reuse earlier K/V), AltUp, LAuReL, per-layer inputs
    "gemma3n_text": dict(num_hidden_layers=4, intermediate_size=[96, 128, 96, 96], head_dim=16, num_kv_shared_layers=2,
                         layer_types=["sliding_attention", "full_attention"] * 2, laurel_rank=16, hidden_size_per_layer_input=32,
                         vocab_size_per_layer_input=150, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    "zamba2": dict(num_hidden_layers=5, layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid"], num_key_value_heads=4,
                   n_mamba_heads=8, mamba_headdim=16, mamba_d_state=16, mamba_ngroups=2, num_mem_blocks=2,
                   use_shared_attention_adapter=True, adapter_rank=16, add_bias_linear=True),
}


def _block_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("case", sorted(SMALL))
def test_counts_from_a_config_equal_the_transformers_model(case):
    """Built on the meta device (no memory): every parameter, every block, the active ones, the
    input features of every linear and expert tensor, the largest matrix and experts tensor."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _hf_config(case.split("-")[0], **SMALL[case])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    s = P.shape_from_config(cfg.to_dict())
    params = dict(model.named_parameters())
    assert s.params == sum(p.numel() for p in params.values()) == model.num_parameters()
    blocks: dict[int, int] = {}
    for n, p in params.items():
        if _block_of(n) is not None:
            blocks[_block_of(n)] = blocks.get(_block_of(n), 0) + p.numel()
    assert s.block_params == max(blocks.values()) and s.outside_params == s.params - sum(blocks.values())
    fused_experts = [p for n, p in params.items() if ".experts." in n and p.dim() == 3]
    E, k = (fused_experts[0].shape[0] if fused_experts else 0), getattr(cfg, "num_experts_per_tok", 0)
    idle = sum(p.numel() * (E - k) // E for n, p in params.items() if ".experts." in n)  # routed experts a token skips
    assert s.active_params == s.params - idle and s.experts == E and (idle > 0) == (E > 0)
    ins, matrices, fused = set(), [], [0]
    for name, mod in model.named_modules():
        if _block_of(name + ".") is None:
            continue
        if isinstance(mod, torch.nn.Linear):
            if name.endswith("dt_proj") or ".altup." in name:  # (Gemma-3n's AltUp maps: routers, not checked against groups)
                continue  # Mamba-1's, applied by its weight: a state the patcher keeps, not a linear it quantizes
            ins.add(mod.in_features)
            matrices.append(mod.weight.numel())
        elif isinstance(getattr(mod, "down_proj", None), torch.nn.Parameter):  # fused experts [E, out, in]
            transposed = getattr(mod, "is_transposed", False) or type(mod).__name__ == "Llama4TextExperts"  # [E, in, out]
            for attr in ("gate_up_proj", "up_proj", "down_proj"):  # (Nemotron-H's: up and down, no gate)
                w = getattr(mod, attr, None)
                if w is None:
                    continue
                ins.add(w.shape[1] if transposed else w.shape[2])
                matrices.append(w.numel() // w.shape[0] // (2 if attr == "gate_up_proj" else 1))
                fused.append(w.numel())
        elif hasattr(mod, "weight") and mod.weight.dim() == 2 and "embed" not in name:  # routers
            ins.add(mod.weight.shape[1])
    assert set(s.linears.values()) == ins
    assert s.largest_linear == max(matrices) and s.largest_experts == max(fused)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v2", "gpt_oss", "gpt_neox", "llama4_text-maverick", "qwen3_next",
                                  "granitemoehybrid", "nemotron_h", "jamba", "zamba2", "gemma3n_text"])
def test_checkpoint_headers_of_an_moe_give_its_counts_and_input_features(case, tmp_path):
    """A small model saved by transformers (per-expert keys for Mixtral's w1/w2/w3 and DeepSeek's
    experts.<j>.gate_proj, fused [E, in, out] for gpt-oss and Llama-4; the hybrids' conv1d kernels and
    Mamba-1's dt_proj, states and no linears): the headers alone give what the config does."""
    from transformers import AutoModelForCausalLM

    cfg = _hf_config(case.split("-")[0], **{"num_hidden_layers": 2, **SMALL[case]})
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    header, computed = P.shape_from_checkpoint(tmp_path), P.shape_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert header.params == computed.params == model.num_parameters()
    assert (header.block_params, header.outside_params, header.active_params) == \
        (computed.block_params, computed.outside_params, computed.active_params)
    assert header.largest_linear == computed.largest_linear and header.largest_experts == computed.largest_experts
    assert set(header.linears.values()) == set(computed.linears.values())
    assert not [n for n in header.linears if re.search(r"experts\.\d", n)]  # one entry per expert linear, not per expert


def test_a_multimodal_checkpoints_other_towers_are_downloaded_not_loaded(tmp_path):
    """Llama-4's, Gemma-3's checkpoints hold a vision tower beside the language model: its bytes
    are downloaded (checkpoint_bytes), its tensors — numbered layers too — never load into the
    causal LM: not among the parameters, the blocks or the linears preflight checks."""
    from transformers import AutoModelForCausalLM

    cfg = _hf_config("llama", num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    text = P.shape_from_checkpoint(tmp_path)
    entries = {f"{tower}.layers.{i}.mlp.fc1.weight": [4 * 7, 7] for tower in ("vision_model.model", "model.vision_tower.encoder")
               for i in range(40)} | {"multi_modal_projector.linear_1.weight": [64, 7]}
    header, offset = {}, 0
    for name, shape in entries.items():
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    (tmp_path / "model-vision.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)  # headers only
    s = P.shape_from_checkpoint(tmp_path)
    assert (s.params, s.block_params, s.outside_params, s.linears) == (text.params, text.block_params, text.outside_params, text.linears)
    assert s.checkpoint_bytes == text.checkpoint_bytes + offset


def test_gpt_oss_mxfp4_blocks_count_as_the_weights_they_hold(tmp_path):
    """openai/gpt-oss-20b ships its experts as MXFP4: U8 ``_blocks`` [E, out, blocks, 16] (two
    values a byte) and ``_scales``; the weights they load as count, the scales do not."""
    cfg = dict(P.REGISTRY_CONFIGS["gpt-oss-20b"], num_hidden_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    E, H, F = 32, 2880, 2880
    entries = {"model.layers.0.mlp.experts.gate_up_proj_blocks": ("U8", [E, 2 * F, H // 32, 16]),
               "model.layers.0.mlp.experts.gate_up_proj_scales": ("U8", [E, 2 * F, H // 32]),
               "model.layers.0.mlp.experts.down_proj_blocks": ("U8", [E, H, F // 32, 16]),
               "model.layers.0.mlp.experts.down_proj_scales": ("U8", [E, H, F // 32])}
    header, offset = {}, 0
    for name, (dtype, shape) in entries.items():
        n = math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)  # headers only: never read further
    s = P.shape_from_checkpoint(tmp_path)
    assert s.params == E * (3 * H * F)
    assert s.linears == {"model.layers.0.mlp.experts.gate_up_proj_blocks": H, "model.layers.0.mlp.experts.down_proj_blocks": F}
    assert s.checkpoint_bytes == offset


def _dry_plan(config: str | Path, target, monkeypatch):
    """The plan ``quantlens run CONFIG --dry-run`` prints: preflight's estimates, the models planned
    from the registry as on a machine that has none of them cached."""
    from quantlens.pipeline import preflight as pf
    from quantlens.pipeline.sweep import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pf, "local_revision", lambda info, revision=None: None)
    cfg = load_config(config if isinstance(config, Path) else REPO / "configs" / config)
    estimates = pf.preflight(cfg, target, planning=True)
    assert [e.model for e in estimates] == [m.ref for m in cfg.models]  # every model planned, none "known after download"
    assert all(e.shape.source == "registry" and not e.cached for e in estimates)
    return {e.model: e for e in estimates}, cfg


def test_moe_sweep_is_planned_with_every_expert_in_memory_and_the_top_k_in_time(monkeypatch):
    h100 = P.planned_target("H100")
    plan, cfg = _dry_plan("moe.yaml", h100, monkeypatch)
    assert set(plan) == {"mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b", "gpt-oss-20b"}
    assert plan["mixtral-8x7b"].weight_gb == pytest.approx(2 * 46.7, rel=0.02)  # every expert, in bf16
    for name, e in plan.items():
        assert e.weight_gb == pytest.approx(2 * PUBLISHED_MOE[name][0] / 1e9, rel=0.03), name
        flops = 2 * e.shape.active_params * P.workload(cfg).tokens / (989e12 * F.DEFAULT_MFU)
        disk = e.shape.params * 2 / (F.DISK_GBPS * 1e9) if e.placement == "stream" else 0.0
        assert e.seconds_per_setting == pytest.approx(flops + disk), name
    mixtral = plan["mixtral-8x7b"]  # 93 GB: not one 80 GiB GPU
    assert not mixtral.fits["single"] and mixtral.placement == "stream" and mixtral.peak_gib["stream"] < 80 * F.USABLE
    assert plan["qwen3-30b-a3b"].placement == "single"
    # DeepSeek's dense first block is not the one stream must hold: the MoE blocks are
    ds = plan["deepseek-v2-lite"].shape
    assert ds.block_params > (ds.params - ds.outside_params) / ds.layers
    node, _ = _dry_plan("moe.yaml", P.planned_target("H100", gpus=8), monkeypatch)
    assert node["mixtral-8x7b"].placement == "device_map" and node["olmoe-1b-7b"].placement == "single"


def test_llama4_and_hybrid_registry_models_are_planned_offline(tmp_path, monkeypatch):
    """Llama-4, Qwen3.5, Nemotron-H, Granite-4 and Zamba2 planned from the registry alone: the group check
    passes their DeltaNet / Mamba linears, memory holds every expert (stream the largest blocks),
    time counts the experts a token uses."""
    models = ["llama-4-scout-17b-16e", "llama-4-maverick-17b-128e", "qwen3.5-35b-a3b", "nemotron-h-8b", "granite-4.0-h-tiny", "zamba2-2.7b"]
    f = tmp_path / "hybrids.yaml"
    f.write_text(yaml.safe_dump({"name": "hybrids", "experiment": "hybrids", "models": models, "settings": ["W16A16", "W4A16-g128"],
                                 "datasets": [{"name": "wikitext2", "seqlen": 2048}]}))
    plan, cfg = _dry_plan(f, P.planned_target("H200", gpus=8), monkeypatch)
    assert {m: e.placement for m, e in plan.items()} == {  # Scout: 216 GB over 8 GPUs; Maverick's 801 GB do not fit them
        "llama-4-scout-17b-16e": "device_map", "llama-4-maverick-17b-128e": "stream", "qwen3.5-35b-a3b": "single",
        "nemotron-h-8b": "single", "granite-4.0-h-tiny": "single", "zamba2-2.7b": "single"}
    from quantlens.model.loading import registry

    for name, e in plan.items():
        assert e.weight_gb == pytest.approx(2 * registry()[name].size_b, rel=0.01), name  # every expert, in bf16
        flops = 2 * e.shape.active_params * P.workload(cfg).tokens / (e.target.tflops * 1e12 * e.target.mfu)
        disk = e.shape.params * 2 / (F.DISK_GBPS * 1e9) if e.placement == "stream" else 0.0
        assert e.seconds_per_setting == pytest.approx(flops + disk), name
    maverick = plan["llama-4-maverick-17b-128e"].shape  # stream holds two MoE blocks (16.3B each), not dense ones
    assert maverick.block_params > (maverick.params - maverick.outside_params) / maverick.layers
    assert maverick.active_params == pytest.approx(plan["llama-4-scout-17b-16e"].shape.active_params, rel=0.01)  # both 17B active
    h100s = P.planned_target("H100", gpus=8)  # two 33 GB MoE blocks and a 21 GB experts tensor being quantized: no 80 GiB GPU
    assert P.placement_error(_plan("llama-4-maverick-17b-128e", h100s)).endswith("no placement fits this GPU")


def test_pythia_ladder_is_planned_size_by_size(monkeypatch):
    plan, cfg = _dry_plan("pythia-sizes.yaml", P.planned_target("A10G"), monkeypatch)
    sizes = ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
    assert list(plan) == [f"pythia-{s}" for s in sizes] and len(cfg.expanded_settings()) == 5
    params = [e.shape.params for e in plan.values()]
    assert params == sorted(params) and params[-1] == PUBLISHED["pythia-12b"]
    assert all(e.shape.active_params == e.shape.params for e in plan.values())  # dense
    assert plan["pythia-1b"].placement == "single"
    big = plan["pythia-12b"]  # 23.7 GB in bf16 on a 24 GiB GPU
    assert not big.fits["single"] and big.placement == "stream"


@pytest.mark.parametrize("config", ["moe.yaml", "pythia-sizes.yaml"])
def test_moe_and_pythia_sweeps_dry_run_offline(config, tmp_path, store):
    env = {**store, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = cli("run", f"configs/{config}", "--dry-run", "--gpu", "H100", env=env)
    assert r.returncode == 0, r.stderr
    models = yaml.safe_load((REPO / "configs" / config).read_text())["models"]
    sized = [line for line in r.stdout.splitlines() if re.match(r"^[\w.-]+: [\d.]+B params", line)]
    assert [line.split(":")[0] for line in sized] == models
    if config == "moe.yaml":
        assert all("B active)" in line for line in sized)


def test_dbrx_counts_from_its_nested_config_equal_the_transformers_model():
    """DBRX names its dimensions its own way (d_model, n_layers, ffn_config.moe_num_experts …): read
    under the common names, the counts are exact (placement auto reads them before loading)."""
    import torch
    from transformers import AutoModelForCausalLM, DbrxConfig

    cfg = DbrxConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=300, max_seq_len=128,
                     attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                     ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    s = P.shape_from_config(cfg.to_dict())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert s.params == sum(p.numel() for p in model.parameters()) and s.experts == 4
    assert s.active_params == s.params - experts // 2  # top-2 of 4 experts
    assert s.layers == 2 and s.max_positions == 128


def test_longcat_flash_counts_its_two_passes_and_its_identity_experts():
    """LongCat-Flash: two attention (MLA) + dense MLP passes and their norms beside one MoE a block,
    its router scoring the identity experts too; a token's expected experts are the top-k's real
    share (top-2 of 4 experts + 2 identity ones: 4/3 experts' weights)."""
    import torch
    from transformers import AutoModelForCausalLM, LongcatFlashConfig

    cfg = LongcatFlashConfig(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                             expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2, moe_topk=2, kv_lora_rank=16,
                             q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    s = P.shape_from_config(cfg.to_dict())
    params = dict(model.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    assert s.params == sum(p.numel() for p in params.values()) and s.experts == 4
    assert s.active_params == s.params - experts + experts // 3
    assert s.block_params == sum(p.numel() for n, p in params.items() if n.startswith("model.layers.0."))


def test_routers_a_setting_includes_are_checked_against_its_group_size(tmp_path):
    """Gemma-3n's AltUp maps (4 inputs) are routers: kept 16-bit, so no group size is checked against
    them — unless a setting includes routers, when preflight refuses a group that does not divide 4."""
    from transformers import AutoModelForCausalLM

    from quantlens.pipeline.preflight import PreflightError, check_group_sizes
    from quantlens.quantize.settings import resolve_setting

    AutoModelForCausalLM.from_config(_hf_config("gemma3n_text", **SMALL["gemma3n_text"])).save_pretrained(tmp_path)
    shape = P.shape_from_checkpoint(tmp_path)
    assert set(shape.routers.values()) == {4, 64} == set(P.shape_from_config(json.loads((tmp_path / "config.json").read_text())).routers.values())
    g16 = {"bits": 4, "granularity": "group", "group_size": 16}
    check_group_sizes("g3n", shape, [resolve_setting({"name": "w4g16", "weights": g16})])
    with pytest.raises(PreflightError, match=r"^setting w4g16-routers: weights group size 16 does not divide the 4 input features of "
                                             r"model\.layers\.\*\.altup\.correction_coefs\.weight"):
        check_group_sizes("g3n", shape, [resolve_setting({"name": "w4g16-routers", "weights": g16, "include_routers": True})])


def test_a_layer_wise_run_of_gemma3n_keeps_its_four_streams_and_per_layer_inputs():
    """Between blocks a layer-wise run keeps, per token, Gemma-3n's four streams and every block's
    per-layer input (4·H + L·P values), not one hidden state: the plan counts them."""
    from dataclasses import replace

    s = P.shape_from_config(_hf_config("gemma3n_text", **SMALL["gemma3n_text"]).to_dict())
    assert s.kept == 4 * 64 + 4 * 32
    work = F.Workload(seqlen=128, tokens=1e6, examples=1000, settings=1, batch_size=1, placement="stream")
    target = F.planned_target(gpu_memory=80)
    four, one = F.estimate("g3n", s, target, work), F.estimate("g3n", replace(s, kept=0), target, work)
    b = 2 if four.dtype in ("bfloat16", "float16") else 4
    assert (four.peak_gib["stream"] - one.peak_gib["stream"]) * 2**30 == pytest.approx(1000 * 128 * (s.kept - 64) * b)
