"""Region featurizer: shapes, boxes and values per mode, against timm called directly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from vision.features import RegionFeaturizer, crop_window, grid_boxes


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    return m, timm.data.resolve_data_config(model=m)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    # the data config comes from the pretrained config (224 px), not from the img_size override
    return m, {**timm.data.resolve_data_config(model=m), "input_size": (3, 64, 64)}


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(80, 60), (50, 120), (64, 64)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for w, h in sizes[:n]]


def test_grid_boxes_tile_the_unit_square():
    b = grid_boxes(2, 3)
    assert b.shape == (6, 4)
    np.testing.assert_allclose(b[0], [0, 0, 1 / 3, 1 / 2])
    np.testing.assert_allclose(b[5], [2 / 3, 1 / 2, 1, 1])
    assert np.isclose(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum(), 1.0)


@pytest.mark.parametrize("crop_mode,crop_pct", [("center", 0.875), ("squash", 0.875),
                                                ("squash", 1.0), ("center", 1.0)])
def test_crop_window_matches_what_timms_transform_keeps(crop_mode, crop_pct):
    # An independent check: a 400x200 image, black left half, white right half; the share of
    # white columns in timm's output must equal the share the crop window predicts.
    arr = np.zeros((200, 400, 3), np.uint8)
    arr[:, 200:] = 255
    cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0, 0, 0),
           "std": (1, 1, 1), "crop_pct": crop_pct, "crop_mode": crop_mode}
    x = timm.data.create_transform(**cfg)(Image.fromarray(arr))  # (3, 32, 32) in [0, 1]
    white = (x[0].mean(0) > 0.5).float().mean().item()
    w = crop_window(400, 200, cfg)
    predicted = (w.x0 + w.fx - 0.5) / w.fx
    assert white == pytest.approx(predicted, abs=1 / 32 + 1e-6)
    assert 0 <= w.x0 and w.x0 + w.fx <= 1 + 1e-9 and 0 <= w.y0 and w.y0 + w.fy <= 1 + 1e-9


def test_grid_mode_equals_the_feature_map_with_a_global_token(cnn):
    model, cfg = cnn
    fz = RegionFeaturizer(model, cfg, mode="grid")
    imgs = _images()
    out = fz(imgs)
    x = torch.stack([timm.data.create_transform(**cfg)(im) for im in imgs])
    with torch.inference_mode():
        fm = model.forward_features(x)
        pooled = model.forward_head(fm, pre_logits=True)
    for i, (feats, boxes) in enumerate(out):
        assert feats.shape == (1 + 49, 1280) and boxes.shape == (50, 4)
        np.testing.assert_allclose(feats[0], pooled[i].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(feats[1:], fm[i].flatten(1).T.numpy(), rtol=1e-5, atol=1e-5)
        win = crop_window(*imgs[i].size, cfg)
        np.testing.assert_allclose(boxes[0], [win.x0, win.y0, win.x0 + win.fx, win.y0 + win.fy],
                                   atol=1e-6)
        assert (boxes[1:, 2] > boxes[1:, 0]).all() and (boxes[1:, 3] > boxes[1:, 1]).all()
        # the 7x7 cells tile exactly the global token's box
        area = ((boxes[1:, 2] - boxes[1:, 0]) * (boxes[1:, 3] - boxes[1:, 1])).sum()
        assert area == pytest.approx((boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1]))


def test_grid_pooling_and_no_global_token(cnn):
    model, cfg = cnn
    feats, boxes = RegionFeaturizer(model, cfg, mode="grid", grid=2, global_token=False)(_images(1))[0]
    full, _ = RegionFeaturizer(model, cfg, mode="grid", global_token=False)(_images(1))[0]
    assert feats.shape == (4, 1280)
    # adaptive pooling of 7 cells into 2 bins: bin 0 covers rows/cols 0..3
    fm = full.reshape(7, 7, 1280)
    np.testing.assert_allclose(feats[0], fm[:4, :4].mean((0, 1)), rtol=1e-4, atol=1e-5)


def test_pooled_mode_is_one_region(cnn):
    model, cfg = cnn
    for gt in (True, False):
        feats, boxes = RegionFeaturizer(model, cfg, mode="pooled", global_token=gt)(_images(1))[0]
        assert feats.shape == (1, 1280) and boxes.shape == (1, 4)


def test_patch_mode_on_a_vit(vit):
    model, cfg = vit
    out = RegionFeaturizer(model, cfg, mode="patch")(_images(2))
    x = torch.stack([timm.data.create_transform(**cfg)(im) for im in _images(2)])
    with torch.inference_mode():
        tokens = model.forward_features(x)
    for i, (feats, boxes) in enumerate(out):
        assert feats.shape == (1 + 16, 192)  # 64 px / 16 px patches = 4 x 4, plus the global token
        np.testing.assert_allclose(feats[1:], tokens[i, 1:].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(feats[0], tokens[i, 0].numpy(), rtol=1e-5, atol=1e-5)  # CLS


def test_wrong_mode_for_the_architecture_says_which_to_use(cnn, vit):
    with pytest.raises(ValueError, match="use mode 'patch'"):
        RegionFeaturizer(*vit, mode="grid")(_images(1))
    with pytest.raises(ValueError, match="use mode 'grid'"):
        RegionFeaturizer(*cnn, mode="patch")(_images(1))


def test_a_pooled_vector_wider_than_the_feature_map_gives_way_to_the_regions_mean():
    # MobileNetV3's head convolution widens the pooled vector (1024) beyond the map (288 here)
    torch.manual_seed(0)
    m = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    cfg = {**timm.data.resolve_data_config(model=m), "input_size": (3, 64, 64)}
    grid = RegionFeaturizer(m, cfg, mode="grid")
    feats, _ = grid(_images(1))[0]
    assert grid.dim == 288 and feats.shape == (1 + 4, 288)
    np.testing.assert_allclose(feats[0], feats[1:].mean(0), rtol=1e-5, atol=1e-6)
    pooled = RegionFeaturizer(m, cfg, mode="pooled")
    assert pooled.dim == 1024 and pooled(_images(1))[0][0].shape == (1, 1024)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backbone,mode", [("cnn", "grid"), ("vit", "patch")])
def test_cuda_features_match_cpu(backbone, mode, request):
    """On a GPU (float32, and the bf16 autocast the stage uses there by default) the regions and
    boxes are the CPU's: per-region cosine >= 0.999 in float32 (cuDNN's TF32 convolutions) and
    >= 0.99 in bf16."""
    import copy

    model, cfg = request.getfixturevalue(backbone)
    images = _images()
    want = RegionFeaturizer(copy.deepcopy(model), cfg, mode=mode)(images)
    for amp, floor in ((False, 0.999), (True, 0.99)):
        got = RegionFeaturizer(copy.deepcopy(model), cfg, mode=mode, device="cuda", amp=amp)(images)
        for (f_cpu, b_cpu), (f_gpu, b_gpu) in zip(want, got):
            assert f_gpu.shape == f_cpu.shape and f_gpu.dtype == np.float32
            np.testing.assert_array_equal(b_gpu, b_cpu)
            cos = (f_cpu * f_gpu).sum(1) / (np.linalg.norm(f_cpu, axis=1) * np.linalg.norm(f_gpu, axis=1))
            assert cos.min() >= floor, (amp, cos.min())
