"""Pretraining any fusion encoder with Ray Train: recipes, the per-worker loop, and the data they share.

A *recipe* says how one model family pretrains; it is one registered class (entry-point group
``stele.recipes``), so a new encoder needs no edit to the loop::

    @recipe("ernie")
    class Ernie(Recipe):
        needs = ("text", "entities")          # input artifact roles
        Options = ErnieOptions                # its own validated options
        def prepare(self, inputs, options, docs, backbone, max_length): ...  # driver, once
        def build(self, backbone, resources, options): ...       # worker: the model (has .loss)
        def collate(self, backbone, examples, resources, options, max_length): ...  # a batch

The model a recipe builds has ``loss(batch, generator) -> {"total": ..., <objective>: ...}``; the loop
wraps it so DDP sees ``forward``, accumulates gradients over ``grad_accum`` micro-batches, clips them,
steps AdamW with linear warm-up and decay, and reports every objective's loss per step through
:class:`pipeline.train.TrainSession` (checkpoints, exact resume with the data position, bf16 on GPU).

Examples come from a ``knowledge.link`` artifact: documents with their linked mentions, as character
spans with the entity's id. Each worker reads its own shard of a per-epoch permutation, so N workers
see disjoint data and the order is reproducible from the seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict

from pipeline.registry import Registry


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Recipe:
    """How one fusion model pretrains (see the module docstring)."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ("text",)
    Options: ClassVar[type[BaseModel]] = NoOptions

    def prepare(self, inputs: dict[str, Path], options: BaseModel, examples: list[dict],
                backbone: Any, max_length: int) -> tuple[list, dict[str, Any], dict[str, Any]]:
        """Driver side, once: ``(training examples, resources shipped to every worker, counts for
        the manifest)``. ``examples`` are the linked documents; a recipe may turn them into its own
        examples (sentence pairs, typed mentions). Resources travel in the training config: keep
        them small (tensors, lists)."""
        return examples, {}, {}

    def build(self, backbone: Any, resources: dict[str, Any], options: BaseModel) -> Any:
        raise NotImplementedError

    def collate(self, backbone: Any, examples: list[dict], resources: dict[str, Any],
                options: BaseModel, max_length: int) -> dict[str, Any]:
        """One micro-batch from examples; must include ``n_tokens`` (real tokens, for tokens/s)."""
        raise NotImplementedError


RECIPES: Registry[type[Recipe]] = Registry(group="stele.recipes", kind="pretraining recipe",
                                           qualname=lambda c: f"{c.__module__}.{c.__qualname__}")


def recipe(name: str):
    def deco(cls: type[Recipe]) -> type[Recipe]:
        cls.name = name
        return RECIPES.register(name, cls)

    return deco


# ---------------------------------------------------------------------------------------- data
def load_linked_docs(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """``[{"id", "text", "mentions": [(start, end, entity_id), ...]}]`` from a ``knowledge.link``
    artifact, in document order (documents without mentions included: MLM still learns from them)."""
    docs = pq.read_table(path / "docs.parquet", columns=["doc_id", "text"])
    if limit is not None:
        docs = docs.slice(0, limit)
    out = [{"id": i, "text": t, "mentions": []}
           for i, t in zip(docs["doc_id"].to_pylist(), docs["text"].to_pylist())]
    index = {d["id"]: d for d in out}
    m = pq.read_table(path / "mentions.parquet", columns=["doc_id", "start", "end", "entity_id"])
    for doc_id, s, e, ent in zip(*(m[c].to_pylist() for c in ("doc_id", "start", "end", "entity_id"))):
        if doc_id in index:
            index[doc_id]["mentions"].append((s, e, ent))
    return out


def shard_order(n: int, epoch: int, seed: int, rank: int, world: int) -> np.ndarray:
    """This rank's example indices for ``epoch``: a seeded permutation, every world-th item."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank::world]


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


# ------------------------------------------------------------------------------------ the loop
@dataclass(frozen=True)
class PretrainJob:
    """What each worker of :func:`train_loop_per_worker` needs, built once by ``fusion.pretrain``."""

    recipe_cls: type[Recipe]   # the class itself: plugins need no registry lookup in workers
    backbone: str              # local folder or package:..., loaded by every worker
    options: BaseModel         # the recipe's validated options
    resources: dict[str, Any]  # what the recipe's prepare() built once (entity table, vocabularies)
    examples: list[Any]
    max_length: int
    batch_size: int            # examples per micro-batch per worker
    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    seed: int
    threads_per_worker: int


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker; its settings are ``config["job"]``, a
    :class:`PretrainJob`); see the module docstring."""
    from pipeline.train import TrainSession

    from fusion.models.backbone import load_backbone

    job: PretrainJob = config["job"]
    torch.set_num_threads(job.threads_per_worker)
    rec, options = job.recipe_cls(), job.options
    torch.manual_seed(job.seed)  # the new layers' initialisation is the same on every rank
    backbone = load_backbone(job.backbone)
    model = rec.build(backbone, job.resources, options)
    objective = _Objective(model)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=job.lr, weight_decay=job.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(job.warmup_steps, job.steps))
    session = TrainSession(objective, opt, sched, config, data_state={"epoch": 0, "cursor": 0},
                           ddp_kwargs={"find_unused_parameters": True})
    examples = job.examples
    bs, accum = job.batch_size, session.train.grad_accum
    gen = torch.Generator().manual_seed(job.seed * 1000 + session.rank)
    if session.resumed_from:  # the masking stream continues where it was, not from the start
        gen.manual_seed(job.seed * 1000 + session.rank + 7919 * session.step)

    def micro_batches() -> Iterator[list[dict]]:
        while True:
            st = session.data_state
            order = shard_order(len(examples), st["epoch"], job.seed, session.rank,
                                session.world_size)
            while st["cursor"] + bs <= len(order):
                idx = order[st["cursor"]:st["cursor"] + bs]
                st["cursor"] += bs
                yield [examples[i] for i in idx]
            st["epoch"], st["cursor"] = st["epoch"] + 1, 0

    batches = micro_batches()
    for _ in session.steps():
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        tokens = 0
        for _ in range(accum):
            batch = rec.collate(backbone, next(batches), job.resources, options, job.max_length)
            tokens += int(batch.pop("n_tokens"))
            batch = {k: v.to(session.device) if hasattr(v, "to") else v for k, v in batch.items()}
            objective.generator = gen
            with session.autocast():
                losses = session.model(batch)
            (losses["total"] / accum).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, job.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        session.report({**{f"loss_{k}": v for k, v in totals.items()},
                        "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "tokens": tokens * session.world_size,
                        "step_s": time.perf_counter() - t0})


class _Objective(torch.nn.Module):
    """The recipe's model with ``forward = loss``, so DDP synchronises its gradients."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.generator: torch.Generator | None = None

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model.loss(batch, self.generator)


def build_pretrained(path: str | Path, backbone: Any, resources: dict[str, Any]
                     ) -> tuple[Recipe, BaseModel, torch.nn.Module]:
    """``(recipe, options, model)`` of a ``fusion.pretrain`` artifact: the model rebuilt by its
    recipe's own ``build`` (from ``recipe.json``'s recipe and options, ``backbone`` and
    ``resources``) and loaded from ``model.safetensors`` (every tensor, right shapes; safetensors'
    ``load_model`` restores tied weights such as the MLM decoder). The one way every consumer of a
    pretrain artifact gets its model back."""
    import json

    from safetensors.torch import load_model

    from pipeline import StageFailed

    path = Path(path)
    meta = json.loads((path / "recipe.json").read_text())
    rec = RECIPES.get(meta["recipe"])()
    options = rec.Options.model_validate(meta["options"])
    model = rec.build(backbone, resources, options)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise StageFailed(f"{path}/model.safetensors does not fit recipe {meta['recipe']!r} with "
                          f"options {meta['options']}: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return rec, options, model


def load_pretrained(path: str | Path) -> tuple[Recipe, BaseModel, Any, torch.nn.Module, dict]:
    """``(recipe, options, backbone, model in eval mode, recipe.json)`` of a ``fusion.pretrain``
    artifact, for recipes whose model needs only the scalar resources ``recipe.json`` keeps (the
    multimodal ones; ``fusion.finetune`` gives ERNIE its entity table through
    :func:`build_pretrained`)."""
    import json

    from fusion.models.backbone import artifact_backbone

    path = Path(path)
    meta = json.loads((path / "recipe.json").read_text())
    backbone = artifact_backbone(path)
    rec, options, model = build_pretrained(path, backbone, meta.get("resources_meta", {}))
    return rec, options, backbone, model.eval(), meta


def tokens_per_second(history: list[dict[str, Any]]) -> float | None:
    """Training throughput over the run, skipping step 1 (it includes warm-up allocations)."""
    rows = history[1:] or history
    t = sum(h.get("step_s", 0.0) for h in rows)
    return sum(h.get("tokens", 0.0) for h in rows) / t if t > 0 else None


def mean_loss(history: list[dict[str, Any]], key: str, last: int = 10) -> float | None:
    vals = [h[key] for h in history[-last:] if key in h and math.isfinite(h[key])]
    return sum(vals) / len(vals) if vals else None
