"""LXMERT's cross-modality encoder over two media streams: spoken captions <-> images (any two).

A spoken caption has no words to tokenise, so the language encoder of :mod:`fusion.models.lxmert` cannot
read it; everything else in LXMERT (Tan & Bansal 2019) is modality-agnostic. This model keeps
LXMERT's structure and its building blocks (:mod:`fusion.models.layers`' ``TransformerLayer`` and
``CrossLayer``, with one shared cross-attention used in both directions, and
:class:`~fusion.models.regions.LxmertRegionEmbedding`) and replaces the token embeddings by a
second region embedding::

    query frames  (B, Q, F_q), spans -> (LN(W_f f) + LN(W_b b)) / 2 -> N_Q layers --+
    media regions (B, R, F_m), boxes -> (LN(W_f f) + LN(W_b b)) / 2 -> N_R layers --+
                                                                                   v
                                          N_X cross-modality layers (as LXMERT's)
    score = w · tanh(W h_q0 + b)   (the query stream's first position after the cross layers)

Audio frames arrive as regions whose boxes are time spans ``(t0/T, 0, t1/T, 1)``
(:mod:`speech.features`); with the speech stage's ``global_token`` position 0 is the clip's mean
frame, the natural pooling position (the role of LXMERT's [CLS]).

Objectives, all from one forward pass (:meth:`BiMedia.loss`), as in :class:`fusion.models.lxmert.Lxmert`
minus the words: matching (each query paired with another item's media of the batch with
probability 0.5; binary head), in-batch InfoNCE on the single-stream vectors (which makes
:meth:`encode_text` / :meth:`encode_media` a dual encoder for the retrieval first stage), and
masked-region feature regression on both streams (15% of the real, non-global positions zeroed;
smooth L1 to the originals). A contrastive-only dual encoder is the same model with
``x_layers=0`` and the matching and region weights 0.

The query side plays the text role of the retrieval protocol: :meth:`encode_text`,
:meth:`text_states` take a *query batch* ``{"query_features", "query_boxes", "query_mask"}``;
:meth:`encode_media`, :meth:`media_states` the usual ``{"features", "boxes", "region_mask"}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.layers import CrossLayer, TransformerLayer, block_sizes, init_bert_weights, key_mask, summary
from fusion.models.objectives import info_nce, itm_pairs, mask_regions, pool, regression_loss
from fusion.models.regions import LxmertRegionEmbedding


@dataclass
class BiMediaConfig:
    """Sizes and loss weights (a weight of 0 switches its objective off)."""

    query_feat_dim: int                 # F_q, e.g. 320 (80 log-mel bins x 4 stacked frames)
    media_feat_dim: int                 # F_m, e.g. 1280 (EfficientNet-Lite0 cells)
    hidden_size: int = 256
    num_heads: int = 4
    intermediate_size: int = 1024
    q_layers: int = 2                   # N_Q query single-stream layers
    r_layers: int = 2                   # N_R media single-stream layers
    x_layers: int = 2                   # N_X cross-modality layers
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    query_global_token: bool = True     # query position 0 is a global token (pooled, never masked)
    media_global_token: bool = True
    contrastive_dim: int | None = None  # None: hidden_size
    temperature: float = 0.07
    region_mask_prob: float = 0.15
    itm_mismatch_prob: float = 0.5
    itm_weight: float = 1.0
    contrastive_weight: float = 1.0
    region_feat_weight: float = 1.0


class BiMedia(nn.Module):
    """LXMERT over a query media stream and a candidate media stream (see the module docstring)."""

    def __init__(self, config: BiMediaConfig) -> None:
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        eps = cfg.layer_norm_eps
        self.query_embedding = LxmertRegionEmbedding(cfg.query_feat_dim, D, dropout=cfg.dropout, eps=eps)
        self.media_embedding = LxmertRegionEmbedding(cfg.media_feat_dim, D, dropout=cfg.dropout, eps=eps)
        self.q_layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg)) for _ in range(cfg.q_layers))
        self.r_layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg)) for _ in range(cfg.r_layers))
        self.x_layers = nn.ModuleList(CrossLayer(**block_sizes(cfg)) for _ in range(cfg.x_layers))
        self.pooler = nn.Linear(D, D)
        self.itm = nn.Linear(D, 1)
        P = cfg.contrastive_dim or D
        self.query_proj, self.media_proj = nn.Linear(D, P), nn.Linear(D, P)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.region_transform = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D, eps=eps))
        self.query_region_feat = nn.Linear(D, cfg.query_feat_dim)
        self.media_region_feat = nn.Linear(D, cfg.media_feat_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_bert_weights(self, self.config.initializer_range)
        nn.init.constant_(self.logit_scale, math.log(1 / self.config.temperature))

    @property
    def has_match_head(self) -> bool:
        return bool(self.config.itm_weight and self.config.x_layers)

    # -- streams --

    @staticmethod
    def _mask(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device) if mask is None else mask

    @staticmethod
    def _stream(embedding: nn.Module, layers: nn.ModuleList, features: torch.Tensor, boxes: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        x, km = embedding(features, boxes), key_mask(mask)                           # (B, S, D)
        for layer in layers:
            x = layer(x, km)
        return x                                                                     # (B, S, D)

    def query_stream(self, features: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._stream(self.query_embedding, self.q_layers, features, boxes, mask)  # (B, Q, D)

    def media_stream(self, features: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._stream(self.media_embedding, self.r_layers, features, boxes, mask)  # (B, R, D)

    def cross(self, q: torch.Tensor, q_mask: torch.Tensor, m: torch.Tensor, m_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        qk, mk = key_mask(q_mask), key_mask(m_mask)
        for layer in self.x_layers:
            q, m = layer(q, qk, m, mk)
        return q, m                                                                  # (B, Q, D), (B, R, D)

    # -- retrieval API (the query side plays the text role) --

    def text_states(self, query_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f = query_batch["query_features"]
        mask = self._mask(f, query_batch.get("query_mask"))
        return {"states": self.query_stream(f, query_batch["query_boxes"], mask), "mask": mask}

    def media_states(self, media_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f = media_batch["features"]
        mask = self._mask(f, media_batch.get("region_mask"))
        return {"states": self.media_stream(f, media_batch["boxes"], mask), "mask": mask}

    def score_states(self, query: Mapping[str, torch.Tensor], media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        q, _ = self.cross(query["states"], query["mask"], media["states"], media["mask"])
        return self.itm(torch.tanh(self.pooler(q[:, 0]))).squeeze(-1)               # (B,)

    def match_score(self, query_batch: Mapping[str, torch.Tensor],
                    media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.score_states(self.text_states(query_batch), self.media_states(media_batch))

    def _query_vector(self, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.query_proj(pool(q, mask, self.config.query_global_token)), dim=-1)

    def _media_vector(self, m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.media_proj(pool(m, mask, self.config.media_global_token)), dim=-1)

    def encode_text(self, query_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit-length query vectors (B, P) from the query stream alone."""
        s = self.text_states(query_batch)
        return self._query_vector(s["states"], s["mask"])

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit-length media vectors (B, P) from the media stream alone."""
        s = self.media_states(media_batch)
        return self._media_vector(s["states"], s["mask"])

    # -- pretraining --

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"itm", "contrastive", "region_feat", "total"}`` (weight-0 objectives left out) on a
        batch of matched pairs: query batch keys plus media batch keys."""
        cfg = self.config
        qf, qb = batch["query_features"], batch["query_boxes"]
        mf, mb = batch["features"], batch["boxes"]
        q_mask, m_mask = self._mask(qf, batch.get("query_mask")), self._mask(mf, batch.get("region_mask"))
        B = qf.shape[0]
        losses: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        regions = bool(cfg.region_feat_weight)
        q_chosen = m_chosen = None
        if regions:  # zero 15% of the real positions of both streams (never a global token)
            qm, mm = q_mask.bool().clone(), m_mask.bool().clone()
            if cfg.query_global_token:
                qm[:, 0] = False
            if cfg.media_global_token:
                mm[:, 0] = False
            qf_in, q_chosen = mask_regions(qf, qm, generator, cfg.region_mask_prob)
            mf_in, m_chosen = mask_regions(mf, mm, generator, cfg.region_mask_prob)
        else:
            qf_in, mf_in = qf, mf
        q = self.query_stream(qf_in, qb, q_mask)                                     # (B, Q, D)
        m = self.media_stream(mf_in, mb, m_mask)                                     # (B, R, D)
        if cfg.contrastive_weight:
            scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
            losses["contrastive"] = info_nce(self._query_vector(q, q_mask), self._media_vector(m, m_mask), scale)
            weights["contrastive"] = cfg.contrastive_weight
        if cfg.itm_weight or regions:
            idx, matched = itm_pairs(B, generator, cfg.itm_mismatch_prob, qf.device)
            if not cfg.itm_weight:
                idx, matched = torch.arange(B, device=qf.device), torch.ones(B, dtype=torch.bool, device=qf.device)
            qx, mx = self.cross(q[idx], q_mask[idx], m, m_mask)                       # query idx[i] with media i
            if cfg.itm_weight:
                logit = self.itm(torch.tanh(self.pooler(qx[:, 0]))).squeeze(-1)
                losses["itm"] = F.binary_cross_entropy_with_logits(logit.float(), matched.float())
                weights["itm"] = cfg.itm_weight
            if regions:
                keep = matched  # a region is reconstructed from its own pair only
                qc, mc = q_chosen[idx] & keep[:, None], m_chosen & keep[:, None]
                parts = []
                for h, chosen, head, target in ((qx, qc, self.query_region_feat, qf[idx]),
                                                (mx, mc, self.media_region_feat, mf)):
                    parts.append(regression_loss(head(self.region_transform(h[chosen])), target[chosen]))
                losses["region_feat"] = (parts[0] + parts[1]) / 2
                weights["region_feat"] = cfg.region_feat_weight
        losses["total"] = sum(weights[k] * losses[k] for k in weights)
        return losses

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=c.hidden_size, q_layers=c.q_layers, r_layers=c.r_layers,
                       x_layers=c.x_layers, query_feat_dim=c.query_feat_dim, media_feat_dim=c.media_feat_dim)


def dual_config(config: BiMediaConfig) -> BiMediaConfig:
    """The contrastive-only dual encoder of the same streams: no cross layers, InfoNCE alone."""
    return replace(config, x_layers=0, itm_weight=0.0, region_feat_weight=0.0, contrastive_weight=1.0)
