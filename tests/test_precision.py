"""Mixed bfloat16 where the hardware has it: the choice, and what it builds."""

from __future__ import annotations

import keras_tuner as kt
import pytest

from search_spaces import make_hypermodel
from sweep import precision
from sweep.errors import ConfigError
from sweep.spec import SweepSpec


@pytest.mark.parametrize("flags,found", [("fpu sse avx512f avx512_bf16 amx_tile", "CPU (avx512_bf16)"),
                                         ("fpu amx_bf16 amx_tile avx512_bf16", "CPU (amx_bf16, avx512_bf16)"),
                                         ("fpu sse4_2 avx2 fma", None)])
def test_auto_uses_bfloat16_only_where_the_cpu_has_it(tmp_path, monkeypatch, flags, found):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(precision, "_bfloat16_gpu", lambda: None)
    assert precision.native_bfloat16(cpuinfo) == found
    monkeypatch.setattr(precision, "native_bfloat16", lambda: found)
    assert precision.resolve("auto") == ("mixed_bfloat16" if found else "float32")
    assert precision.resolve("float32") == "float32"


def test_no_cpuinfo_means_no_native_bfloat16(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_bfloat16_gpu", lambda: None)
    assert precision.native_bfloat16(tmp_path / "missing") is None


def test_a_mixed_model_computes_in_bfloat16_and_keeps_its_weights_and_logits_in_float32():
    family = make_hypermodel("scratch", image_size=(32, 32))
    family.dtype_policy = "mixed_bfloat16"
    model = family.build(kt.HyperParameters())
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("conv1").kernel.dtype == "float32"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    assert make_hypermodel("scratch", image_size=(32, 32)).build(kt.HyperParameters()).get_layer(
        "conv1").compute_dtype == "float32"


def test_an_unknown_precision_is_refused_and_old_sweeps_resume_in_float32():
    with pytest.raises(ConfigError, match="unknown precision 'half'"):
        SweepSpec(family="scratch", precision="half")
    params = SweepSpec(family="scratch").to_params()
    del params["precision"]
    assert SweepSpec.from_params(params).precision == "float32"
