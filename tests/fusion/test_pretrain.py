"""``fusion.pretrain`` under Ray Train: the plain-MLM recipe learns, the artifact is complete, and a
run whose worker dies mid-way resumes from its checkpoint and ends at the same step count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import BaseModel

from fusion.models.backbone import load_backbone
from fusion.pretrain.loop import RECIPES, lr_lambda, per_second, recipe
from fusion.pretrain.recipes import PlainMLM
from fusion.pretrain.stage import PretrainParams
from knowledge.stages.link import DOC_SCHEMA, MENTION_SCHEMA

from .conftest import run_pretrain

SENTENCES = [
    "tim cook is visiting beijing now", "beijing is the capital of china",
    "apple was founded by steve jobs", "paris is the capital of france",
    "london is a city in england", "berlin is the capital of germany",
    "the dog and the cat are animals", "he was born in paris",
]


@pytest.fixture(scope="module")
def linked(tmp_path_factory) -> Path:
    """A knowledge.link artifact: 32 short documents, "beijing" linked where it occurs."""
    d = tmp_path_factory.mktemp("link")
    docs = [(f"d{i}", SENTENCES[i % len(SENTENCES)]) for i in range(32)]
    pq.write_table(pa.table({"doc_id": [i for i, _ in docs], "text": [t for _, t in docs],
                             "n_mentions": [int("beijing" in t) for _, t in docs]},
                            schema=DOC_SCHEMA), d / "docs.parquet")
    rows = [(i, t.index("beijing"), t.index("beijing") + 7) for i, t in docs if "beijing" in t]
    pq.write_table(pa.table({"doc_id": [r[0] for r in rows], "start": [r[1] for r in rows],
                             "end": [r[2] for r in rows], "surface": ["beijing"] * len(rows),
                             "entity_idx": [0] * len(rows), "entity_id": ["t:beijing"] * len(rows),
                             "score": [1.0] * len(rows), "n_candidates": [1] * len(rows)},
                            schema=MENTION_SCHEMA), d / "mentions.parquet")
    return d


def _run(tmp: Path, linked: Path, **params) -> tuple[dict, Path]:
    return run_pretrain(tmp, "pt", {"text": linked}, params)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(warmup=4, total=10)
    assert [round(f(s), 3) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.833, 0.667, 0.5,
                                                   0.333, 0.167]
    assert f(10) == 0.0


def test_throughput_leaves_out_the_first_step_of_each_worker_process():
    hist = [{"tokens": 100, "step_s": 10.0, "first_step": 1}, {"tokens": 100, "step_s": 1.0},
            {"tokens": 100, "step_s": 3.0, "first_step": 1}, {"tokens": 300, "step_s": 1.0}]
    assert per_second(hist) == 200.0
    assert per_second([{"tokens": 100, "step_s": 10.0}, {"tokens": 50, "step_s": 1.0}]) == 50.0  # unmarked


def test_unknown_recipe_is_a_validation_error():
    with pytest.raises(ValueError, match="unknown pretraining recipe 'ernei'"):
        PretrainParams.model_validate({"recipe": "ernei"})


def test_plain_mlm_pretraining_learns_and_writes_a_complete_artifact(ray_local, tmp_path,
                                                                     backbone_dir, linked):
    metrics, out = _run(tmp_path, linked, recipe="mlm", backbone=str(backbone_dir), steps=80,
                        batch_size=8, lr=5e-3, warmup_steps=4, checkpoint_every=40, max_length=16)
    hist = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in hist] == list(range(1, 81))
    assert metrics["loss_mlm_last10"] < 0.6 * metrics["loss_mlm_first"]  # it memorises 8 sentences
    assert metrics["tokens_per_s"] > 0 and metrics["documents"] == metrics["examples"] == 32
    for f in ("model.safetensors", "recipe.json", "losses.png", "tokenizer/tokenizer.json"):
        assert (out / f).exists(), f
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the weights load back into the recipe's model
    from safetensors.torch import load_model

    model = PlainMLM().build(load_backbone(str(backbone_dir)), {}, None)
    load_model(model, str(out / "model.safetensors"))  # strict: every weight is there


def test_compile_is_left_out_of_the_key_when_off():
    assert "compile" not in PretrainParams().model_dump(mode="json")   # keys of older artifacts stay
    assert PretrainParams(compile="default").model_dump(mode="json")["compile"] == "default"
    with pytest.raises(ValueError, match="compile"):
        PretrainParams.model_validate({"compile": "fast"})


def test_a_compiled_model_trains_as_the_eager_one(ray_local, tmp_path, tokenizer, linked):
    """``compile: default`` (torch.compile in the worker) computes the same steps as eager: with
    dropout off (inductor draws its own random numbers), the same masking and the same batches
    give the same losses up to float rounding, step after step."""
    from fusion.models.backbone import random_backbone

    folder = tmp_path / "no-dropout-bert"
    bb = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    bb.model.config.hidden_dropout_prob = bb.model.config.attention_probs_dropout_prob = 0.0
    bb.model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    common = dict(recipe="mlm", backbone=str(folder), steps=6, batch_size=8, lr=5e-3, warmup_steps=2,
                  checkpoint_every=6, max_length=16, precision="fp32")
    losses, flops, metrics = {}, {}, {}
    for mode in ("off", "default"):
        run = tmp_path / mode
        run.mkdir()
        metrics[mode], _ = _run(run, linked, compile=mode, **common)
        hist = json.loads((run / "pt" / "history.json").read_text())
        losses[mode], flops[mode] = [h["loss_mlm"] for h in hist], [h["flops"] for h in hist]
    assert flops["default"] == flops["off"] and min(flops["off"]) > 0   # counted on the eager model
    assert "compiled_graphs" not in metrics["off"]
    assert metrics["default"]["compiled_graphs"] > 0          # the worker ran compiled graphs
    assert metrics["default"]["graph_breaks"] > 0             # the seeded masking runs eagerly
    assert len(losses["off"]) == 6 and losses["off"][0] != losses["off"][-1]   # it trained
    assert losses["default"] == pytest.approx(losses["off"], rel=1e-4)


class DiesOnceOptions(BaseModel):
    marker: str


@recipe("mlm_dies_once")
class DiesOnce(PlainMLM):
    """Plain MLM whose worker process dies (os._exit) at its 9th micro-batch, once."""

    Options = DiesOnceOptions

    def collate(self, backbone, examples, resources, options, max_length):  # noqa: ANN001
        marker = Path(options.marker)
        count = marker.with_suffix(".count")
        n = int(count.read_text()) + 1 if count.exists() else 1
        count.write_text(str(n))
        if n == 9 and not marker.exists():
            marker.touch()
            os._exit(1)  # a dead worker process, not an exception
        return super().collate(backbone, examples, resources, options, max_length)


@pytest.mark.slow
def test_a_killed_worker_resumes_from_its_checkpoint(ray_local, tmp_path, backbone_dir, linked):
    marker = tmp_path / "died"
    assert RECIPES.get("mlm_dies_once") is DiesOnce
    metrics, out = _run(tmp_path, linked, recipe="mlm_dies_once", backbone=str(backbone_dir),
                        options={"marker": str(marker)},
                        steps=12, batch_size=4, checkpoint_every=4, max_length=16,
                        scaling={"max_failures": 1})
    assert marker.exists()  # it did die
    # The 9th micro-batch killed the worker after 8 steps; it resumed at the latest checkpoint Ray
    # Train had registered (step 8, or step 4 when the worker died before step 8's was recorded)
    # and made the remaining steps: 9 + 4 or 9 + 8 micro-batches. From scratch would be 9 + 12.
    assert int(marker.with_suffix(".count").read_text()) in (9 + 4, 9 + 8)
    hist = json.loads((out / "history.json").read_text())
    assert metrics["steps"] == 12 and [h["step"] for h in hist] == list(range(1, 13))
    resumed_at = 9 if int(marker.with_suffix(".count").read_text()) == 9 + 4 else 5
    # the first step of each worker process is left out of tokens/s (loading, counting FLOPs)
    assert [h["step"] for h in hist if h.get("first_step")] == [1, resumed_at]


class TracedOptions(BaseModel):
    trace: str                 # a folder: each rank appends the documents of its batches
    die_at: int | None = None  # rank 0's process dies at this micro-batch, once


@recipe("mlm_traced")
class Traced(PlainMLM):
    """Plain MLM that records which documents each rank trains on, and can die once."""

    Options = TracedOptions

    def encode_docs(self, state, docs):  # noqa: ANN001, ANN201
        rows, counts = super().encode_docs(state, docs)
        return [{**r, "doc": d["id"]} for r, d in zip(rows, docs)], counts

    def collate(self, backbone, rows, resources, options, max_length):  # noqa: ANN001
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        trace = Path(options.trace)
        with open(trace / f"rank{rank}.txt", "a") as f:
            f.write(" ".join(r["doc"] for r in rows) + "\n")
        count = trace / f"rank{rank}.count"
        n = int(count.read_text()) + 1 if count.exists() else 1
        count.write_text(str(n))
        if rank == 0 and n == options.die_at and not (trace / "died").exists():
            (trace / "died").touch()
            os._exit(1)
        return super().collate(backbone, rows, resources, options, max_length)


@pytest.mark.slow
def test_two_workers_see_each_document_once_per_epoch_and_a_resumed_run_is_bit_identical(
        ray_local, tmp_path, backbone_dir, linked, monkeypatch):
    from safetensors.torch import load_file

    import fusion.pretrain.corpus

    # units of 6 documents: 6 corpus parts, encoded by a pool of Ray Data actors
    monkeypatch.setattr(fusion.pretrain.corpus, "UNIT_DOCS", 6)

    def run(name: str, die_at: int | None) -> tuple[dict, Path, Path]:
        tmp, trace = tmp_path / name, tmp_path / name / "trace"
        trace.mkdir(parents=True)
        # 32 documents, 2 workers x 4 per batch: 4 steps per epoch, 3 epochs
        metrics, out = _run(tmp, linked, recipe="mlm_traced", backbone=str(backbone_dir),
                            options={"trace": str(trace), "die_at": die_at}, steps=12,
                            batch_size=4, checkpoint_every=4, max_length=16, seed=3,
                            scaling={"num_workers": 2, "max_failures": 1})
        return metrics, out, trace

    metrics, whole, trace = run("whole", None)
    assert metrics["examples"] == 32 and metrics["corpus_parts"] == 6
    assert metrics["job_bytes"] < 4000
    batches = {r: [line.split() for line in (trace / f"rank{r}.txt").read_text().splitlines()]
               for r in (0, 1)}
    assert all(len(b) == 12 and all(len(x) == 4 for x in b) for b in batches.values())
    epochs = [sorted(d for r in (0, 1) for b in batches[r][4 * e:4 * e + 4] for d in b)
              for e in range(3)]
    assert all(e == sorted(f"d{i}" for i in range(32)) for e in epochs)  # each once per epoch
    assert batches[0][:4] != batches[0][4:8]                              # reshuffled each epoch

    _, resumed, rtrace = run("resumed", die_at=7)                        # dies in step 7
    assert (rtrace / "died").exists()
    # It resumed from the step-4 checkpoint (7 + 8 micro-batches), or from scratch (7 + 12) when
    # Ray Train's controller had not registered that checkpoint yet (it does so when it next polls
    # the workers): either way the run ends bit-identical to the uninterrupted one.
    assert int((rtrace / "rank0.count").read_text()) in (7 + 8, 7 + 12)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and after the resume it trained on exactly the batches the uninterrupted run did
    replayed = [line.split() for line in (rtrace / "rank1.txt").read_text().splitlines()]
    assert replayed[-4:] == batches[1][-4:]
