from pathlib import Path

import pytest
import yaml

from quantlens.quantize.settings import ConfigError
from quantlens.pipeline.sweep import expand_setting, load_config, run_key, sweep_id

REPO = Path(__file__).resolve().parents[1]


def base_cfg(**over):
    cfg = {"name": "t", "models": ["opt-350m"], "settings": ["W8A8"], "datasets": ["wikitext2"]}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize(
    "over,message",
    [
        ({"settings": ["W8A8", "W5X"]}, "settings[1]: unknown setting 'W5X'"),
        ({"models": []}, "models: List should have at least 1 item"),
        ({"settings": [{"base": "W8A8", "clip_k": [3, -1]}]}, "settings[0]: invalid setting 'W8A8-clip-1': weights.clip_k: Input should be greater than 0"),
        ({"settings": ["W8A8", "W8A8"]}, "settings: duplicated setting names 'W8A8'"),
        ({"models": ["opt-350m", "opt-350m"]}, "models: duplicated 'opt-350m'"),
        ({"datasets": ["wikitext2", "pile"]}, "datasets.1.name: Value error, unknown dataset 'pile'"),
        ({"datasets": [{"name": "wikitext2", "seqlen": 1}]}, "datasets.0.seqlen"),
        ({"eval": {"seqlen": 0}}, "eval.seqlen: Input should be greater than or equal to 2"),
        ({"settings": [{"base": "W16A16", "clip_k": 3}]}, "quantizes nothing"),
        ({"settings": [{"base": "W8A8", "seeds": [0, 1]}]}, "seeds: only valid with a perturbation"),
        ({"modelz": ["x"]}, "modelz: Extra inputs are not permitted"),
    ],
)
def test_bad_configs_name_the_field(over, message):
    with pytest.raises(ConfigError) as err:
        load_config(base_cfg(**over))
    assert message in str(err.value)


def test_grid_expansion_counts_and_names():
    got = expand_setting({"base": "W8A8", "perturbation": {"distribution": ["gaussian", "uniform", "binary"], "rule": ["additive", "proportional"]}, "seeds": [0, 1, 2, 3]})
    assert len(got) == 3 * 2 * 4
    assert len({s.name for s in got}) == 24
    assert all(s.base == "W8A8" and s.weights.bits == 8 for s in got)
    clip = expand_setting({"base": "W4A16", "clip_k": [3, 5, 10]})
    assert [s.name for s in clip] == ["W4A16-clip3", "W4A16-clip5", "W4A16-clip10"]
    assert [s.weights.clip_k for s in clip] == [3, 5, 10]
    named = expand_setting({"name": "pw{transform_p}", "base": "W4A16", "transform_p": [0.25, 0.5]})
    assert [s.name for s in named] == ["pw0.25", "pw0.5"]


def test_paper_and_demo_configs_are_valid():
    sizes = {}
    for f in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(f)
        sizes[f.stem] = cfg.grid_size()
    assert sizes["demo"] == 12 + 3 * 18 + 1  # the real model on 12 settings; the tiny ones on the grid (+ tiny-llama's checkpoint)
    assert sizes["paper-fig4-perturbations"] >= 4 * 3 * 3 * 2  # 4 seeds × 3 distributions × 3 rules (+ refs)
    assert {"paper-fig1-sizes", "paper-fig5-clipping", "paper-table-nonuniform", "paper-kv-cache", "paper2-examples", "paper-formats"} <= set(sizes)


def test_a_model_runs_the_settings_it_names_and_the_reference():
    cfg = load_config(base_cfg(models=[{"ref": "opt-350m", "settings": ["W4A16", "W8A8KV16"]}, "opt-1.3b"],
                               settings=["W16A16", "W8A8", "W8A8KV16", "W4A16", "W3A16"]))
    assert [s.name for s in cfg.settings_for(cfg.models[0])] == ["W16A16", "W8A8", "W4A16"]  # W8A8KV16 is W8A8
    assert [s.name for s in cfg.settings_for(cfg.models[1])] == ["W16A16", "W8A8", "W4A16", "W3A16"]
    assert cfg.grid_size() == 7
    with pytest.raises(ConfigError, match=r"model opt-350m: settings names 'W4A61', not a setting of the grid \(did you mean 'W4A16'\?\)"):
        load_config(base_cfg(models=[{"ref": "opt-350m", "settings": ["W4A61"]}], settings=["W16A16", "W4A16"]))


def test_gguf_models_are_told_apart_by_file():
    cfg = load_config(base_cfg(models=[{"ref": "org/m-GGUF", "gguf_file": "m.Q4_K_M.gguf"},
                                       {"ref": "org/m-GGUF", "gguf_file": "m.Q8_0.gguf"}]))
    assert [m.label() for m in cfg.models] == ["org/m-GGUF:m.Q4_K_M.gguf", "org/m-GGUF:m.Q8_0.gguf"]
    with pytest.raises(ConfigError, match="models: duplicated 'org/m-GGUF:m.Q8_0.gguf'"):
        load_config(base_cfg(models=[{"ref": "org/m-GGUF", "gguf_file": "m.Q8_0.gguf"}] * 2))


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(base_cfg(models=["./m"])))
    assert load_config(f).models[0].ref == str(tmp_path / "m")


def test_run_key_deterministic_and_sensitive():
    cfg = load_config(base_cfg())
    s = cfg.expanded_settings()[0]
    k = run_key("abc", "opt-350m", s, cfg)
    assert k == run_key("abc", "opt-350m", s, load_config(base_cfg()))
    assert k != run_key("abd", "opt-350m", s, cfg)  # revision
    assert k != run_key("abc", "opt-350m", s, load_config(base_cfg(eval={"seqlen": 1024})))
    assert k != run_key("abc", "opt-350m", s, load_config(base_cfg(datasets=["c4"])))
    assert sweep_id(cfg) == sweep_id(load_config(base_cfg()))


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
