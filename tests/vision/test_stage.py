"""``vision.features`` end to end on Ray Data: output equals a plain in-process loop, and every bad
image is a row of the rejected table while the stage completes."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline import StageFailed
from pipeline.context import StageContext
from pipeline.features import FeatureSet
from pipeline.registry import Resources
from vision.io import decode_image
from vision.stages import VisionFeaturesParams, features

GOOD = {  # name -> (PIL mode, size): every mode the decoder must convert, two aspect ratios
    "rgb.png": ("RGB", (40, 30)), "gray.png": ("L", (32, 32)), "rgba.png": ("RGBA", (20, 36)),
    "palette.png": ("P", (32, 32)), "cmyk.jpg": ("CMYK", (30, 30)), "deep.png": ("I;16", (24, 24)),
}
BAD = {  # name -> the reason the rejected table must give
    "truncated.png": "truncated or corrupt", "empty.png": "empty file", "text.png": "not an image",
    "bomb.png": "decompression-bomb",
}


def _write(path: Path, mode: str, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)).save(path)
        return
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).convert(mode)
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for k, (name, (mode, size)) in enumerate(GOOD.items()):
        _write(root / name, mode, size, k)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not a picture")
    Image.new("L", (300, 200)).save(root / "bomb.png")
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name in [*GOOD, *BAD]:
            w.writerow([name, f"a picture called {name}"])
        w.writerow(["rgb.png", "a second caption for the same picture"])
        w.writerow(["gray.png", "   "])                       # an empty caption
        w.writerow(["missing.png", "an image that is not there"])
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _run(tmp_path: Path, **params) -> tuple[dict, Path]:
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage="vf", key="k", out=out, inputs={}, resources=Resources(),
                       state_uri=str(tmp_path / "state"), log=logging.getLogger("test.vf"))
    metrics = features(ctx, VisionFeaturesParams.model_validate(params))
    (out / "manifest.json").write_text(json.dumps({"metrics": metrics}))
    return metrics, out


def _plain_loop(folder: Path, weights: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The reference: timm called directly, one image at a time, no Ray."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights))).eval()
    cfg = timm.data.resolve_data_config(model=model)
    tf = timm.data.create_transform(**cfg)
    out = {}
    with torch.inference_mode():
        for name in names:
            img, _ = decode_image((folder / name).read_bytes())
            fm = model.forward_features(tf(img)[None])
            pooled = model.forward_head(fm, pre_logits=True)
            out[name] = torch.cat([pooled[:, None], fm.flatten(2).transpose(1, 2)], 1)[0].numpy()
    return out


@pytest.mark.parametrize("actors", [1, 2])
def test_stage_equals_plain_loop_and_records_every_bad_image(ray_local, tmp_path, folder, weights,
                                                             actors, monkeypatch):
    import vision.stages

    def not_here(*args, **kwargs):
        raise AssertionError("the stage process built a backbone: only its actors should")

    monkeypatch.setattr(vision.stages, "_featurizer", not_here)  # this process only, not the actors
    metrics, out = _run(tmp_path, dataset={"type": "image_folder", "captions": str(folder / "captions.csv")},
                        weights=str(weights), batch_size=3, actors=actors, max_pixels=50_000,
                        rows_per_shard=4)
    assert metrics["items"] == len(GOOD) and metrics["dim"] == 1280
    # what the actors built, as they described it
    assert metrics["weights"] == str(weights.resolve()) and metrics["warnings"] == []
    cfg = timm.data.resolve_data_config(model=timm.create_model("tf_efficientnet_lite0"))
    assert metrics["data_config"] == json.loads(json.dumps(cfg))
    assert metrics["regions"] == len(GOOD) * 50
    fs = FeatureSet(out)
    assert len(fs.shards) == 2  # 6 items, 4 rows per shard
    got = fs.load()
    assert sorted(got) == sorted(GOOD)
    ref = _plain_loop(folder, weights, list(GOOD))
    for name, (feats, boxes) in got.items():
        assert feats.dtype == np.float16 and feats.shape == (50, 1280) and boxes.shape == (50, 4)
        np.testing.assert_allclose(feats.astype(np.float32), ref[name], rtol=2e-3, atol=2e-3)
        assert (boxes >= 0).all() and (boxes <= 1).all()

    rejected = fs.rejected().to_pylist()
    by_where = {r["where"]: r for r in rejected}
    for name, reason in BAD.items():
        assert reason in by_where[name]["reason"] and by_where[name]["kind"] == "media"
    assert by_where["gray.png#1"]["kind"] == "text"  # gray.png's second text is blank
    listing = [r for r in rejected if r["kind"] == "listing"]
    assert len(listing) == 1 and "missing.png" in listing[0]["where"] + listing[0]["reason"]
    # nothing vanished: listed = featurized + rejected media
    assert metrics["items_listed"] == len(GOOD) + len(BAD)
    assert metrics["rejected"] == len(BAD) + 1 + 1
    assert metrics["empty_texts"] == 1 and metrics["listing_rejected"] == 1
    assert metrics["source_modes"] == {"RGB": 1, "L": 1, "RGBA": 1, "P": 1, "CMYK": 1, "I;16": 1}

    items = {r["id"]: r for r in pq.read_table(out / "items.parquet").to_pylist()}
    assert len(items["rgb.png"]["texts"]) == 2 and items["gray.png"]["texts"] == [
        "a picture called gray.png"]


def test_random_weights_warn_in_log_and_manifest(ray_local, tmp_path, folder, caplog):
    metrics, out = _run(tmp_path, dataset={"type": "image_folder", "captions": str(folder / "captions.csv")},
                        mode="pooled", global_token=False, limit=2)
    assert metrics["weights"] == "random" and any("random" in w.lower() for w in metrics["warnings"])
    assert metrics["items"] + metrics["rejected"] >= 2 and metrics["items_listed"] == 2
    assert FeatureSet(out).dim == 1280


def test_a_dataset_with_no_usable_image_fails_with_the_reasons(ray_local, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"")
    (tmp_path / "c.csv").write_text("image,caption\nbad.png,nothing here\n")
    with pytest.raises(StageFailed, match="no usable item.*empty file"):
        _run(tmp_path, dataset={"type": "image_folder", "captions": str(tmp_path / "c.csv")},
             mode="pooled")


def test_an_audio_dataset_is_refused_at_validation(tmp_path):
    from pipeline.datasets import DATASETS

    assert DATASETS.get("audio_folder").modality == "audio"
    with pytest.raises(ValueError, match="holds audio items, not image items"):
        VisionFeaturesParams.model_validate({"dataset": {"type": "audio_folder",
                                                         "root": str(tmp_path)}})


@pytest.mark.parametrize(("params", "message"), [
    ({"backbone": "no_such_net"}, r"vision\.features: backbone 'no_such_net'"),
    ({"weights": "missing.safetensors"}, r"vision\.features: .*missing\.safetensors"),
    ({"backbone": "resnet18", "mode": "patch"}, r"vision\.features: resnet18: .*use mode 'grid'"),
], ids=["unknown-backbone", "missing-weights", "mode-it-lacks"])
def test_a_bad_backbone_fails_in_the_stages_words_and_writes_nothing(ray_local, tmp_path, folder,
                                                                      params, message):
    """The actors fail to build the backbone; the stage then builds it in its own process, whose
    error is the one raised, not Ray's report of the actors' death; no feature shard is written."""
    with pytest.raises(StageFailed, match=message):
        _run(tmp_path, dataset={"type": "image_folder", "captions": str(folder / "captions.csv")},
             limit=2, **params)
    assert not list((tmp_path / "out" / "features").glob("*.parquet"))
