"""The registry of calibrated methods (quantlens.quantize.methods): GPTQ and AWQ are registered and
chosen by name, an unknown name fails in one line naming the known ones, and a method registered
here — round to nearest, run through the calibrated path — goes from calibration to quantize_ on a
tiny model without any other file knowing it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_random_model
from quantlens.errors import ConfigError
from quantlens.quantize.methods import registry
from quantlens.quantize.methods.base import Calibrated, CalibratedMethod, Captured
from quantlens.quantize.quant import quantize
from quantlens.quantize.setting import Setting
from quantlens.quantize.settings import AWQSpec, GPTQSpec, QuantSpec, resolve_setting
from quantlens.quantize.spec import Strict


def test_gptq_and_awq_are_registered_and_chosen_by_name():
    gptq, awq = registry.method("gptq"), registry.method("awq")
    assert {"gptq", "awq"} <= set(registry.known())
    assert (gptq.option, gptq.options, gptq.shares_input) == ("gptq", GPTQSpec, False)
    assert (awq.option, awq.options, awq.shares_input) == ("awq", AWQSpec, True)  # q/k/v share one scale
    for name, m in (("W4A16-gptq", gptq), ("W3A16-g64-awq", awq)):
        s = resolve_setting(name)
        assert registry.chosen(s) == [m] and s.method == m.name and s.calibrated
    assert registry.chosen(resolve_setting("W4A16")) == [] and resolve_setting("W4A16").method == "rtn"


def test_an_unknown_method_fails_in_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as err:
        registry.method("squeezellm")
    msg = str(err.value)
    assert "\n" not in msg and "'squeezellm'" in msg and "awq" in msg and "gptq" in msg


def test_a_methods_grid_limits_are_the_settings_validation():
    with pytest.raises(ConfigError, match="awq: AWQ rounds on an integer grid"):
        resolve_setting("W4A16-nf4-awq")
    with pytest.raises(ConfigError, match="gptq and awq: one calibrated method per setting"):
        resolve_setting({"name": "both", "base": "W4A16-gptq", "awq": {}})


# --- a toy method, known only to this file ----------------------------------------------------------

class ToyOptions(Strict):
    """Round to nearest has no options."""


class ToySetting(Setting):
    """A setting with the toy's options field (the one field a new method may add)."""

    toy: ToyOptions | None = None


def _toy_supported(spec: QuantSpec) -> str | None:
    return None if spec.format == "int" else f"toy rounds on integers, not {spec.label}"


def _toy_calibrate(weights: list[torch.Tensor], inputs: Captured, spec: QuantSpec, options: ToyOptions,
                   clippable: list[bool]) -> Calibrated:
    assert inputs.h.shape == (weights[0].shape[1],) * 2  # it did see its layer's captured inputs
    return Calibrated([quantize(w, spec).xq for w in weights], {"weights": float(len(weights))})


TOY = CalibratedMethod(name="toy-rtn", option="toy", options=ToyOptions, supported=_toy_supported, calibrate=_toy_calibrate)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.known(), TOY.name, TOY)  # (undone after the test)
    return TOY


def test_a_registered_method_is_chosen_by_its_options_and_validated(toy):
    s = ToySetting(name="W4A16-toy", weights=QuantSpec(bits=4, granularity="group", group_size=16), toy=ToyOptions())
    assert registry.method("toy-rtn") is toy and registry.chosen(s) == [toy]
    assert s.method == "toy-rtn" and s.calibrated and s.flat_params()["method"] == "toy-rtn"
    with pytest.raises(ValueError, match="toy-rtn: toy rounds on integers, not nf4"):
        ToySetting(name="x", weights=QuantSpec(bits=4, format="nf", granularity="group", group_size=16), toy=ToyOptions())


def test_a_toy_method_runs_through_calibration_and_quantize_(toy):
    """Round to nearest through the calibrated path gives round to nearest's weights."""
    from quantlens.quantize.calibrate import calibrate_model
    from quantlens.quantize.patch import full_report, quantize_, restore_, target_linears

    model = tiny_random_model("llama")
    rtn = resolve_setting("W4A16-g16")
    setting = ToySetting(name="W4A16-g16-toy", weights=rtn.weights, toy=ToyOptions())
    calib = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(3))
    got = calibrate_model(model, setting, calib, batch_size=2)
    names = [n for n, _ in target_linears(model, setting)]
    assert sorted(got) == sorted(names)

    quantize_(model, setting, calibrated=got)
    toy_weights = {n: m.weight.data.clone() for n, m in target_linears(model, setting)}
    assert full_report(model).summary()["coverage_targeted"] == 1.0
    restore_(model)
    quantize_(model, rtn)
    for n, m in target_linears(model, rtn):
        assert torch.equal(toy_weights[n], m.weight.data), n
    restore_(model)
    with pytest.raises(ConfigError, match="no calibrated weights"):
        quantize_(model, setting)  # a calibrated setting without its weights fails before any change


TOY_MODULE = '''"""Round to nearest through the calibrated path: a method of its own, one module (written by the test)."""
from quantlens.quantize.methods.base import Calibrated, CalibratedMethod
from quantlens.quantize.spec import Strict


class Options(Strict):
    """Round to nearest has no options."""


def calibrate(weights, inputs, spec, options, clippable):
    from quantlens.quantize.quant import quantize

    return Calibrated([quantize(w, spec).xq for w in weights])


METHOD = CalibratedMethod(name="rtncal", option="rtncal", options=Options, supported=lambda spec: None,
                          calibrate=calibrate, names=("W4A16-rtncal",), group=32)
'''

CHECK = '''
import json, sys
from quantlens.quantize import methods
methods.__path__.append(sys.argv[1])
from quantlens.quantize.settings import CALIBRATED_NAMES, resolve_setting
s = resolve_setting("W4A16-rtncal")
print(json.dumps({"method": s.method, "calibrated": s.calibrated, "group": s.weights.group_size,
                  "names": list(CALIBRATED_NAMES), "params": s.flat_params()["method"], "identity": sorted(s.identity())}))
'''


def test_a_new_method_is_one_module_of_the_package(tmp_path):
    """A method module dropped beside GPTQ and AWQ (a fresh process: the Setting model is built from
    the registry when it is imported) is a Setting field, a name suffix with its own group size, a
    listed name and a run identity, with nothing else told."""
    import json
    import subprocess
    import sys

    (tmp_path / "rtncal.py").write_text(TOY_MODULE, encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["method"] == got["params"] == "rtncal" and got["calibrated"] and got["group"] == 32
    assert got["names"] == ["W4A16-gptq", "W3A16-gptq", "W4A16-awq", "W3A16-awq", "W4A16-rtncal"]
    assert "rtncal" in got["identity"]
