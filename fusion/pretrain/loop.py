"""Pretraining any fusion encoder with Ray Train: recipes, the per-worker loop, and the data they share.

A *recipe* says how one model family pretrains; it is one registered class (entry-point group
``stele.recipes``), so a new encoder needs no edit to the loop::

    @recipe("ernie")
    class Ernie(Recipe):
        needs = ("text", "entities")          # input artifact roles
        Options = ErnieOptions                # its own validated options
        def resources(self, inputs, options): ...          # stage process, once: small things only
        def encoder(self, inputs, options, tokenizer, max_length): ...  # each encoding actor, once
        def encode_docs(self, state, docs): ...            # actors: documents -> example rows
        def build(self, backbone, resources, options): ... # worker: the model (has .loss)
        def collate(self, backbone, rows, resources, options, max_length): ...  # worker: a batch

The examples never pass through the stage's process: Ray Data actors encode the input into a
corpus of Parquet parts and each worker streams its own share (:mod:`fusion.pretrain.corpus`).
The model a recipe builds has ``loss(batch, generator) -> {"total": ..., <objective>: ...}``; the
loop wraps it so DDP sees ``forward``, accumulates gradients over ``grad_accum`` micro-batches,
clips them, steps AdamW with linear warm-up and decay, and reports every objective's loss per step
through :class:`pipeline.train.TrainSession` (checkpoints, exact resume with the data position,
bf16 autocast).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pipeline.registry import Registry

from fusion.pretrain.corpus import Corpus, CorpusStream, read_linked_docs, text_units


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Recipe:
    """How one fusion model pretrains (see the module docstring). ``inputs`` map each input role
    to its artifact's URI (any node reads them)."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ("text",)
    Options: ClassVar[type[BaseModel]] = NoOptions

    # -- stage process (small things only) ------------------------------------------------------
    def resources(self, inputs: dict[str, str], options: BaseModel) -> dict[str, Any]:
        """What every worker needs besides its examples, built once: sizes, names, and shared
        tables *by reference* (an artifact URI the worker loads once), never per-example data.
        Travels in the training config."""
        return {}

    def fingerprint(self, options: BaseModel) -> Any:
        """The state of files the options name besides the input artifacts (SentiLR's lexicon),
        for the stage's cache key (:func:`pipeline.uris.input_fingerprint`); None: nothing."""
        return None

    def units(self, inputs: dict[str, str], options: BaseModel, limit: int | None) -> list[dict]:
        """The slices of the input that actors encode one at a time (small descriptors): by
        default the linked documents of the ``text`` input, ``limit`` of them at most."""
        return text_units(inputs["text"], limit)

    def finish(self, resources: dict[str, Any], counts: dict[str, int]
               ) -> tuple[dict[str, Any], dict[str, int]]:
        """``(resources, counts for the manifest)`` once the corpus is encoded, from the counts
        summed over its units (K-Adapter derives its label set here)."""
        return resources, counts

    def save_files(self, resources: dict[str, Any], options: BaseModel, out: Path) -> None:
        """Write into the artifact folder ``out`` what fine-tuning needs besides the model, once
        the model is saved (SentiLR: the lexicon it read, so no later stage re-reads its source)."""

    # -- encoding actors -------------------------------------------------------------------------
    def encoder(self, inputs: dict[str, str], options: BaseModel, tokenizer: Any,
                max_length: int) -> Any:
        """Built once per encoding actor: whatever :meth:`encode_docs` needs (indices, lookups)."""
        return {"tokenizer": tokenizer, "max_length": max_length}

    def encode(self, state: Any, inputs: dict[str, str], unit: dict) -> tuple[list[dict], Counter]:
        """One unit -> example rows (plain lists and numbers, one Parquet row each) and counts
        for the manifest (summed over units)."""
        return self.encode_docs(state, read_linked_docs(inputs["text"], unit))

    def encode_docs(self, state: Any, docs: list[dict]) -> tuple[list[dict], Counter]:
        """Linked documents (``{"id", "text", "mentions": [(start, end, entity_id)]}``) -> rows."""
        raise NotImplementedError

    # -- training workers ------------------------------------------------------------------------
    def keep(self, resources: dict[str, Any], options: BaseModel) -> Callable[[dict], bool] | None:
        """A filter on rows the workers read (None: train on every row)."""
        return None

    def group(self, options: BaseModel) -> Callable[[dict], Any] | None:
        """A row's group key, where batches should hold whole groups (hard in-batch negatives:
        :func:`~fusion.pretrain.corpus.grouped_order`); None: no grouping."""
        return None

    def length(self, row: dict) -> int:
        """A row's length for length bucketing (its tokens; 0: all alike, no bucketing gain)."""
        return len(row["input_ids"]) if "input_ids" in row else 0

    def build(self, backbone: Any, resources: dict[str, Any], options: BaseModel) -> Any:
        raise NotImplementedError

    def initialize(self, model: Any, resources: dict[str, Any]) -> None:
        """Before training only (never when an artifact's model is rebuilt): start ``model`` from
        other weights than :meth:`build`'s, e.g. a re-ranker from its first stage's. A model may
        also define ``param_groups(lr)`` for AdamW (per-group learning rates)."""

    def collate(self, backbone: Any, rows: list[dict], resources: dict[str, Any],
                options: BaseModel, max_length: int) -> dict[str, Any]:
        """One micro-batch from encoded rows; must include ``n_tokens`` (real tokens, for tokens/s)."""
        raise NotImplementedError


RECIPES: Registry[type[Recipe]] = Registry(group="stele.recipes", kind="pretraining recipe",
                                           qualname=lambda c: f"{c.__module__}.{c.__qualname__}")


def recipe(name: str):
    def deco(cls: type[Recipe]) -> type[Recipe]:
        cls.name = name
        return RECIPES.register(name, cls)

    return deco


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
    resources: dict[str, Any]  # the recipe's resources(): small, shared tables by reference
    corpus_uri: str            # the encoded examples (each worker reads corpus.json itself)
    max_length: int
    batch_size: int            # examples per micro-batch per worker
    bucket_batches: int        # micro-batches sorted by length together (1: no bucketing)
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
    rec.initialize(model, job.resources)  # before a checkpoint (if any) is restored over it
    import ray.train.torch

    device = ray.train.torch.get_device()
    objective = _Objective(model).to(device)  # on its device first: the fused AdamW wants that
    trainable = [p for p in objective.parameters() if p.requires_grad]
    groups = model.param_groups(job.lr) if hasattr(model, "param_groups") else trainable
    opt = torch.optim.AdamW(groups, lr=job.lr, weight_decay=job.weight_decay,
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(job.warmup_steps, job.steps))
    session = TrainSession(objective, opt, sched, config, data_state={"epoch": 0, "cursor": 0},
                           ddp_kwargs={"find_unused_parameters": True})
    corpus = Corpus.load(job.corpus_uri)
    if corpus is None:
        raise RuntimeError(f"no complete corpus at {job.corpus_uri}")
    stream = CorpusStream(corpus, job.seed, session.rank, session.world_size,
                          session.data_state, keep=rec.keep(job.resources, options),
                          length=rec.length, batch=job.batch_size, bucket=job.bucket_batches,
                          group=rec.group(options))
    bs, accum = job.batch_size, session.train.grad_accum
    gen = torch.Generator(device=session.device)   # the models draw masks on the batch's device

    flops_per_position: float | None = None  # measured once, on the first micro-batch
    peak = peak_tflops(session.device)
    for step in session.steps():
        t0 = time.perf_counter()
        first = flops_per_position is None   # this process's first step: loading, compiling, counting
        # Masking draws from a stream seeded by (seed, rank, step): a resumed run masks exactly
        # as the uninterrupted one would have.
        gen.manual_seed(int(np.random.SeedSequence([job.seed, session.rank, step]).generate_state(1)[0]))
        totals: dict[str, float] = {}
        tokens = positions = 0
        for _ in range(accum):
            batch = rec.collate(backbone, stream.batch(bs), job.resources, options, job.max_length)
            tokens += int(batch.pop("n_tokens"))
            shape = _positions(batch)
            positions += shape
            batch = {k: v.to(session.device) if hasattr(v, "to") else v for k, v in batch.items()}
            objective.generator = gen
            if flops_per_position is None:
                flops_per_position = _count_flops(objective, batch, trainable, session) / max(1, shape)
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
                        "flops": (flops_per_position or 0.0) * positions * session.world_size,
                        **({"peak_tflops": peak} if peak else {}), **({"first_step": 1} if first else {}),
                        "step_s": time.perf_counter() - t0})


# Dense bf16 peak of the cards MFU is computed for (the vendors' datasheets, without sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of ``device`` when it is a known GPU (None on CPUs: no agreed peak)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _positions(batch: dict[str, Any]) -> int:
    """Sequence positions the model computes on (padding included): every ``*mask`` tensor's
    (B, L) elements, text and regions alike."""
    return sum(int(v.shape[0] * v.shape[1]) for k, v in batch.items()
               if k.endswith("mask") and isinstance(v, torch.Tensor) and v.dim() == 2)


def _count_flops(objective: torch.nn.Module, batch: dict[str, Any], params: list[torch.Tensor],
                 session: Any) -> float:
    """Model FLOPs of one forward + backward of ``objective`` (the eager model) on ``batch``: matmuls
    and attention, what MFU counts, by ``torch.utils.flop_counter``. Counted once per run and
    scaled per step by its positions (attention's share grows with the length, so the figure is
    close, not exact, when lengths vary).

    A pass of its own that changes nothing: the random streams (the global ones and the masking
    generator) are restored after it and the gradients are returned, not accumulated, so no DDP
    hook fires. Not inside the training step, because a compiled model first called under the
    counter stays eager for good (dynamo skips the code it was called in)."""
    from torch.utils.flop_counter import FlopCounterMode

    state = objective.generator.get_state()
    devices = [session.device] if session.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
        with session.autocast():
            loss = objective(batch)["total"]
        torch.autograd.grad(loss, params, allow_unused=True)
    objective.generator.set_state(state)
    return float(counter.get_total_flops())


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


def per_second(history: list[dict[str, Any]], key: str = "tokens") -> float | None:
    """``key`` (tokens, flops) per second over the run, skipping the first step of each worker
    process (``first_step``: warm-up allocations, compiling, the FLOP count), step 1 and the first
    step after each resume; step 1 alone in a history written without the flag."""
    marked = any("first_step" in h for h in history)
    rows = [h for h in history if not h.get("first_step")] if marked else history[1:]
    rows = rows or history
    t = sum(h.get("step_s", 0.0) for h in rows)
    return sum(h.get(key, 0.0) for h in rows) / t if t > 0 else None


def mean_loss(history: list[dict[str, Any]], key: str, last: int = 10) -> float | None:
    vals = [h[key] for h in history[-last:] if key in h and math.isfinite(h[key])]
    return sum(vals) / len(vals) if vals else None
