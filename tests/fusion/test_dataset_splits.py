"""A dataset's own split through the fusion stages: a tiny Karpathy split file with PNGs, featurized
by ``vision.features`` (a tiny random timm backbone), pretrained with ``fusion.pretrain`` and
evaluated with ``fusion.retrieval``: Karpathy's test images are exactly what ``split: test``
evaluates and never what pretraining sees; the model records its feature settings and refuses
features made otherwise."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fusion.pairs import load_pairs, split_source_for
from fusion.retrieval.stage import RetrievalParams, evaluate
from pipeline import StageFailed
from pipeline.context import StageContext
from pipeline.registry import Resources
from pipeline.store import Artifact

SPLITS = {"1.png": "train", "2.png": "train", "3.png": "train", "4.png": "train", "5.png": "train",
          "6.png": "restval", "7.png": "val", "8.png": "val", "9.png": "test", "10.png": "test"}
CAPTIONS = ["the red dog", "the blue cat", "the green river", "a city in france", "the apple company",
            "the art of music", "a red animal", "the blue country", "the green city", "a cat and a dog"]
TEST = [n for n, s in SPLITS.items() if s == "test"]
TRAIN = [n for n, s in SPLITS.items() if s in ("train", "restval")]  # restval trains by convention
KEY = "f1ickr00" + "0" * 56


def _ctx(out: Path, name: str, inputs: dict, state: Path) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage=name, key=name, out=out, inputs=inputs, resources=Resources(),
                        state_uri=str(state), log=logging.getLogger(f"test.{name}"))


@pytest.fixture(scope="module")
def karpathy(ray_local, tmp_path_factory) -> Path:
    """A Karpathy-format split file over 10 PNGs, featurized by the real vision.features stage, with
    the manifest the store would write (stage, type, key, params)."""
    from vision.stages import VisionFeaturesParams, features

    tmp = tmp_path_factory.mktemp("karpathy")
    rng = np.random.default_rng(0)
    images = tmp / "flickr30k-images"
    images.mkdir()
    for name in SPLITS:
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), np.uint8)).save(images / name)
    doc = {"dataset": "flickr30k", "images": [
        {"filename": n, "split": s, "imgid": k, "sentences": [{"raw": CAPTIONS[k], "tokens": []}]}
        for k, (n, s) in enumerate(SPLITS.items())]}
    (tmp / "dataset_flickr30k.json").write_text(json.dumps(doc))
    params = VisionFeaturesParams.model_validate({
        "dataset": {"type": "karpathy", "path": str(tmp / "dataset_flickr30k.json"),
                    "images": str(images)},
        "backbone": "test_efficientnet", "weights": None, "mode": "grid", "grid": 2, "actors": 1,
        "batch_size": 4})
    out = tmp / "features"
    metrics = features(_ctx(out, "flickr_features", {}, tmp / "state"), params)
    (out / "manifest.json").write_text(json.dumps({
        "stage": "flickr_features", "type": "vision.features", "key": KEY,
        "params": params.model_dump(mode="json"), "metrics": metrics}))
    return out


@pytest.fixture(scope="module")
def model(karpathy, backbone_dir, tmp_path_factory) -> tuple[dict, Path, Path]:
    """A dual encoder pretrained a few steps on the Karpathy features: (metrics, artifact, state)."""
    from fusion.pretrain.stage import PretrainParams, pretrain

    tmp = tmp_path_factory.mktemp("pretrain")
    manifest = json.loads((karpathy / "manifest.json").read_text())
    ctx = _ctx(tmp / "dual", "dual", {"media": Artifact(KEY, karpathy, manifest)}, tmp / "state")
    params = PretrainParams.model_validate({
        "recipe": "dual", "backbone": str(backbone_dir), "options": {"r_layers": 1},
        "steps": 3, "batch_size": 2, "max_length": 8, "warmup_steps": 0, "checkpoint_every": 3})
    return pretrain(ctx, params), tmp / "dual", tmp / "state"


def test_split_test_is_exactly_karpathy_s_test_set_and_val_is_selectable(karpathy):
    bank, caps, counts = load_pairs(karpathy, "test", held_out_share=0.5, split_seed=0)
    assert bank.ids == TEST and caps.texts == ["the green city", "a cat and a dog"]
    assert counts["split_source"] == "dataset" and counts["test_items"] == 2
    assert counts["dataset_splits"] == {"train": 6, "val": 2, "test": 2}   # restval counts as train
    assert load_pairs(karpathy, "val")[0].ids == ["7.png", "8.png"]
    assert load_pairs(karpathy, "train")[0].ids == TRAIN
    with pytest.raises(StageFailed, match=r"^features artifact flickr_features \(f1ickr00\): no item "
                                          r"of split 'dev'; the dataset's own splits here: test \(2 "
                                          r"items\), train \(6 items\), val \(2 items\); choose one "
                                          r"of them or all$"):
        load_pairs(karpathy, "dev")
    # split_source: hash (a model pretrained so) ignores the dataset's split
    _, _, c = load_pairs(karpathy, "test", 0.5, 0, split_source="hash")
    assert c["split_source"] == "hash(held_out_share=0.5, seed=0)" and "dataset_splits" not in c


def test_pretraining_never_sees_a_test_or_val_image(model):
    metrics, out, state = model
    assert metrics["train_items"] == len(TRAIN) and metrics["split_source"] == "dataset"
    seen = {m for part in sorted((state / "corpus").glob("part-*.parquet"))
            for m in pq.read_table(part, columns=["media"])["media"].to_pylist()}
    assert seen == set(TRAIN)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["options"]["split_source"] == "dataset"
    # the settings its features were made with: those that change the features, and only those
    assert recipe["features"] == {"media": {"type": "vision.features", "key": KEY, "settings": {
        "backbone": "test_efficientnet", "weights": None, "mode": "grid", "grid": 2,
        "global_token": True, "crop_pct": None, "crop_mode": None, "background": [255, 255, 255]}}}


def test_retrieval_evaluates_karpathy_s_test_images_and_says_so(model, karpathy, tmp_path):
    _, out, _ = model
    m = evaluate(out, karpathy, tmp_path / "r", RetrievalParams(mode="dual", split="test"))
    assert m["media"] == 2 and m["captions"] == 2
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["counts"]["split_source"] == "dataset"
    ranks = pq.read_table(tmp_path / "r" / "ranks.parquet").to_pylist()
    assert {r["query_id"].split("#")[0] for r in ranks if r["direction"] == "text_to_media"} == set(TEST)
    assert all(set(r["top_ids"]) <= set(TEST) for r in ranks if r["direction"] == "text_to_media")


def test_features_made_otherwise_are_refused_and_other_settings_pass(model, karpathy, tmp_path):
    _, out, _ = model

    def copy(name: str, **changes) -> Path:
        dest = shutil.copytree(karpathy, tmp_path / name)
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest.update(stage=name, key=name[0] * 64, params=manifest["params"] | changes)
        (dest / "manifest.json").write_text(json.dumps(manifest))
        return dest

    # batch size, actors and a limit do not change the features: scored
    evaluate(out, copy("rebatched", batch_size=1, actors=2, limit=100), tmp_path / "ok",
             RetrievalParams(mode="dual", split="all"))
    with pytest.raises(StageFailed) as e:
        evaluate(out, copy("regridded", grid=3), tmp_path / "no", RetrievalParams(mode="dual"))
    assert str(e.value) == ("mismatched features: media artifact regridded (rrrrrrrr) was made with "
                            "grid=3, model dual was trained on grid=2 (vision.features: make the "
                            "features with the model's settings)")
    # a model pretrained before the record: its feature width is all that is checked
    old = shutil.copytree(out, tmp_path / "old")
    recipe = json.loads((old / "recipe.json").read_text())
    del recipe["features"], recipe["options"]["split_source"]
    (old / "recipe.json").write_text(json.dumps(recipe))
    evaluate(old, tmp_path / "regridded", tmp_path / "old-ok", RetrievalParams(mode="dual"))


def test_which_split_a_model_is_evaluated_on(model, karpathy, tmp_path):
    """The model's own split source on the artifact it trained on; the dataset's elsewhere. A model
    from before the datasets' splits (no split_source) trained on the hash split."""
    _, out, _ = model
    recipe = json.loads((out / "recipe.json").read_text())
    assert split_source_for(out, recipe, karpathy) == "dataset"
    old = {k: v for k, v in recipe.items() if k != "features"}
    old["options"] = {k: v for k, v in recipe["options"].items() if k != "split_source"}
    folder = tmp_path / "old"
    folder.mkdir()
    assert split_source_for(folder, old, karpathy) == "hash"          # which artifact: unknown
    (folder / "manifest.json").write_text(json.dumps({"inputs": {"media": KEY}}))
    assert split_source_for(folder, old, karpathy) == "hash"          # the one it trained on
    (folder / "manifest.json").write_text(json.dumps({"inputs": {"media": "another"}}))
    assert split_source_for(folder, old, karpathy) == "dataset"       # another: its own split
    hashed = recipe | {"options": recipe["options"] | {"split_source": "hash"}}
    assert split_source_for(out, hashed, karpathy) == "hash"          # features.media.key: this one


def test_pretraining_refuses_an_artifact_without_training_items(karpathy, tmp_path):
    from fusion.pretrain.media_recipes import DualOptions, DualRecipe

    only_test = shutil.copytree(karpathy, tmp_path / "only_test")
    items = pq.read_table(only_test / "items.parquet")
    metas = [json.dumps(json.loads(m) | {"split": "test"}) for m in items["meta"].to_pylist()]
    pq.write_table(items.set_column(items.schema.get_field_index("meta"), "meta",
                                    pa.array(metas, pa.string())), only_test / "items.parquet")
    with pytest.raises(StageFailed, match=r"carry their dataset's own split and none is in 'train' "
                                          r"\(test \(10 items\)\); a val or test item never trains"):
        DualRecipe().resources({"media": str(only_test)}, DualOptions())
    res = DualRecipe().resources({"media": str(only_test)}, DualOptions(split_source="hash"))
    assert res["split_source"] == "hash(held_out_share=0.2, seed=0)"
