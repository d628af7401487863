import pytest

from quantlens.quantize.settings import PRESETS, ConfigError, QuantSpec, resolve_setting


def test_presets():
    assert set(PRESETS) >= {"W16A16", "W8A8", "W4A16", "W4A8", "W8A8-nu", "W4A16-nu", "W4A8-nu"}
    assert PRESETS["W16A16"].weights is None and PRESETS["W16A16"].activations is None
    w8a8 = PRESETS["W8A8"]
    assert (w8a8.weights.bits, w8a8.weights.granularity) == (8, "channel")
    assert (w8a8.activations.bits, w8a8.activations.granularity) == (8, "token")
    assert PRESETS["W4A16"].activations is None
    assert PRESETS["W4A16-nu"].weights.transform_p == pytest.approx(1 / 3)
    assert PRESETS["W4A16"].weights.transform_p == 1.0


def test_name_grammar():
    s = resolve_setting("W3A16-g64-nu")
    assert (s.weights.bits, s.weights.granularity, s.weights.group_size) == (3, "group", 64)
    assert s.weights.nonuniform
    s = resolve_setting("W4A8-p0.5-clip3")
    assert s.weights.transform_p == 0.5 and s.activations.clip_k == 3.0


def test_dict_with_base_and_perturbation():
    s = resolve_setting({"name": "gauss", "base": "W8A8", "perturbation": {"distribution": "gaussian", "seed": 3}})
    assert s.weights.bits == 8 and s.perturbation.seed == 3 and s.perturbation.target == "both"
    assert s.flat_params()["perturbation"] == "gaussian-additive-both"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("W0A16", "weights.bits: must be between 2 and 16"),
        ("W33A16", "weights.bits: must be between 2 and 16 (16 = not quantized), got 33"),
        ("W8A1", "activations.bits: must be between 2 and 16"),
        ("W9X", "unknown setting 'W9X'"),
        ("int4", "unknown setting 'int4'"),
        ({"name": "x", "weights": {"bits": 0}}, "weights.bits: Input should be greater than or equal to 2 (got 0)"),
        ({"name": "x", "weights": {"bits": 33}}, "weights.bits: Input should be less than or equal to 16 (got 33)"),
        ({"name": "x", "weights": {"bits": 4, "transform_p": 0}}, "weights.transform_p: Input should be greater than 0"),
        ({"name": "x", "weights": {"bits": 4, "transform_p": -1}}, "weights.transform_p"),
        ({"name": "x", "weights": {"bits": 4, "granularity": "group"}}, "group_size is required"),
        ({"name": "x", "weights": {"bits": 4, "clip_k": -3}}, "weights.clip_k: Input should be greater than 0"),
        ({"name": "x", "weights": {"bits": 4, "granularity": "row"}}, "weights.granularity"),
        ({"name": "x", "weightz": {}}, "weightz: Extra inputs are not permitted"),
        ({"name": "x", "base": "W4A16", "perturbation": {"target": "activations"}}, "needs an activations spec"),
        ({"name": "x", "base": "W8A8", "perturbation": {"distribution": "cauchy"}}, "perturbation.distribution"),
        ({"name": "x", "base": "W4A16-q4_k_m", "include_mixer_states": True}, "include_mixer_states: llama.cpp's types are blocks"),
        ({"name": "x", "checkpoint": "some/folder", "include_mixer_states": True}, "include_mixer_states do not apply"),
    ],
)
def test_invalid_settings_name_the_field(spec, message):
    with pytest.raises(ConfigError) as err:
        resolve_setting(spec)
    assert message in str(err.value)


def test_quantspec_is_frozen():
    from pydantic import ValidationError

    q = QuantSpec(bits=4)
    with pytest.raises(ValidationError, match="Instance is frozen"):
        q.bits = 3


def test_the_settings_algebra_one_computation_one_identity():
    from quantlens.pipeline.sweep import SweepConfig, run_key

    w16 = resolve_setting("W16A16")
    for name in ("W16A16KV16", "W16A16-nu", "W16A16-clip3", "W16A16KV16-p0.5"):
        s = resolve_setting(name)
        assert s.same_computation(w16) and s.is_reference, name
    assert not resolve_setting("W16A16KV4").is_reference and not resolve_setting("W16A16KV4").same_computation(w16)
    # fields that cannot change the computation take their defaults
    a = resolve_setting({"name": "a", "base": "W4A16", "perturbation": {"target": "weights", "rng": "device", "match": "batch", "inverse_eps": 0.5}})
    b = resolve_setting({"name": "b", "base": "W4A16", "perturbation": {"target": "weights"}})
    assert a.same_computation(b) and not a.is_reference
    c = resolve_setting({"name": "c", "base": "W4A8", "perturbation": {"target": "activations", "match": "batch"}})
    d = resolve_setting({"name": "d", "base": "W4A8", "perturbation": {"target": "activations"}})
    assert not c.same_computation(d)  # match matters where activations are perturbed
    assert resolve_setting({"name": "e", "include_lm_head": True}).same_computation(w16)
    assert resolve_setting({"name": "e2", "base": "W16A8", "include_mixer_states": True}).same_computation(resolve_setting("W16A8"))
    states = resolve_setting({"name": "g", "base": "W4A16", "include_mixer_states": True})
    assert not states.same_computation(resolve_setting("W4A16")) and states.identity()["include_mixer_states"] is True
    assert "include_mixer_states" not in resolve_setting("W4A16").identity()  # (run keys of earlier runs unchanged)
    assert states.flat_params()["include"] == "mixer_states" and "include" not in resolve_setting("W4A16").flat_params()
    both = resolve_setting({"name": "h", "base": "W4A16", "include_mixer_states": True, "include_routers": True})
    assert both.flat_params()["include"] == "routers+mixer_states"  # (filterable in MLflow: params.include)
    assert not resolve_setting({"name": "f", "base": "W4A16", "include_lm_head": True}).same_computation(resolve_setting("W4A16"))
    assert w16.flat_params()["reference"] is True and resolve_setting("W16A16KV4").flat_params()["reference"] is False

    cfg = SweepConfig.model_validate({"name": "kv", "models": ["m"], "settings": ["W16A16", "W16A16KV16", "W16A16KV4", "W16A16KV4-nu"],
                                      "datasets": ["wikitext2"]})
    assert [s.name for s in cfg.expanded_settings()] == ["W16A16", "W16A16KV4", "W16A16KV4-nu"]
    assert cfg.aliases() == {"W16A16KV16": "W16A16"}
    assert run_key("r", "m", resolve_setting("W16A16KV16"), cfg) == run_key("r", "m", w16, cfg)
    assert run_key("r", "m", resolve_setting("W16A16KV4"), cfg) != run_key("r", "m", w16, cfg)
    with pytest.raises(ConfigError, match="'W16A16KV16' is the same computation as 'W16A16': name that one"):
        SweepConfig.model_validate({**cfg.model_dump(), "analysis": {"mechanisms": ["W16A16KV16"]}}).expanded_settings()
