"""One model shape from two readings: the anatomy's (modules) equals the footprint's (config), and
the one group-size check refuses a misfit from the patcher and from the preflight alike."""

import pytest
from transformers import AutoModelForCausalLM

from conftest import tiny_random_model
from quantlens.quantize.settings import ConfigError
from quantlens.model.anatomy import anatomy
from quantlens.model.footprint import model_shape, shape_from_config
from quantlens.model.shape import ModelShape, group_misfit
from quantlens.pipeline.errors import PreflightError
from quantlens.pipeline.preflight import check_group_sizes
from quantlens.quantize.patch import quantize_
from quantlens.quantize.settings import resolve_setting
from test_composition import _configs

ARCHS = ("opt", "opt-350m-shape", "bloom", "llama", "qwen2", "gpt2", "gpt-neox", "falcon", "mixtral", "qwen2-moe", "deepseek-v2", "gpt-oss",
         "qwen3_next", "jamba", "granite-4", "falcon-h1", "lfm2-moe")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_anatomy_reads_the_shape_the_config_states(arch):
    cfg = _configs()[arch]
    model = AutoModelForCausalLM.from_config(cfg)
    assert anatomy(model).shape() == model_shape(cfg.to_dict()) == shape_from_config(cfg.to_dict()).model_shape


def test_an_moe_shape_counts_its_experts():
    assert model_shape(_configs()["mixtral"].to_dict()) == ModelShape(layers=2, hidden=32, vocab=96, experts=4)
    assert model_shape(_configs()["llama"].to_dict()).experts == 0


def test_group_misfit_names_the_first_linear_it_does_not_divide():
    assert group_misfit(16, [("a", 32), ("b", 64)]) is None
    assert group_misfit(12, [("a", 36), ("b", 32), ("c", 20)]) == ("b", 32)


def test_both_callers_refuse_a_misfit_in_their_own_words():
    model = tiny_random_model("llama")  # every linear reads 32 or 64 features: 12 divides neither
    with pytest.raises(ConfigError, match=r"^invalid setting 'W4A16-g12': weights.group_size: 12 does not divide "
                                          r"in_features=32 of layer 'model\.layers\.0\.self_attn\.q_proj'$"):
        quantize_(model, "W4A16-g12")
    shape = shape_from_config(model.config.to_dict())
    with pytest.raises(PreflightError, match=r"^setting W4A16-g12: weights group size 12 does not divide the 32 input "
                                             r"features of layers\.\*\.q \(model tiny\); group sizes that divide every linear: 16, 32$"):
        check_group_sizes("tiny", shape, [resolve_setting("W4A16-g12")])


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3.5"])
def test_a_hybrids_linear_attention_is_in_the_preflight_group_check(arch):
    """The gated DeltaNet's output projection reads the value heads' width (here 48), not the hidden
    size (32): a group of 32 that fits every attention and MLP linear is refused naming it, in
    preflight as quantize_ would."""
    cfg = _configs()[arch].to_dict()
    cfg.update(linear_num_value_heads=6, linear_num_key_heads=2)  # value width 6 × 8 = 48
    shape = shape_from_config(cfg)
    assert shape.linears["layers.*.linear_attn.out_proj"] == 48
    with pytest.raises(PreflightError, match=r"^setting W4A16-g32: weights group size 32 does not divide the 48 input "
                                             r"features of layers\.\*\.linear_attn\.out_proj \(model hybrid\)"):
        check_group_sizes("hybrid", shape, [resolve_setting("W4A16-g32")])
    model = AutoModelForCausalLM.from_config(type(_configs()[arch])(**cfg))
    with pytest.raises(ConfigError, match=r"does not divide in_features=48 of layer 'model\.layers\.0\.linear_attn\.out_proj'"):
        quantize_(model, "W4A16-g32")


def test_a_hybrids_state_space_mixer_is_in_the_preflight_group_check():
    """A Mamba mixer's out_proj reads its inner width (Falcon-H1's mamba_d_ssm, here 48; else
    mamba_expand × hidden), not the hidden size: a group of 32 is refused naming it, in preflight as
    quantize_ would."""
    assert {k: v for k, v in shape_from_config(_configs()["jamba"].to_dict()).linears.items() if ".mamba." in k} == {
        "layers.*.mamba.in_proj": 32, "layers.*.mamba.out_proj": 64, "layers.*.mamba.x_proj": 64}
    cfg = _configs()["falcon-h1"].to_dict()
    cfg.update(mamba_d_ssm=48, mamba_n_heads=6)
    shape = shape_from_config(cfg)
    assert shape.linears["layers.*.mamba.out_proj"] == 48
    with pytest.raises(PreflightError, match=r"^setting W4A16-g32: weights group size 32 does not divide the 48 input "
                                             r"features of layers\.\*\.mamba\.out_proj \(model hybrid\)"):
        check_group_sizes("hybrid", shape, [resolve_setting("W4A16-g32")])
    model = AutoModelForCausalLM.from_config(type(_configs()["falcon-h1"])(**cfg))
    with pytest.raises(ConfigError, match=r"does not divide in_features=48 of layer 'model\.layers\.0\.mamba\.out_proj'"):
        quantize_(model, "W4A16-g32")
