"""Region features from a timm backbone: grid cells, ViT patches, or one pooled vector per image.

Grid features (Jiang et al. 2020, "In Defense of Grid Features for VQA") treat each cell of a CNN's
last feature map as a region: a published, competitive alternative to bottom-up Faster R-CNN regions
that needs no detector build. Each region gets a box, so the fusion encoders' location embeddings
(ViLBERT's 5-d, LXMERT's 4-d) work unchanged:

- ``grid``: the (H, W) cells of a CNN feature map, optionally average-pooled to ``grid`` x ``grid``;
  cell (i, j) has box (j/W, i/H, (j+1)/W, (i+1)/H) of the network input.
- ``patch``: a ViT's patch tokens (prefix tokens dropped), with their patch boxes.
- ``pooled``: the backbone's own pooled vector (``forward_head(pre_logits=True)``), one region.

With ``global_token`` the pooled vector comes first as region 0 with the box of the whole input, like
ViLBERT's IMG token (the mean of the regions instead, for models whose pooled vector is wider than
their feature map). Boxes are then mapped from the network input back to the original image (the
eval transform resizes and centre-crops), so a box always says which part of the picture a region
saw.

Preprocessing is timm's own eval transform from the model's data config (mean, std, interpolation,
input size, crop), so features equal what a plain timm loop computes on the same image.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Mode = Literal["grid", "patch", "pooled"]


@dataclass(frozen=True)
class CropWindow:
    """Where the network input lies in the original image, in normalised coordinates."""

    x0: float
    y0: float
    fx: float  # width of the window / width of the image
    fy: float

    def map(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (R, 4) normalised to the network input -> normalised to the original image."""
        out = boxes.astype(np.float32).copy()
        out[:, [0, 2]] = self.x0 + out[:, [0, 2]] * self.fx
        out[:, [1, 3]] = self.y0 + out[:, [1, 3]] * self.fy
        return out


def crop_window(width: int, height: int, data_cfg: dict) -> CropWindow:
    """The part of a ``width`` x ``height`` image that timm's eval transform keeps.

    timm resizes to ``floor(size / crop_pct)`` (the shorter side in ``center`` mode, both sides in
    ``squash`` mode) and centre-crops ``size``; anything else ("border") is not supported for boxes.
    """
    _, th, tw = data_cfg["input_size"]
    crop_pct = data_cfg.get("crop_pct") or 1.0
    mode = data_cfg.get("crop_mode") or "center"
    if mode == "squash":
        sw, sh = math.floor(tw / crop_pct), math.floor(th / crop_pct)
    elif mode == "center":
        scale = math.floor(min(th, tw) / crop_pct) / min(width, height)
        sw, sh = width * scale, height * scale
    else:
        raise ValueError(f"crop_mode {mode!r}: boxes are defined for 'center' and 'squash' only")
    fx, fy = min(1.0, tw / sw), min(1.0, th / sh)
    return CropWindow((1 - fx) / 2, (1 - fy) / 2, fx, fy)


def grid_boxes(h: int, w: int) -> np.ndarray:
    """Boxes (h*w, 4) of a row-major h x w grid over the unit square."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([xs / w, ys / h, (xs + 1) / w, (ys + 1) / h], -1).reshape(-1, 4).astype(np.float32)


class RegionFeaturizer:
    """A timm backbone in eval mode plus the transform and region logic of one ``mode``.

    ``__call__(images)`` takes 8-bit RGB PIL images and returns one ``(features (R, D), boxes (R, 4))``
    pair per image, boxes normalised to the original image.
    """

    def __init__(self, model: torch.nn.Module, data_cfg: dict, mode: Mode = "grid",
                 grid: int | None = None, global_token: bool = True, device: str = "cpu",
                 amp: bool = True):
        import timm.data

        self.model = model.eval().to(device)
        self.data_cfg = data_cfg
        self.transform = timm.data.create_transform(**data_cfg, is_training=False)
        self.mode, self.grid, self.global_token = mode, grid, global_token
        self.device = device
        # bf16 on GPU only: CPU autocast is slower than float32 for convolutions on most CPUs.
        self.amp = amp and device.startswith("cuda")
        # The sizes come from one dry run: a model's pooled vector can be wider than its feature
        # map (MobileNetV3's head convolution: 288 channels, 1024 pooled).
        fm, pooled_dim = self._probe()
        regions, _ = self._regions(fm)
        # The global token is the model's own pooled vector when it lives in the regions' space
        # (EfficientNet's average pool, ViT's CLS token); otherwise the mean of the regions.
        self.pooled_is_global = regions is None or regions.shape[-1] == pooled_dim
        self.dim = int(pooled_dim if regions is None else regions.shape[-1])

    @torch.inference_mode()
    def _probe(self) -> tuple[torch.Tensor, int]:
        """Feature-map shape and pooled width from a shape-only forward on the meta device (a real
        first forward costs seconds of one-off kernel set-up on CPU); a real one as a fallback."""
        x = torch.zeros(1, *self.data_cfg["input_size"])
        try:
            meta = copy.deepcopy(self.model).to("meta")
            fm = meta.forward_features(x.to("meta"))
            return fm, int(meta.forward_head(fm, pre_logits=True).shape[-1])
        except (NotImplementedError, RuntimeError):  # an op without a meta kernel
            fm = self.model.forward_features(x.to(self.device))
            return fm, int(self.model.forward_head(fm, pre_logits=True).shape[-1])

    def __repr__(self) -> str:
        return (f"RegionFeaturizer({type(self.model).__name__}, mode={self.mode}, grid={self.grid}, "
                f"global_token={self.global_token}, dim={self.dim}, input={self.data_cfg['input_size']})")

    @torch.inference_mode()
    def __call__(self, images: list) -> list[tuple[np.ndarray, np.ndarray]]:
        x = torch.stack([self.transform(im) for im in images]).to(self.device)  # (B, 3, H, W)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            fm = self.model.forward_features(x)
            regions, boxes = self._regions(fm)                     # (B, R, D), (R, 4)
            pooled = (self.model.forward_head(fm, pre_logits=True) if self.pooled_is_global
                      else regions.mean(1))                         # (B, D)
        if self.global_token or regions is None:
            whole = np.array([[0, 0, 1, 1]], np.float32)
            regions = pooled[:, None] if regions is None else torch.cat([pooled[:, None], regions], 1)
            boxes = whole if boxes is None else np.concatenate([whole, boxes])
        feats = regions.float().cpu().numpy()
        return [(feats[i], crop_window(*im.size, self.data_cfg).map(boxes))
                for i, im in enumerate(images)]

    def _regions(self, fm: torch.Tensor) -> tuple[torch.Tensor | None, np.ndarray | None]:
        if self.mode == "pooled":
            return None, None
        if self.mode == "grid":
            if fm.ndim != 4:
                raise ValueError(f"mode 'grid' needs a CNN-style feature map (B, C, H, W); this "
                                 f"backbone gives {tuple(fm.shape)}: use mode 'patch'")
            channels = int(self.model.num_features)
            if fm.shape[1] != channels and fm.shape[-1] == channels:
                fm = fm.permute(0, 3, 1, 2)  # NHWC backbones (Swin, some ConvNeXt variants)
            if self.grid:
                fm = F.adaptive_avg_pool2d(fm, self.grid)
            h, w = fm.shape[-2:]
            return fm.flatten(2).transpose(1, 2), grid_boxes(h, w)  # (B, H*W, C)
        # patch
        if fm.ndim != 3:
            raise ValueError(f"mode 'patch' needs tokens (B, N, D); this backbone gives "
                             f"{tuple(fm.shape)}: use mode 'grid'")
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        gh, gw = self.model.patch_embed.grid_size
        tokens = fm[:, prefix:]
        if tokens.shape[1] != gh * gw:
            raise ValueError(f"{tokens.shape[1]} patch tokens do not form the {gh}x{gw} grid")
        return tokens, grid_boxes(gh, gw)
