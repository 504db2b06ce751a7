"""``pipelines/retrieval_eval.yaml``: it plans, it shares the demo's model stages (their keys are the
demo's, so the demo's store has them cached), and it runs (tiny: a random timm test backbone, the
tiny BERT, two steps): the user's folder is featurized exactly as the training images, and a
feature setting changed on one side only is refused by fusion.retrieval in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import stele
from fusion.retrieval.stage import RetrievalParams, evaluate
from pipeline.features import FeatureSet
from pipeline.runner import plan
from pipeline.spec import load_pipeline
from pipeline.store import ArtifactStore

PIPELINES = Path(__file__).parents[2] / "pipelines"
EVAL = PIPELINES / "retrieval_eval.yaml"


def test_it_plans_and_its_model_stages_are_the_demo_s(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["plan", str(EVAL), "--store", str(tmp_path / "store")]) == 0, capsys.readouterr()
    store = ArtifactStore(tmp_path / "store")
    ours, demo = (plan(load_pipeline(p), store) for p in (EVAL, PIPELINES / "demo.yaml"))
    for name in ("emoji_images", "dual", "lxmert"):
        assert ours[name].key == demo[name].key, name
    # the user's images take every feature setting from the training images' stage
    stages = load_pipeline(EVAL).stages
    mine, train = (stages[n].params.model_dump(mode="json") for n in ("my_images", "emoji_images"))
    assert mine.pop("dataset")["type"] == "image_folder" and train.pop("dataset")["type"] == "emoji"
    assert mine == train


TINY = {"backbone": "test_efficientnet", "weights": None}  # a random timm test model (warns)


def _set(backbone_dir: Path, **more) -> dict:
    return {**{f"{s}.{k}": v for s in ("emoji_images", "my_images") for k, v in TINY.items()},
            "dual.backbone": str(backbone_dir), "dual.steps": 2, "dual.batch_size": 4,
            "dual.warmup_steps": 0, "dual.checkpoint_every": 2, **more}


def test_it_runs_on_the_example_folder_and_refuses_drifted_features(ray_local, tmp_path,
                                                                   backbone_dir):
    store = tmp_path / "store"
    run = stele.run(EVAL, store=store, set=_set(backbone_dir), until="my_images_dual", quiet=True,
                    report=False)
    assert run.ok, {n: o.error for n, o in run.outcomes.items() if o.error}
    m = run.outcomes["my_images_dual"].metrics
    assert m["media"] == 65 and m["captions"] == 65
    out = ArtifactStore(store).open(run.outcomes["my_images_dual"].key).path
    counts = json.loads((out / "metrics.json").read_text())["counts"]
    assert counts["split_source"] == "hash(held_out_share=0.2, seed=0)" and counts["all_items"] == 65

    # The same images through the user's folder have the training images' features.
    mine = FeatureSet(ArtifactStore(store).open(run.outcomes["my_images"].key).path).load()
    train = FeatureSet(ArtifactStore(store).open(run.outcomes["emoji_images"].key).path).load()
    for image, (feats, boxes) in mine.items():
        ref_feats, ref_boxes = train[Path(image).stem.upper()]
        np.testing.assert_allclose(feats.astype(np.float32), ref_feats.astype(np.float32),
                                   rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(boxes, ref_boxes)
    # so the demo's held-out emoji through the folder score as its own evaluation of them does
    dual = ArtifactStore(store).open(run.outcomes["dual"].key).path
    ref = evaluate(dual, ArtifactStore(store).open(run.outcomes["emoji_images"].key).path,
                   tmp_path / "ref", RetrievalParams(mode="dual", split="test"))
    same = [k for k in ref if "R@" in k or "rank" in k or "mAP" in k]
    assert ref["media"] == 65 and {k: m[k] for k in same} == pytest.approx({k: ref[k] for k in same})

    # A feature setting changed for the user's images only: the model refuses them.
    again = stele.run(EVAL, store=store, set=_set(backbone_dir, **{"my_images.grid": 2}),
                      until="my_images_dual", quiet=True, report=False)
    assert again.outcomes["dual"].status == "cached" and again.outcomes["my_images"].status == "ran"
    failed = again.outcomes["my_images_dual"]
    assert failed.status == "failed"
    key = again.outcomes["my_images"].key[:8]
    model = again.outcomes["dual"].key[:8]
    assert (f"mismatched features: media artifact my_images ({key}) was made with grid=2, model dual "
            f"({model}) was trained on grid=3 (vision.features: make the features with the model's "
            f"settings)") in failed.error, failed.error
