"""``knowledge.embed``: train TransE / DistMult / ComplEx / RotatE on a KnowledgeGraph with Ray Train.

The stage (the driver) reads only the entity and relation tables, which it copies into its artifact,
and the triples' split column, to count them; the training job it hands to Ray Train carries the
graph artifact's URI and those counts, and each worker reads the triples from the URI itself
(:mod:`knowledge.embed`), so the config every worker receives does not grow with the graph. Its
pickled size is reported as ``job_bytes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from pipeline import Input, StageContext, StageFailed, stage
from pipeline.errors import SteleError
from pipeline.tracking import Tracker, copy_events
from pipeline.train import ScalingParams, TrainConfig, fit

from ..kg import FILES, read_table, split_counts

# Margins the families are usually trained with: TransE's ranking margin, RotatE's gamma.
DEFAULT_MARGIN = {"transe": 1.0, "distmult": 1.0, "complex": 1.0, "rotate": 9.0}


class EmbedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Literal["transe", "distmult", "complex", "rotate"] = "transe"
    dim: int = Field(default=128, ge=1, description="embedding size (complex dims for ComplEx/RotatE)")
    init: Literal["default", "normal"] = Field(
        default="default", description="initial embeddings: the PyG model's own (Xavier / uniform), "
                                       "or every real number N(0, 1) (ComplEx: real and imaginary "
                                       "parts alike), as Trouillon et al. and PyKEEN's ComplEx")
    p_norm: float = Field(default=1.0, description="TransE distance norm")
    entity_norm: float | None = Field(
        default=None, description="TransE: keep entities on the unit sphere of this norm, projected "
                                  "after every step (2: the paper's and PyKEEN's model); None: "
                                  "normalised in the distance norm inside the score, as PyG does")
    margin: float | None = Field(default=None, description="TransE ranking margin / RotatE gamma")
    loss: Literal["auto", "margin", "bce", "self_adversarial"] = Field(
        default="auto", description="auto: margin (TransE), bce (DistMult, ComplEx), "
                                    "self_adversarial (RotatE)")
    adversarial_temperature: float = 1.0
    negatives: int = Field(default=16, ge=1, description="corruptions per positive triple")
    corruption: Literal["uniform", "bernoulli"] = "uniform"
    batch_size: int = Field(default=256, ge=1)
    optimizer: Literal["adam", "adagrad", "sparse_adam", "rowwise_adagrad"] = Field(
        default="adam", description="adam, adagrad: torch's, dense: every step updates (and with "
        "several workers all-reduces) every row of every table, cost grows with the graph; "
        "sparse_adam (torch SparseAdam's lazy moments) and rowwise_adagrad (PyTorch-BigGraph's, "
        "one accumulator per row): only the rows a batch looks up are read, updated and exchanged "
        "between workers, cost follows the batch (the choice for large graphs; rowwise_adagrad "
        "also keeps 1 float per row of state instead of Adam's 2 per number)")
    lr: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=0.0, ge=0, description="L2 weight decay; with a sparse "
                                "optimizer applied to the rows each step updates only")
    regularization: float = Field(
        default=0.0, ge=0, description="weight of the Lp penalty on the embeddings each batch looks "
                                       "up (PyKEEN's LpRegularizer; its ComplEx uses 0.01)")
    regularization_p: float = Field(default=2.0, gt=0, description="p of that penalty's norm")
    epochs: int = Field(default=100, ge=1)
    eval_every: int = Field(default=10, ge=0, description="epochs between validation MRR (0: never)")
    patience: int = Field(default=3, ge=0, description="evaluations without improvement before "
                                                       "stopping (0: never stop early)")
    eval_batch_size: int = Field(default=256, ge=1)
    seed: int = 0
    scaling: ScalingParams = ScalingParams()
    partitions: int = Field(
        default=1, ge=1, description="entity partitions (PyTorch-BigGraph): 1 trains the whole table "
        "on every worker (Ray Train, DDP); P > 1 splits the entities into P partitions and the "
        "training triples into P x P buckets, trains rounds of disjoint buckets as Ray tasks "
        "(scaling.num_workers at a time), each holding only its two partitions, kept in the stage's "
        "state; needs optimizer: rowwise_adagrad (knowledge.partitioned). The weights are the best "
        "validation epoch's, as with 1 (each new best copies the partitions once), or the last "
        "epoch's without validation")
    negative_chunk: int = Field(
        default=0, ge=0, description="partitions > 1: 0 (default) draws `negatives` corruptions per "
        "positive; c > 0 uses PyTorch-BigGraph's batched negatives: each chunk of c positives shares "
        "`negatives` corrupted heads and as many tails, every positive scored against all of them "
        "(2 x negatives), a chunk at a time by one batched product or distance: far fewer rows "
        "gathered and updated per step (bench/kge_partitioned_scale.py --compare); needs corruption: "
        "uniform")
    assemble: bool = Field(
        default=True, description="partitions > 1: also write the whole tables (model.safetensors, "
        "embeddings.safetensors: N x dim floats assembled in the stage's process) beside partitions/. "
        "Turn it off when that table would not fit one process (about 4 x N x dim bytes, twice for "
        "ComplEx / RotatE): the artifact then holds partitions/ only, which knowledge.evaluate reads "
        "shard by shard; stele.load, stele export and consumers of embeddings.safetensors need it on")

    @model_validator(mode="after")
    def _assemble_needs_partitions(self) -> "EmbedParams":
        if not self.assemble and self.partitions == 1:
            raise ValueError("assemble: false needs partitions > 1 (with 1 the whole table is trained "
                             "and written as it is)")
        if self.negative_chunk and (self.partitions == 1 or self.corruption != "uniform"):
            raise ValueError("negative_chunk needs partitions > 1 and corruption: uniform (batched "
                             "negatives corrupt both sides of every positive)")
        return self

    @model_serializer(mode="wrap")
    def _drop_one_partition(self, handler: Any) -> dict[str, Any]:
        # Left out at their defaults, so the artifact keys of every stage written before the fields
        # existed stay.
        out = handler(self)
        if self.partitions == 1:
            out.pop("partitions", None)
        if self.assemble:
            out.pop("assemble", None)
        if not self.negative_chunk:
            out.pop("negative_chunk", None)
        return out


def not_assembled(folder: Path) -> str | None:
    """Why the ``knowledge.embed`` artifact at ``folder`` has no whole model, in one line (a
    ``partitions`` run with ``assemble: false``), or None when it has one."""
    from ..models import MODEL_WEIGHTS

    if (folder / MODEL_WEIGHTS).is_file() or not (folder / "partitions").is_dir():
        return None
    return (f"{folder}: this knowledge.embed artifact was trained with partitions and assemble: false, "
            f"so it holds partitions/ but no whole model ({MODEL_WEIGHTS}, embeddings.safetensors); "
            f"run knowledge.embed with assemble: true, or read partitions/ "
            f"(knowledge.partitioned_eval.load_partitioned)")


def load_trained(folder: Path):
    """The trained model of an artifact (:func:`knowledge.models.load_model`: on the CPU, in eval
    mode), for ``stele.load``."""
    from ..models import load_model  # torch: lazily

    why = not_assembled(Path(folder))
    if why:
        raise SteleError(why)
    return load_model(folder)


@stage("knowledge.embed", version="1", cpus=0, pool="train",
       headline=("best_valid_mrr", "best_epoch", "epochs", "stopped_early", "final_loss"),
       inputs={"kg": Input("knowledge.ingest", "the graph to embed (train and valid triples)")},
       loader=load_trained)
def embed(ctx: StageContext, params: EmbedParams) -> dict:
    """Train KG embeddings (PyG models, stele's loop) with early stopping on validation MRR."""
    from ..embed import DEFAULT_LOSS, EmbedJob, train_loop_per_worker  # torch: lazily

    kg_uri = (ctx.inputs.get("kg") or ctx.input).uri
    # row counts from the Parquet footers: P > 1 never holds the entity table whole
    num_entities, num_relations = _num_rows(kg_uri, "entities"), _num_rows(kg_uri, "relations")
    counts = split_counts(kg_uri)
    num_train = counts.get("train", 0)
    if num_train < params.scaling.num_workers:
        raise StageFailed(f"{num_train} training triples cannot feed {params.scaling.num_workers} "
                          "workers")
    margin = DEFAULT_MARGIN[params.model] if params.margin is None else params.margin
    model_kwargs = {"transe": {"p_norm": params.p_norm, "margin": margin,
                               **({"entity_norm": params.entity_norm} if params.entity_norm else {})},
                    "rotate": {"margin": margin}, "distmult": {}, "complex": {}}[params.model]
    job = EmbedJob(
        model=params.model, dim=params.dim, model_kwargs=model_kwargs, init=params.init,
        kg_uri=kg_uri, num_entities=num_entities, num_relations=num_relations,
        num_train=num_train, num_valid=counts.get("valid", 0), corruption=params.corruption,
        loss=DEFAULT_LOSS[params.model] if params.loss == "auto" else params.loss, margin=margin,
        adversarial_temperature=params.adversarial_temperature, negatives=params.negatives,
        batch_size=params.batch_size, optimizer=params.optimizer, lr=params.lr,
        weight_decay=params.weight_decay, regularization=params.regularization,
        regularization_p=params.regularization_p, epochs=params.epochs,
        eval_every=params.eval_every, eval_batch_size=params.eval_batch_size,
        patience=params.patience, seed=params.seed,
        # Each worker gets its share of the cores; torch's default would oversubscribe them.
        threads_per_worker=max(1, int(params.scaling.cpus_per_worker)))
    if params.partitions > 1:
        return _embed_partitioned(ctx, params, job, kg_uri)
    entities = read_table(kg_uri, "entities", ["idx", "id", "name"])
    relations = read_table(kg_uri, "relations", ["idx", "id", "name"])
    train_cfg = TrainConfig(**params.scaling.model_dump(), max_steps=params.epochs,
                            checkpoint_every=max(1, params.eval_every or 10), seed=params.seed)
    ctx.log.info("training %s dim %d on %d triples (%d entities) with %d worker(s)", params.model,
                 params.dim, num_train, num_entities, params.scaling.num_workers)
    result = fit(train_loop_per_worker, job, train_cfg, storage_uri=ctx.state_uri, name="embed",
                 progress=ctx.progress_reporter(), progress_desc="epoch",
                 tracking=ctx.tracking)

    from safetensors.torch import load_file, save_file

    from ..models import build_model, save_model

    model = build_model(params.model, num_entities, num_relations, params.dim, **model_kwargs)
    state = load_file(str(result.checkpoint_dir / "model.safetensors"))
    extra = result.checkpoint_dir / "extra.safetensors"
    best = {k[5:]: v for k, v in load_file(str(extra)).items()} if extra.exists() else {}
    model.load_state_dict(best or state)  # the best validation weights when there are any
    save_model(ctx.out, model)
    ent, rel = _embedding_tables(model)
    save_file({"entity": ent, "relation": rel}, str(ctx.out / "embeddings.safetensors"))
    pq.write_table(entities, ctx.out / "entities.parquet")
    pq.write_table(relations, ctx.out / "relations.parquet")
    hist = result.history
    (ctx.out / "history.json").write_text(json.dumps(hist, indent=1))
    _plot(hist, ctx.out / "training.png", params.model)
    result.save_tensorboard(ctx.out / "tb")  # streamed while it trained
    evals = [h for h in hist if "valid_mrr" in h]
    best_row = max(evals, key=lambda h: h["valid_mrr"]) if evals else None
    return {"epochs": result.step, "stopped_early": result.stopped,
            "final_loss": hist[-1]["loss"] if hist else None,
            "best_valid_mrr": best_row["valid_mrr"] if best_row else None,
            "best_epoch": best_row["step"] if best_row else None,
            "weights": "best validation" if best else "last epoch",
            "train_loop_s": round(sum(h.get("epoch_s", 0.0) for h in hist), 3),
            "num_workers": params.scaling.num_workers, "job_bytes": result.job_bytes}


def _num_rows(kg_uri: str, name: str) -> int:
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(kg_uri))
    with fs.open(f"{root.rstrip('/')}/{FILES[name]}", "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _copy_columns(kg_uri: str, name: str, columns: list[str], path: Path) -> None:
    """``columns`` of the graph's table ``name`` into ``path``, one record batch at a time."""
    import fsspec
    import pyarrow as pa

    fs, root = fsspec.core.url_to_fs(str(kg_uri))
    with fs.open(f"{root.rstrip('/')}/{FILES[name]}", "rb") as f:
        src = pq.ParquetFile(f)
        schema = src.schema_arrow
        with pq.ParquetWriter(path, pa.schema([schema.field(c) for c in columns])) as w:
            for batch in src.iter_batches(columns=columns):
                w.write_batch(batch)


def _embed_partitioned(ctx: StageContext, params: EmbedParams, job, kg_uri: str) -> dict:  # noqa: ANN001
    """``partitions > 1``: :func:`knowledge.partitioned_eval.fit_partitioned` (buckets and partition
    files in the stage's state). The artifact holds ``partitions/``, the form that scales: the
    partition files (``part-<p>.safetensors``: ``node_emb`` (n_p, d) and its row-wise Adagrad
    accumulator; ``relations.safetensors``), ``partitioning.parquet`` (``idx``, ``partition``,
    ``offset``: entity ``idx`` is row ``offset`` of partition ``partition``) and ``model.json``
    (the spec); with ``assemble`` (the default) also the files of ``partitions: 1`` (the tables
    assembled from the partitions, which then must fit this process). The weights are the best
    validation epoch's (the last epoch's without validation). The entity ids are hashed from their
    Arrow column a chunk at a time and the tables copied one record batch at a time, so without
    ``assemble`` nothing here holds an ``(N, d)`` table or ``N`` Python objects. A killed run
    resumes from the state's last committed round of buckets (:mod:`knowledge.partitioned_state`)
    with the same result."""
    from ..partitioned_eval import fit_partitioned

    if params.partitions > job.num_entities:
        raise StageFailed(f"partitions: {params.partitions} exceeds the graph's {job.num_entities} entities")
    if params.optimizer != "rowwise_adagrad":
        raise StageFailed(f"partitions: {params.partitions} trains with row-wise Adagrad (PyTorch-"
                          f"BigGraph's optimiser): set optimizer: rowwise_adagrad, not {params.optimizer}")
    ctx.log.info("training %s dim %d on %d triples (%d entities) in %d partitions with %d worker(s)",
                 params.model, params.dim, job.num_train, job.num_entities, params.partitions,
                 params.scaling.num_workers)
    # Live, as at partitions: 1: each epoch's row to TensorBoard under the state and to MLflow when
    # asked for. A resumed attempt starts its events after the last committed epoch (those past it,
    # streamed by the killed attempt, are purged) and continues the same MLflow run.
    tb = f"{ctx.state_uri.rstrip('/')}/tensorboard"
    tracker: list[Tracker] = []

    def on_row(row: dict[str, float], earlier: list[dict[str, float]]) -> None:
        if not tracker:
            done = int(earlier[-1]["step"]) if earlier else 0
            tracker.append(Tracker(tb, ctx.tracking.start(tb) if ctx.tracking else None, done))
        tracker[0].add(row)
        tracker[0].flush()

    ids = read_table(kg_uri, "entities", ["id"])["id"]       # Arrow: no Python object per entity
    run = fit_partitioned(job, ids, params.partitions, f"{ctx.state_uri.rstrip('/')}/partitioned",
                          params.scaling.num_workers, params.scaling.cpus_per_worker, on_row,
                          negative_chunk=params.negative_chunk)
    del ids
    if tracker:
        tracker[0].flush(final=True)
    copy_events(tb, ctx.out / "tb")
    if params.assemble:
        from safetensors.torch import save_file

        from ..models import save_model

        model = run.assemble()
        save_model(ctx.out, model)
        ent, rel = _embedding_tables(model)
        save_file({"entity": ent, "relation": rel}, str(ctx.out / "embeddings.safetensors"))
        del model, ent, rel
    _copy_columns(kg_uri, "entities", ["idx", "id", "name"], ctx.out / "entities.parquet")
    _copy_columns(kg_uri, "relations", ["idx", "id", "name"], ctx.out / "relations.parquet")
    run.save_partitions(ctx.out / "partitions")
    hist = run.history
    (ctx.out / "history.json").write_text(json.dumps(hist, indent=1))
    _plot(hist, ctx.out / "training.png", params.model)
    evals = [h for h in hist if "valid_mrr" in h]
    best_row = max(evals, key=lambda h: h["valid_mrr"]) if evals else None
    return {"epochs": hist[-1]["step"] if hist else 0, "stopped_early": run.stopped,
            "final_loss": hist[-1]["loss"] if hist else None,
            "best_valid_mrr": best_row["valid_mrr"] if best_row else None,
            "best_epoch": best_row["step"] if best_row else None,
            "weights": "best validation" if run.best_epoch is not None else "last epoch",
            "assembled": params.assemble,
            "train_loop_s": round(sum(h.get("epoch_s", 0.0) for h in hist), 3),
            "num_workers": params.scaling.num_workers, "partitions": params.partitions,
            "buckets": int((run.counts > 0).sum())}


def _embedding_tables(model):  # noqa: ANN001, ANN202
    """Entity and relation vectors for downstream models (ERNIE's entity inputs): complex models
    give ``[real, imaginary]`` concatenated."""
    import torch

    ent = model.node_emb.weight.detach()
    rel = model.rel_emb.weight.detach()
    if hasattr(model, "node_emb_im"):
        ent = torch.cat([ent, model.node_emb_im.weight.detach()], dim=1)
    if hasattr(model, "rel_emb_im"):
        rel = torch.cat([rel, model.rel_emb_im.weight.detach()], dim=1)
    return ent.contiguous(), rel.contiguous()


def _plot(hist: list[dict], path, model: str) -> None:  # noqa: ANN001
    """The training loss, smoothed by a centred moving average over about 5% of the epochs once
    there are enough of them to be noisy, the raw values faint behind it; the validation MRR on its
    own axis; one legend for both, outside the axes, where it hides no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.plots import smoothed_curve

    fig, a = plt.subplots(figsize=(7, 3.4), layout="constrained")
    rows = [h for h in hist if h.get("loss") is not None]
    w = smoothed_curve(a, [h["step"] for h in rows], [h["loss"] for h in rows], color="C0")
    a.lines[-1].set_label(f"training loss (mean of {w} epochs; raw faint)" if w > 1 else "training loss")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.grid(alpha=0.3)
    evals = [h for h in hist if "valid_mrr" in h]
    if evals:
        b = a.twinx()
        b.plot([h["step"] for h in evals], [h["valid_mrr"] for h in evals], "o-", color="C1",
               label="valid filtered MRR")
        b.set_ylabel("valid MRR")
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    a.set_title(f"{model}: training curve (numbers in history.json)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
