"""`train.precision: auto` (trainer/precision.py): the choice for each machine, and that an
unresolved `auto` never reaches DeepSpeed. The choice on this machine, through a real run, is
asserted in test_train.py's two-rank test."""

from __future__ import annotations

import pytest

from trainer.config import TrainConfig
from trainer.ds_config import deepspeed_config
from trainer.precision import PRECISIONS, cpu_flags, resolve

AVX2_EPYC = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}          # the 2026-12-07 AMD EPYC: no bf16
XEON_AMX = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize("flags, device, expected", [
    (AVX2_EPYC, "cpu", "fp32"),
    (XEON_AMX, "cpu", "bf16_autocast"),
    (AVX2_EPYC | {"avx512_bf16"}, "cpu", "bf16_autocast"),    # Zen 4: AVX512-BF16 without AMX
    (AVX2_EPYC | {"avx512f", "avx512bw"}, "cpu", "fp32"),     # AVX-512 without its bf16 extension
])
def test_auto_picks_the_fast_precision_for_the_machine(flags, device, expected):
    precision, why = resolve("auto", device, flags)
    assert precision == expected and why.startswith("auto: ")


def test_auto_on_a_gpu_takes_bf16_only_where_the_gpu_computes_it():
    # a GPU cannot exist here: whether it computes bf16 is passed in, as torch.cuda would answer
    assert resolve("auto", "gpu", AVX2_EPYC, gpu_bf16=True)[0] == "bf16"        # Ampere and later
    assert resolve("auto", "gpu", XEON_AMX, gpu_bf16=False)[0] == "fp32"        # V100, T4: emulated bf16


def test_every_rank_trains_in_rank_0s_precision(monkeypatch):
    """A job whose nodes differ (rank 0 without native bf16, this rank with it) trains in rank 0's
    choice everywhere and says so; rank0_value is the broadcast a real job runs."""
    from trainer import train as train_module

    monkeypatch.setattr(train_module, "resolve_precision", lambda asked, device: ("bf16_autocast", "auto: native"))
    monkeypatch.setattr(train_module, "rank0_value", lambda v: PRECISIONS.index("fp32"))
    assert train_module._agreed_precision("auto", "cpu", rank=1) == ("fp32", "auto: native; rank 0 chose fp32")
    monkeypatch.setattr(train_module, "rank0_value", lambda v: v)
    assert train_module._agreed_precision("auto", "cpu", rank=1) == ("bf16_autocast", "auto: native")


@pytest.mark.parametrize("asked", ["fp32", "bf16", "bf16_autocast"])
def test_an_explicit_precision_is_kept_on_any_machine(asked):
    assert resolve(asked, "cpu", AVX2_EPYC) == resolve(asked, "cpu", XEON_AMX) == (asked, "set in train.precision")


def test_deepspeed_gets_a_resolved_precision_only():
    tc = TrainConfig(precision="auto")
    with pytest.raises(ValueError, match="must be resolved first"):
        deepspeed_config(tc, 4)
    ds = deepspeed_config(tc, 4, "bf16_autocast")
    assert ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"]
    ds = deepspeed_config(tc, 4, "fp32")
    assert not ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"]


def test_cpu_flags_are_the_first_processors_and_a_missing_file_has_none(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()
    assert resolve("auto", "cpu", cpu_flags(info))[0] == "bf16_autocast"
