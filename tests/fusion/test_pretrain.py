"""``fusion.pretrain`` under Ray Train: the plain-MLM recipe learns, the artifact is complete, and a
run whose worker dies mid-way resumes from its checkpoint and ends at the same step count."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from fusion.models.backbone import load_backbone
from fusion.pretrain.loop import RECIPES, lr_lambda, recipe, shard_order
from fusion.pretrain.recipes import PlainMLM
from fusion.pretrain.stage import PretrainParams, pretrain
from knowledge.stages.link import DOC_SCHEMA, MENTION_SCHEMA
from pipeline.context import StageContext
from pipeline.registry import Resources
from pipeline.store import Artifact

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
    out = tmp / "out"
    out.mkdir()
    ctx = StageContext(stage="pt", key="k", out=out, inputs={"text": Artifact("l", linked, {})},
                       resources=Resources(), state_uri=str(tmp / "state"),
                       log=logging.getLogger("test.pretrain"))
    return pretrain(ctx, PretrainParams.model_validate(params)), out


def test_shard_order_partitions_each_epoch_reproducibly():
    shards = [shard_order(10, epoch=3, seed=1, rank=r, world=2) for r in range(2)]
    assert sorted(list(shards[0]) + list(shards[1])) == list(range(10))
    assert (shard_order(10, 3, 1, 0, 2) == shards[0]).all()
    assert (shard_order(10, 4, 1, 0, 2) != shards[0]).any()


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(warmup=4, total=10)
    assert [round(f(s), 3) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.833, 0.667, 0.5,
                                                   0.333, 0.167]
    assert f(10) == 0.0


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
    assert metrics["tokens_per_s"] > 0 and metrics["documents"] == 32
    for f in ("model.safetensors", "recipe.json", "losses.png", "tokenizer/tokenizer.json"):
        assert (out / f).exists(), f
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the weights load back into the recipe's model
    from safetensors.torch import load_model

    model = PlainMLM().build(load_backbone(str(backbone_dir)), {}, None)
    load_model(model, str(out / "model.safetensors"))  # strict: every weight is there


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
