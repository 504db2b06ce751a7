"""What every fusion encoder must do on a GPU (the tests using this skip without CUDA):

* float32 outputs equal the CPU's: SDPA's CUDA kernels and cuBLAS against the CPU kernels;
* the pretraining loss under bf16 autocast (how ``fusion.pretrain`` trains on GPUs) is finite and
  close to the float32 loss on the same corruption (dropout off, so only precision differs), and
  its gradients are finite;
* with dropout on, the same step runs (SDPA's CUDA kernels with dropout and a padding mask).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check_on_cuda(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  outputs: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]],
                  atol: float = 1e-4) -> None:
    """``model`` (on the CPU) and ``batch``; ``outputs(model, batch)`` names the tensors to compare.
    ``model.loss(batch, generator)`` is the pretraining loss."""
    model = model.eval()
    with torch.no_grad():
        want = outputs(model, batch)
    gpu = copy.deepcopy(model).cuda()
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        got = outputs(gpu, on_gpu)
    errors = {k: (got[k].float().cpu() - v.float()).abs().max().item() for k, v in want.items()}
    assert max(errors.values()) < atol, errors

    with torch.no_grad():  # still in eval mode: dropout off
        full = gpu.loss(on_gpu, torch.Generator("cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = gpu.loss(on_gpu, torch.Generator("cuda").manual_seed(0))
    assert set(half) == set(full)
    for k, v in full.items():
        assert torch.isfinite(half[k]), (k, half[k])
        assert abs(half[k].item() - v.item()) < 0.05 * abs(v.item()) + 0.05, (k, half[k], v)
    half["total"].backward()
    grads = [p.grad for p in gpu.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def check_dropout_step_on_cuda(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """One bf16 training step with dropout on (``model`` built with its default dropout)."""
    gpu = model.cuda().train()
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = gpu.loss(on_gpu, torch.Generator("cuda").manual_seed(0))
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)
