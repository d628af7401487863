"""Shared fixtures: tiny random models of each family (made here) and the shared trained ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Prefect's ephemeral API server gets 20 s to start by default: on 2 busy cores (the suite's subprocess
# sweeps, servers and workers) that has timed out once; a failure here would be the machine's, not ours
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

REPO = Path(__file__).resolve().parents[1]
# GGUF files converted to safetensors (quantlens.model.gguf): one cache for the whole suite, every worker
# and subprocess (a conversion of the real model takes ~30 s; concurrent ones wait on a file lock)
os.environ.setdefault("QUANTLENS_GGUF_CACHE", str(REPO / ".cache" / "gguf-tests"))
SHARED = Path(os.environ.get("QUANTLENS_SHARED_DATA", REPO.parent / "shared" / "data"))
MODELS = SHARED / "models"
WIKI_TEST = SHARED / "wikitext2" / "test.txt"
LAMBADA = SHARED / "lambada" / "lambada_openai.jsonl"
FAMILIES = ("opt", "bloom", "llama")


def require_tool(binary: str) -> None:
    """A system tool scripts/install.sh installs (Debian package of the same name): missing in CI
    fails the test, missing on a developer's machine skips it."""
    import shutil

    if shutil.which(binary) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is missing: scripts/install.sh installs it (Debian package {binary})")
        pytest.skip(f"no {binary} here; scripts/install.sh installs it")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token-window cache in a temp dir so tests never read a stale cache of the developer's."""
    os.environ["QUANTLENS_CACHE"] = str(tmp_path_factory.mktemp("quantlens-cache"))


@pytest.fixture(autouse=True)
def _environment_restored():
    """What a test does to os.environ (the CLI called in-process quiets Prefect's logs through it) ends
    with the test: a later test's subprocesses — in whatever order the workers run the files — inherit
    the environment the session and the module fixtures set, nothing more."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


def tiny_random_model(family: str, seed: int = 0) -> torch.nn.Module:
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if family == "opt":
        cfg = OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=32, max_position_embeddings=64)
        m = OPTForCausalLM(cfg)
    elif family == "bloom":
        cfg = BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4)
        m = BloomForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
        m = LlamaForCausalLM(cfg)
    return m.eval()


@pytest.fixture(scope="session")
def trained():
    """family -> (model, tokenizer) for the shared trained tiny models, loaded once."""
    from quantlens.model.loading import load_model

    cache = {}

    def get(family: str):
        if family not in cache:
            path = MODELS / f"tiny-{family}"
            if not path.is_dir():
                pytest.fail(f"shared trained model missing: {path}")
            cache[family] = load_model(str(path), device="cpu")
        return cache[family]

    return get
