"""Optimisers for embedding tables that update only the rows a step looks up: lazy Adam
(:class:`SparseAdam`) and PyTorch-BigGraph's row-wise Adagrad (:class:`RowAdagrad`), whose update
on a set of distinct rows, :func:`row_adagrad_`, is also the partitioned bucket trainer's
(:mod:`knowledge.partitioned_state`), so both paths compute the same numbers by the same code."""

from __future__ import annotations

import math
from typing import Any

import torch


#: :class:`RowAdagrad`'s ``eps`` (PBG's constant, added after the root)
ADAGRAD_EPS = 1e-10


def row_adagrad_(table: torch.Tensor, acc: torch.Tensor, rows: torch.Tensor, old: torch.Tensor | None,
                 grad: torch.Tensor, lr: float, weight_decay: float = 0.0, eps: float = ADAGRAD_EPS) -> None:
    """Row-wise Adagrad (:class:`RowAdagrad`, Lerer et al. 2019's optimiser) on the distinct rows
    ``rows`` (U,) of the ``(n, d)`` ``table``, in place, given their values before the step ``old``
    (U, d; read only for ``weight_decay``) and their gradient ``grad`` (U, d); ``acc`` (n,) is the
    table's accumulator::

        g_i <- g_i + weight_decay * w_i
        G_i <- G_i + mean_j g_ij^2
        w_i <- w_i - lr * g_i / (sqrt(G_i) + eps)

    ``RowAdagrad.step`` applies it to a coalesced row-sparse gradient's rows, the bucket trainer to
    the rows it gathered: the rows are distinct, so each is written once, with no sparse tensor to
    coalesce."""
    if weight_decay:
        grad = grad.add(old, alpha=weight_decay)
    total = acc.index_select(0, rows).add_((grad * grad).mean(1))                  # (U,)
    acc.index_copy_(0, rows, total)
    std = total.sqrt_().add_(eps).unsqueeze(1)                                      # (U, 1)
    table.index_add_(0, rows, grad.mul(-lr).div_(std))  # distinct rows: w_i + update, once each


def _closure_loss(closure: Any) -> Any:
    """``torch.optim.Optimizer.step``'s optional closure: re-evaluates the loss with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _row_gradient(p: torch.Tensor, grad: torch.Tensor,
                  weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-sparse gradient of the ``(n, d)`` parameter ``p`` as ``(rows (U,), values (U, d))``,
    each row once (coalesced: the updates are non-linear in ``g``), plus ``weight_decay * p`` on
    those rows only."""
    if not grad.is_sparse:
        raise RuntimeError("a sparse optimiser needs row-sparse gradients: build the model with "
                           "sparse=True (knowledge.models.build_model)")
    grad = grad.coalesce()
    rows, values = grad._indices()[0], grad._values()
    if weight_decay:
        values = values.add(p.index_select(0, rows), alpha=weight_decay)
    return rows, values


class RowAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad, PyTorch-BigGraph's optimiser for embedding tables (Lerer et al. 2019,
    "PyTorch-BigGraph: A Large-scale Graph Embedding System", SysML;
    ``torchbiggraph/row_adagrad.py``, facebookresearch/PyTorch-BigGraph@be2e21a): one accumulator
    per row of an ``(n, d)`` table instead of one per number. For each row ``i`` of a step's
    gradient ``g`` ((n, d): row-sparse, or dense, every row)::

        G_i <- G_i + mean_j g_ij^2            G: (n,), from 0
        w_i <- w_i - lr * g_i / (sqrt(G_i) + eps)

    Its state is ``n`` floats per table (Adam's is ``2 n d``), and a sparse gradient's update reads
    and writes only its ``U`` rows. ``weight_decay`` adds ``weight_decay * w_i`` to ``g_i`` for the
    rows a step updates only (PBG refuses weight decay with sparse gradients; decaying every row
    would make the step dense again). ``eps = 1e-10``, PBG's constant, added after the root.
    """

    def __init__(self, params: Any, lr: float = 0.01, eps: float = ADAGRAD_EPS, weight_decay: float = 0.0):
        if lr <= 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid RowAdagrad setting: lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowAdagrad updates (n, d) tables, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum"] = p.new_zeros(p.shape[0])                          # (n,)
                acc = state["sum"]
                if p.grad.is_sparse:
                    rows, g = _row_gradient(p, p.grad, wd)                          # (U,), (U, d)
                    if len(rows):
                        row_adagrad_(p, acc, rows, None, g, lr, 0.0, eps)           # g holds the decay
                else:
                    g = p.grad.add(p, alpha=wd) if wd else p.grad
                    acc.add_((g * g).mean(1))
                    p.addcdiv_(g, acc.sqrt().add_(eps).unsqueeze(1), value=-lr)
        return loss


class SparseAdam(torch.optim.Optimizer):
    """Adam with lazy moments, ``torch.optim.SparseAdam``'s semantics and arithmetic (bit for bit on
    the same gradients; Kingma & Ba 2015 for Adam): for the rows ``i`` of a step's row-sparse
    gradient ``g`` only, with ``t`` the steps this table took (one counter per table, as torch's)::

        m_i <- b1 m_i + (1 - b1) g_i          v_i <- b2 v_i + (1 - b2) g_i^2      m, v: (n, d)
        w_i <- w_i - lr sqrt(1 - b2^t) / (1 - b1^t) * m_i / (sqrt(v_i) + eps)

    Rows outside the batch keep their moments and weights (dense Adam moves every row on its stale
    momentum at every step). torch's version goes through ``sparse_mask`` and sparse additions;
    this one through ``index_select`` / ``index_add_`` on the ``U`` coalesced rows, which stays
    ``O(U d)`` whatever the table's size. ``weight_decay`` (torch's has none) adds
    ``weight_decay * w_i`` to ``g_i`` for the rows a step updates only.
    """

    def __init__(self, params: Any, lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr <= 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid SparseAdam setting: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)                          # (n, d)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                rows, g = _row_gradient(p, p.grad, wd)                              # (U,), (U, d)
                if not len(rows):
                    continue
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                # torch's order of operations: old += (1 - b) (new - old), the new moment rebuilt
                # from the update and the old rows rather than read back
                old_m, old_v = m.index_select(0, rows), v.index_select(0, rows)    # (U, d)
                upd_m = g.sub(old_m).mul_(1 - b1)
                m.index_add_(0, rows, upd_m)
                upd_v = g.pow(2).sub_(old_v).mul_(1 - b2)
                v.index_add_(0, rows, upd_v)
                numer = upd_m.add_(old_m)
                denom = upd_v.add_(old_v).sqrt_().add_(eps)
                step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                p.index_add_(0, rows, -step_size * numer.div_(denom))
        return loss
