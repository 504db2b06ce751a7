"""TrainConfig.precision and TrainSession.autocast: bf16 autocast on CUDA and on CPUs with native bf16,
float32 elsewhere or when forced. The host's CPU never decides a test: its capability is monkeypatched."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pydantic
import pytest
import torch

import pipeline.train as train_mod
from pipeline.train import TrainConfig, TrainSession, autocast_context, cpu_bf16_native


def _matmul_dtype(ctx: contextlib.AbstractContextManager) -> torch.dtype:
    with ctx:
        return (torch.randn(4, 8) @ torch.randn(8, 3)).dtype


def _session_autocast(precision: str, device: str = "cpu") -> contextlib.AbstractContextManager:
    """TrainSession.autocast without Ray Train: it reads only ``train`` and ``device``."""
    fake = SimpleNamespace(train=TrainConfig(precision=precision), device=torch.device(device))
    return TrainSession.autocast(fake)


def test_precision_field_defaults_to_auto_and_validates():
    assert TrainConfig().precision == "auto"
    assert TrainConfig(precision="fp32").precision == "fp32"
    with pytest.raises(pydantic.ValidationError):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        autocast_context("half", "cpu")


def test_fp32_is_a_no_op_even_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(train_mod, "cpu_bf16_native", lambda: True)
    ctx = _session_autocast("fp32")
    assert isinstance(ctx, contextlib.nullcontext)
    assert _matmul_dtype(ctx) == torch.float32
    assert isinstance(autocast_context("fp32", "cuda"), contextlib.nullcontext)


def test_bf16_on_cpu_autocasts_matmuls_whatever_the_cpu(monkeypatch):
    monkeypatch.setattr(train_mod, "cpu_bf16_native", lambda: False)   # forced, even when emulated
    ctx = _session_autocast("bf16")
    assert isinstance(ctx, torch.autocast)
    assert _matmul_dtype(ctx) == torch.bfloat16
    assert torch.randn(2, 2).matmul(torch.randn(2, 2)).dtype == torch.float32   # only inside


@pytest.mark.filterwarnings("ignore:CUDA is not available")   # building a CUDA autocast on a CPU host
@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_detection(monkeypatch, native):
    monkeypatch.setattr(train_mod, "cpu_bf16_native", lambda: native)
    assert _matmul_dtype(_session_autocast("auto")) == (torch.bfloat16 if native else torch.float32)
    # CUDA is bf16 whatever the CPU; other devices (MPS, ...) stay float32 under auto
    ctx = autocast_context("auto", "cuda")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert isinstance(autocast_context("auto", "mps"), contextlib.nullcontext)


def _fake_cpu(monkeypatch, machine: str, *, avx512_bf16=None, amx=None, mkldnn_bf16=False,
              flags: set[str] = frozenset(), mkldnn=True) -> None:
    """A CPU of the given capabilities: torch's cpuinfo queries (None: this torch lacks them),
    the mkldnn query (Arm) and /proc/cpuinfo's flags."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda v=value: v, raising=False)
    monkeypatch.setattr(train_mod, "_cpuinfo_flags", lambda: set(flags))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16, raising=False)


@pytest.mark.parametrize("kw, native", [
    ({"avx512_bf16": True, "amx": False}, True),                  # Cooper Lake, Zen 4/5
    ({"avx512_bf16": False, "amx": True}, True),                  # AMX
    ({"avx512_bf16": False, "amx": False, "flags": {"avx512_bf16"}}, False),   # torch's answer wins
    ({"avx512_bf16": False, "amx": False, "mkldnn_bf16": True}, False),  # AVX512BW: emulated bf16
    ({"flags": {"avx512f", "amx_bf16"}}, True),                   # no torch queries: /proc/cpuinfo
    ({"flags": {"avx512f", "avx512bw"}}, False),
    ({"avx512_bf16": True, "amx": True, "mkldnn": False}, False),   # no oneDNN, no bf16 kernels
])
def test_x86_detection(monkeypatch, kw, native):
    _fake_cpu(monkeypatch, "x86_64", **kw)
    assert cpu_bf16_native() is native


@pytest.mark.parametrize("bf16", [True, False])
def test_arm_detection_asks_mkldnn(monkeypatch, bf16):
    _fake_cpu(monkeypatch, "aarch64", avx512_bf16=True, amx=True, mkldnn_bf16=bf16)
    assert cpu_bf16_native() is bf16
