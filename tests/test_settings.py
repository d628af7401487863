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
