"""Region features in: per-item regions padded into batches, and the two region embeddings.

Regions come in ``pipeline.features``' layout: per item ``features`` (R, F) (float16 in an
artifact) and normalised boxes (R, 4) ``(x1, y1, x2, y2)``, divided by the image's width and height;
audio frames (``speech.features``) are boxes ``(t0/T, 0, t1/T, 1)``, so the same box inputs cover
time spans. A batch holds ``features`` (B, R, F), ``boxes`` (B, R, 4) and ``region_mask`` (B, R),
1 on real regions.

* LXMERT (Tan & Bansal 2019, eq. 1), also the two-media model's input for both streams::

      v_j = (LN(W_f f_j + b_f) + LN(W_b b_j + b_b)) / 2                              (B, R, D)

* ViLBERT (Lu et al. 2019, section 3.2): the 5-d location ``loc = (x1, y1, x2, y2, area share)``
  and an IMG token first, the mean of the item's real region features with the whole-image box
  ``(0, 0, 1, 1)`` (or, with ``add_img_token=False``, region 0 as given: a global token)::

      v_j = LN(W_f f_j + W_l loc_j)                                                  (B, R', V)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)  # the IMG token's box


def collate_regions(items: Sequence[tuple[Any, Any]], max_regions: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """Pad per-item ``(features (R_i, F), boxes (R_i, 4))`` (``pipeline.features.FeatureSet``'s
    items) into ``features`` (B, R, F) float16, ``boxes`` (B, R, 4) and ``region_mask`` (B, R);
    items longer than ``max_regions`` keep their first regions (the global token stays)."""
    n = [min(len(f), max_regions) if max_regions is not None else len(f) for f, _ in items]
    B, R = len(items), max(n, default=0)
    dim = int(np.asarray(items[0][0]).shape[-1]) if items else 0
    features = torch.zeros(B, R, dim, dtype=torch.float16)
    boxes = torch.zeros(B, R, 4, dtype=torch.float32)
    region_mask = torch.zeros(B, R, dtype=torch.bool)
    for b, ((f, bx), k) in enumerate(zip(items, n, strict=True)):
        features[b, :k] = torch.as_tensor(np.array(f[:k], dtype=np.float16))
        boxes[b, :k] = torch.as_tensor(np.array(bx[:k], dtype=np.float32))
        region_mask[b, :k] = True
    return {"features": features, "boxes": boxes, "region_mask": region_mask}


def collate_media(items: Sequence[tuple[Any, Any]], feature_dim: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """Pad ``(features (R, F), boxes (R, 4))`` pairs (``FeatureSet`` items) to the largest R:
    ``features`` (B, R, F) in the items' dtype (float16 from a feature artifact; the model computes
    in its own), ``boxes`` (B, R, 4) float32, ``region_mask`` (B, R) 1 on real regions."""
    feats = [torch.as_tensor(f) for f, _ in items]
    dim = feature_dim if feature_dim is not None else (feats[0].shape[-1] if feats else 0)
    dtype = feats[0].dtype if feats else torch.float32
    B, R = len(items), max((len(f) for f in feats), default=0)
    features = torch.zeros(B, R, dim, dtype=dtype)
    boxes = torch.zeros(B, R, 4, dtype=torch.float32)
    region_mask = torch.zeros(B, R, dtype=torch.long)
    for b, (f, (_, bx)) in enumerate(zip(feats, items, strict=True)):
        n = len(f)
        features[b, :n] = f.reshape(n, dim).to(dtype)
        boxes[b, :n] = torch.as_tensor(bx, dtype=torch.float32).reshape(n, 4)
        region_mask[b, :n] = 1
    return {"features": features, "boxes": boxes, "region_mask": region_mask}


def collate(texts: Sequence[str], media: Sequence[tuple[Any, Any]], tokenizer: Any,
            max_length: int = 64) -> dict[str, torch.Tensor]:
    """One batch of matched pairs: the tokenised ``texts`` (padded, with ``special_tokens_mask``)
    and :func:`collate_media` of ``media``, item i captioned by text i."""
    if len(texts) != len(media):
        raise ValueError(f"{len(texts)} texts but {len(media)} media items")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                    return_tensors="pt", return_special_tokens_mask=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "special_tokens_mask": enc["special_tokens_mask"], **collate_media(media)}


class LxmertRegionEmbedding(nn.Module):
    """LXMERT's region input (see the module docstring), used by LXMERT and the two-media model:
    ``(LN(W_f f + b_f) + LN(W_b box + b_b)) / 2`` for features (B, R, F) and boxes (B, R, 4)."""

    def __init__(self, feat_dim: int, dim: int, pos_dim: int = 4, dropout: float = 0.0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.feat = nn.Linear(feat_dim, dim)
        self.feat_norm = nn.LayerNorm(dim, eps=eps)
        self.box = nn.Linear(pos_dim, dim)
        self.box_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        dtype = self.feat.weight.dtype   # features are stored float16; compute in the model's dtype
        x = self.feat_norm(self.feat(features.to(dtype))) + self.box_norm(self.box(boxes.to(dtype)))
        return self.dropout(x / 2)                                                   # (B, R, D)


def location_features(boxes: torch.Tensor) -> torch.Tensor:
    """ViLBERT's 5-d location from normalised ``(x1, y1, x2, y2)`` boxes (..., 4): the corners and
    the share of the image the box covers (..., 5). Boxes are already divided by W and H."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)
    return torch.stack([x1, y1, x2, y2, area], dim=-1)


class VilbertRegionEmbedding(nn.Module):
    """ViLBERT's region input: ``LN(W_f f + W_l loc)`` over the regions, with the IMG token first
    (see the module docstring); ``forward`` gives ``(embeddings (B, R', dim), mask (B, R') bool)``."""

    def __init__(self, feature_dim: int, dim: int, add_img_token: bool = True, dropout: float = 0.0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.add_img_token = add_img_token
        self.feature = nn.Linear(feature_dim, dim)                          # W_f
        self.location = nn.Linear(5, dim)                                   # W_l
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def inputs(self, features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features (B, R', F), boxes (B, R', 4), mask (B, R') bool)`` with the IMG token at
        position 0: added (R' = R + 1) or, with ``add_img_token=False``, region 0 as given (R' = R)."""
        dtype = self.feature.weight.dtype
        mask = region_mask.bool()                                           # (B, R)
        # Padding is zeroed first: whatever a padded slot holds never reaches the mean, and no NaN
        # reaches the keys (a masked key's weight is 0, but 0 * NaN is NaN).
        features = features.to(dtype).masked_fill(~mask[..., None], 0.0)   # (B, R, F)
        boxes = boxes.to(dtype).masked_fill(~mask[..., None], 0.0)          # (B, R, 4)
        B = features.shape[0]
        if self.add_img_token:
            n = mask.sum(1, keepdim=True).clamp_min(1).to(dtype)            # (B, 1)
            mean = features.sum(1) / n                                      # (B, F)
            whole = boxes.new_tensor(WHOLE_IMAGE).expand(B, 1, 4)           # (B, 1, 4)
            features = torch.cat([mean[:, None], features], 1)              # (B, R+1, F)
            boxes = torch.cat([whole, boxes], 1)                            # (B, R+1, 4)
            mask = torch.cat([mask.new_ones(B, 1), mask], 1)                # (B, R+1)
        else:
            if features.shape[1] == 0:
                raise ValueError("add_img_token=False needs region 0 (the global token) in every item")
            mask = mask.clone()
            mask[:, 0] = True                                               # the global token is real
        return features, boxes, mask

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        features, boxes, mask = self.inputs(features, boxes, region_mask)
        e = self.norm(self.feature(features) + self.location(location_features(boxes)))  # (B, R', V)
        return self.dropout(e), mask
