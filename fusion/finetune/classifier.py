"""The classifier ``fusion.finetune`` trains on top of a span encoder, and its training loop.

Heads: typing is a linear map on the span vector; relations a linear map on ``[f(head) ; f(tail)]``
(K-Adapter's relation head). ``train_encoder: false`` turns every encoder into a linear probe (only
the head trains); pretraining heads (MLM, dEA, the K-Adapter task head) are not used. Training:
AdamW, linear warm-up then decay, a fixed number of epochs (or optimizer steps), no early stopping
(so there is no validation split to tune on). The data are small (thousands of examples), so the
loop is plain torch in the stage process, no Ray Train.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from fusion.finetune.encoders import SpanEncoder
from fusion.finetune.examples import TaskExample


class SpanClassifier:
    """``logits = W [f(span_1) ; ... ; f(span_S)] + b`` after dropout: typing (S = 1) and relations
    (S = 2, the K-Adapter paper's ``[head ; tail]``)."""

    def __init__(self, encoder: SpanEncoder, num_spans: int, num_labels: int, dropout: float = 0.1):
        from torch import nn

        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout),
                                  nn.Linear(num_spans * encoder.feature_size, num_labels))

    def __call__(self, batch: dict[str, Any]) -> Any:
        return self.head(self.encoder(batch).flatten(1))       # (B, S, F) -> (B, S*F) -> (B, C)

    def to(self, device: Any) -> "SpanClassifier":
        self.encoder.module.to(device)
        self.head.to(device)
        return self

    def train(self, mode: bool = True) -> "SpanClassifier":
        self.encoder.module.train(mode)
        self.head.train(mode)
        return self

    def parameters(self) -> list[Any]:
        """What fine-tuning updates: the head and the encoder's trainable parameters."""
        return [*self.head.parameters(), *self.encoder.parameters()]

    def __repr__(self) -> str:
        lin = self.head[1]
        return (f"SpanClassifier(num_labels={lin.out_features}, features={lin.in_features}, "
                f"encoder={self.encoder!r})")


# ------------------------------------------------------------------------------------ the loop
def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Any]:
    import numpy as np

    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


@dataclass(frozen=True)
class TrainSettings:
    """What :func:`train_classifier` needs of the stage's parameters (``FinetuneParams``)."""

    batch_size: int
    steps: int | None
    epochs: int
    lr: float
    head_lr: float | None
    weight_decay: float
    warmup_share: float
    max_grad_norm: float
    seed: int

    @classmethod
    def of(cls, params: Any) -> TrainSettings:
        return cls(**{f.name: getattr(params, f.name) for f in fields(cls)})


def train_classifier(model: Any, examples: Sequence[TaskExample], labels: Sequence[str],
                     params: TrainSettings, device: Any,
                     progress: Callable[[int, int], None] | None = None,
                     on_step: Callable[[dict], None] | None = None) -> tuple[list[dict], float]:
    """AdamW (encoder at ``lr``, head at ``head_lr``), linear warm-up and decay, gradient clipping,
    cross-entropy; ``steps`` optimizer steps or ``epochs`` passes (the last batch of a pass may be
    smaller). ``on_step`` sees each step's history row as it is made (live tracking). Returns the
    per-step history and the seconds spent."""
    import torch
    import torch.nn.functional as F

    from fusion.pretrain.loop import lr_lambda

    label_idx = {label: i for i, label in enumerate(labels)}
    per_epoch = math.ceil(len(examples) / params.batch_size)
    total = params.steps or params.epochs * per_epoch
    head = list(model.head.parameters())
    body = model.encoder.parameters()  # only those fine-tuning updates
    groups = [{"params": head, "lr": params.head_lr or params.lr}]
    if body:
        groups.append({"params": body, "lr": params.lr})
    opt = torch.optim.AdamW(groups, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(round(params.warmup_share * total), total))
    model.to(device).train()
    history: list[dict] = []
    t0 = time.perf_counter()
    step, epoch = 0, 0
    while step < total:
        for idx in _batches(len(examples), params.batch_size, params.seed, epoch):
            if step >= total:
                break
            chunk = [examples[i] for i in idx]
            batch = {k: v.to(device) for k, v in model.encoder.collate(chunk).items()}
            y = torch.tensor([label_idx[ex.label] for ex in chunk], device=device)
            loss = F.cross_entropy(model(batch), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head + body, params.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "epoch": epoch, "loss": loss.item(),
                            "lr": sched.get_last_lr()[-1]})
            if on_step is not None:
                on_step(history[-1])
            if progress is not None:
                progress(step, total)
        epoch += 1
    return history, time.perf_counter() - t0


def predict(model: Any, examples: Sequence[TaskExample], labels: Sequence[str], batch_size: int,
            device: Any) -> tuple[list[str], float]:
    """The predicted label of every example (eval mode, no gradients) and the seconds spent."""
    import torch

    model.to(device).train(False)
    out: list[str] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = model.encoder.collate(examples[i:i + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            out += [labels[j] for j in model(batch).argmax(-1).tolist()]
    return out, time.perf_counter() - t0


def mean_or_none(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
