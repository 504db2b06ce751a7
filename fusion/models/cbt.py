"""CBT: the Contrastive Bidirectional Transformer over text and continuous frame features.

Sun, Baradel, Murphy & Schmid (2019), "Learning Video Representations using Contrastive
Bidirectional Transformer", arXiv:1906.05743. Unlike VideoBERT, the frames are not quantised: masked
frames are predicted by a noise-contrastive estimation (NCE, in its InfoNCE form) against other
frames, and text and video meet in a cross-modal transformer trained contrastively.

**Visual transformer**. Frame features ``x_t`` (B, T, F) in time order (a feature
artifact's regions, their time-span boxes not read: order is time; a global mean-frame token, region
0 with ``global_token``, is left out: it would carry the masked frames' content) are embedded and
encoded::

    e_t = W_e x_t + b_e                             the frame's embedding (f_enc)        (B, T, D)
    y_t = LN(e_t + P_v[t]),  h^v = Transformer_v(y)                                      (B, T, D)

15% of the real frames are masked (their features zeroed, :func:`fusion.models.objectives.mask_regions`),
and the output at a masked frame, ``yhat_t = W_p h^v_t``, must pick the frame's own embedding
``e_t`` (of the original features) among the embeddings of all the real frames of the batch::

    NCE(x_t | x_-t) = sum_{j: x_j = x_t} exp(e_j^T yhat_t) / sum_{j in batch frames} exp(e_j^T yhat_t)
    L_visual = -mean_{t masked} log NCE(x_t | x_-t)

A frame that occurs more than once in the batch (a source slower than the sampling rate shows one
frame in several samples; a still shot) is one frame: every copy of ``x_t`` counts as the positive,
as it cannot be told apart (as a negative it would put a floor of ``log(1 + copies)`` under the loss).

**Cross-modal transformer**. The text ``s`` goes through BERT (``h^s``, (B, L, D), the
backbone's layers); the video through the visual transformer (``h^v``, unmasked); a cross-modal
transformer reads their concatenation with a modality embedding ``M`` and scores the pair by an
MLP on its first output (the text's [CLS])::

    z = Transformer_c([h^s + M_0 ; h^v + M_1]),  MI(s, v) = exp(w_2^T act(W_1 z_0 + b_1) + b_2)
    NCE(v | s) = MI(s, v) / sum_{s' in batch sentences} MI(s', v)
    L_cross = -mean_v log NCE(v | s_v)             every sentence of the batch scored with every clip

``L = w_bert L_bert + w_visual L_visual + w_cross L_cross``; ``L_bert`` is BERT's MLM on the text
(:class:`fusion.models.heads.MLMHead`); its weight is 0 by default: the text side starts from a
pretrained BERT (set ``mlm_weight`` to keep training it by MLM). ``L_cross`` scores all B^2 pairs
of a batch, so its cost grows with the square of the batch. For a dual-encoder first stage
(:mod:`fusion.retrieval`) the two single-modality encoders are pooled and projected, trained by an
optional in-batch InfoNCE (``contrastive_weight``; not in the paper). Retrieval: ``text_states`` =
``h^s``, ``media_states`` = ``h^v`` (both single-modality, computed once), ``score_states`` =
``log MI(s, v)`` of each pair.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone
from fusion.models.heads import MLMHead
from fusion.models.layers import (TransformerLayer, activation, block_sizes, init_bert_weights, key_mask,
                                  summary)
from fusion.models.lxmert import TextEmbeddings
from fusion.models.objectives import info_nce, mask_regions, mlm_mask, multi_positive_ce, pool
from fusion.models.videobert import backbone_config, load_bert, video_frames


@dataclasses.dataclass
class CBTConfig:
    """Sizes, rates and loss weights (a weight of 0 switches its objective off)."""

    vocab_size: int = 30522
    hidden_size: int = 768               # D: text, visual and cross-modal transformers alike
    num_heads: int = 12
    intermediate_size: int = 3072
    num_layers: int = 12                 # the text BERT's
    visual_layers: int = 2
    cross_layers: int = 1
    visual_feat_dim: int = 1024          # F
    max_frames: int = 256                # the visual position table
    hidden_act: str = "gelu"             # every transformer's
    max_position: int = 512              # the text's
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    mask_token_id: int | None = 103
    global_token: bool = False           # region 0 is a mean-frame token: left out
    text_pool: str = "cls"               # dual-encoder text vector: "cls" or "mean"
    contrastive_dim: int | None = None
    temperature: float = 0.07
    mlm_prob: float = 0.15
    frame_mask_prob: float = 0.15
    mlm_weight: float = 0.0              # w_bert
    visual_weight: float = 1.0           # w_visual
    cross_weight: float = 1.0            # w_cross
    contrastive_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{self.num_heads} heads do not divide hidden_size {self.hidden_size}")
        if self.text_pool not in ("cls", "mean"):
            raise ValueError(f"text_pool must be 'cls' or 'mean', got {self.text_pool!r}")
        if self.mlm_weight and self.mask_token_id is None:
            raise ValueError("MLM needs mask_token_id (or set mlm_weight=0)")


def visual_nce(pred: torch.Tensor, targets: torch.Tensor, positive: torch.Tensor,
               frame_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``L_visual`` (module docstring): ``pred`` (n, D) the predictions at the masked frames,
    ``targets`` (N, D) the embeddings of every real frame of the batch, ``positive`` (n,) each masked
    frame's row in ``targets``, ``frame_ids`` (N,) equal for equal frames (None: all distinct); a
    zero that keeps the graph when nothing is masked."""
    if not len(pred):
        return pred.sum() * 0.0 + targets.sum() * 0.0
    logits = (pred @ targets.T).float()                                              # (n, N)
    if frame_ids is None:
        return F.cross_entropy(logits, positive)
    return multi_positive_ce(logits, frame_ids[positive][:, None] == frame_ids[None, :])


def cross_nce(scores: torch.Tensor) -> torch.Tensor:
    """``L_cross`` from ``scores`` (B texts, B clips) of ``log MI``, pairs on the diagonal: each
    clip's own sentence against the batch's sentences."""
    target = torch.arange(scores.shape[1], device=scores.device)
    return F.cross_entropy(scores.T.float(), target)


class CBT(nn.Module):
    """Text BERT, visual transformer and cross-modal transformer (module docstring).

    Inputs: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``features`` (B, R, F) frames in time
    order, ``region_mask`` (B, R) (1 on real frames; None: all)."""

    def __init__(self, config: CBTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg)) for _ in range(cfg.num_layers))
        self.mlm_head = MLMHead(self.embeddings.word, D, eps)                        # tied
        self.frame = nn.Linear(cfg.visual_feat_dim, D)                              # f_enc: e_t
        self.frame_position = nn.Embedding(cfg.max_frames, D)                       # P_v
        self.frame_norm = nn.LayerNorm(D, eps=eps)
        self.visual_layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg))
                                           for _ in range(cfg.visual_layers))
        self.frame_pred = nn.Linear(D, D)                                            # W_p
        self.modality = nn.Embedding(2, D)                                           # M
        self.cross_layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg))
                                          for _ in range(cfg.cross_layers))
        self.mi = nn.Sequential(nn.Linear(D, D), activation(cfg.hidden_act), nn.Linear(D, 1))
        P = cfg.contrastive_dim or D
        self.text_proj, self.media_proj = nn.Linear(D, P), nn.Linear(D, P)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_bert_weights(self, self.config.initializer_range)
        nn.init.zeros_(self.mlm_head.bias)
        nn.init.constant_(self.logit_scale, math.log(1 / self.config.temperature))

    # -- the single-modality encoders --

    def encode_words(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``h^s`` (B, L, D): BERT over the text."""
        x = self.embeddings(input_ids)
        mask = key_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def frames(self, features: torch.Tensor, region_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(frames (B, T, F) in the model's dtype, mask (B, T) bool)``, without a global token."""
        features, mask = video_frames(features, region_mask, self.config.global_token)
        if features.shape[1] > self.config.max_frames:
            raise ValueError(f"{features.shape[1]} frames exceed max_frames {self.config.max_frames}: "
                             f"set max_regions or a larger max_frames")
        return features.to(self.frame.weight.dtype), mask

    def encode_frames(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``h^v`` (B, T, D) of ``frames`` (B, T, F) (already masked, for the masked pass)."""
        T = frames.shape[1]
        x = self.dropout(self.frame_norm(self.frame(frames) + self.frame_position.weight[:T]))
        km = key_mask(mask)
        for layer in self.visual_layers:
            x = layer(x, km)
        return x

    # -- the cross-modal transformer --

    def cross_score(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor,
                    video_mask: torch.Tensor) -> torch.Tensor:
        """``log MI(s, v)`` (B,) of pairs ``(text[i], video[i])``: ``text`` (B, L, D), ``video`` (B, T, D)."""
        x = torch.cat([text + self.modality.weight[0], video + self.modality.weight[1]], 1)  # (B, L+T, D)
        mask = key_mask(torch.cat([text_mask.bool(), video_mask.bool()], 1))
        for layer in self.cross_layers:
            x = layer(x, mask)
        return self.mi(x[:, 0]).squeeze(-1)                                          # (B,)

    def all_pairs(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor,
                  video_mask: torch.Tensor) -> torch.Tensor:
        """``log MI`` of every (sentence i, clip j) of the batch, (B, B): B^2 cross-modal passes."""
        B = text.shape[0]
        ti = torch.arange(B, device=text.device).repeat_interleave(B)                # i i i ...
        vi = torch.arange(B, device=text.device).repeat(B)                           # j j j ...
        return self.cross_score(text[ti], text_mask[ti], video[vi], video_mask[vi]).view(B, B)

    # -- retrieval --

    @property
    def has_match_head(self) -> bool:
        return bool(self.config.cross_weight)

    def text_states(self, text_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": h^s (B, L, D), "mask": (B, L)}``."""
        ids, attn = text_batch["input_ids"], text_batch.get("attention_mask")
        attn = torch.ones_like(ids) if attn is None else attn
        return {"states": self.encode_words(ids, attn), "mask": attn}

    def media_states(self, media_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": h^v (B, T, D), "mask": (B, T)}`` of the unmasked frames."""
        f, mask = self.frames(media_batch["features"], media_batch.get("region_mask"))
        return {"states": self.encode_frames(f, mask), "mask": mask.long()}

    def score_states(self, text: Mapping[str, torch.Tensor],
                     media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.cross_score(text["states"], text["mask"], media["states"], media["mask"])

    def match_score(self, text_batch: Mapping[str, torch.Tensor],
                    media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log MI`` (B,) of pair ``(text_batch[i], media_batch[i])``."""
        return self.score_states(self.text_states(text_batch), self.media_states(media_batch))

    def _text_vector(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pool(h, attn, first=self.config.text_pool == "cls")), dim=-1)

    def _media_vector(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.media_proj(pool(h, mask, first=False)), dim=-1)

    def encode_text(self, text_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit text vectors (B, P): ``h^s`` pooled and projected."""
        t = self.text_states(text_batch)
        return self._text_vector(t["states"], t["mask"])

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit clip vectors (B, P): ``h^v`` mean-pooled over the real frames, projected."""
        m = self.media_states(media_batch)
        return self._media_vector(m["states"], m["mask"])

    # -- pretraining --

    def mask_frames(self, frames: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(frames with the chosen ones zeroed, chosen (B, T) bool)``: each real frame with
        probability ``frame_mask_prob``."""
        return mask_regions(frames, mask, generator, self.config.frame_mask_prob)

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{["mlm"], "visual", "cross", ["contrastive"], "total"}`` (weight-0 objectives left out).
        ``batch``: :meth:`match_score`'s inputs in one mapping, plus optionally
        ``special_tokens_mask``; ``generator`` lives on the batch's device."""
        cfg = self.config
        ids, attn = batch["input_ids"], batch["attention_mask"]
        frames, fmask = self.frames(batch["features"], batch.get("region_mask"))
        losses: dict[str, torch.Tensor] = {}
        weights = {"mlm": cfg.mlm_weight, "visual": cfg.visual_weight, "cross": cfg.cross_weight,
                   "contrastive": cfg.contrastive_weight}
        if cfg.mlm_weight:
            maskable = attn.bool()
            if "special_tokens_mask" in batch:
                maskable &= ~batch["special_tokens_mask"].bool()
            m_ids, labels = mlm_mask(ids, maskable, cfg.mask_token_id, cfg.vocab_size, generator,
                                     cfg.mlm_prob)
            losses["mlm"] = self.mlm_head.loss(self.encode_words(m_ids, attn), labels)
        if cfg.visual_weight:
            masked, chosen = self.mask_frames(frames, fmask, generator)
            h = self.encode_frames(masked, fmask)                                    # (B, T, D)
            real = frames[fmask]                                                     # (N, F)
            targets = self.frame(real)                                               # (N, D) e_j
            row = torch.cumsum(fmask.flatten().long(), 0) - 1                        # (B*T,) row in targets
            positive = row[chosen.flatten()]                                         # (n,)
            frame_ids = torch.unique(real, dim=0, return_inverse=True)[1]            # (N,) copies alike
            losses["visual"] = visual_nce(self.frame_pred(h[chosen]), targets, positive, frame_ids)
        if cfg.cross_weight or cfg.contrastive_weight:
            text = self.encode_words(ids, attn)                                      # (B, L, D)
            video = self.encode_frames(frames, fmask)                                # (B, T, D)
            if cfg.cross_weight:
                losses["cross"] = cross_nce(self.all_pairs(text, attn, video, fmask))
            if cfg.contrastive_weight:
                scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap on 1/temperature
                losses["contrastive"] = info_nce(self._text_vector(text, attn),
                                                 self._media_vector(video, fmask), scale)
        losses["total"] = sum(weights[k] * v for k, v in losses.items())
        return losses

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=c.hidden_size, num_heads=c.num_heads, num_layers=c.num_layers,
                       visual_layers=c.visual_layers, cross_layers=c.cross_layers,
                       visual_feat_dim=c.visual_feat_dim, vocab_size=c.vocab_size)


def cbt_backbone(backbone: TextBackbone, **config: Any) -> CBT:
    """A :class:`CBT` whose text BERT (embeddings and layers) starts from a BERT-family backbone; the
    visual and cross-modal transformers and the heads start random."""
    return load_bert(CBT(CBTConfig(**backbone_config(backbone, config))), backbone)
