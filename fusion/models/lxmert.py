"""LXMERT: a language encoder, an object-relationship encoder and cross-modality layers over region features.

Tan & Bansal (2019), "LXMERT: Learning Cross-Modality Encoder Representations from Transformers",
EMNLP; reference code airsplay/lxmert (``lxrt/modeling.py``). ``transformers.LxmertModel`` is an
independent port of the same code; :func:`fusion.models.hf_weights.from_hf` loads its weights and
``tests/fusion/test_lxmert.py`` checks that both compute the same outputs (atol 1e-5).

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
of its (padded) regions instead of producing NaN, as the reference's additive mask does. The blocks
are :mod:`fusion.models.layers`' (SDPA attention with one fused ``qkv`` projection; the shared
cross-attention projects both streams in one matmul); the arithmetic is the reference's.

Pretraining (paper section 3, plus a contrastive first stage), all from one forward pass by
:meth:`Lxmert.loss`, with the helpers of :mod:`fusion.models.objectives`:

* MLM: 15% of the words, 80/10/10, head tied to the word embeddings. As in the reference code,
  words and regions are masked in every pair, matched or not.
* Masked region modelling: 15% of the real regions have their features set to zero; the cross
  output of each predicts the original features (smooth L1 or MSE, averaged over the masked
  regions, so no ``visual_loss_normalizer`` of 6.67 = 1/0.15 is needed) and, when the batch has
  ``region_labels``, the detector's class (cross-entropy on ids, or KL to a class distribution).
* Image-text matching: each text is replaced, with probability 0.5, by another text of the batch;
  a binary head on the pooled output says whether the pair matches (the reference's 2-way
  ``seq_relationship`` is the same model: its logit difference is this head's logit). The other
  text is uniform over the batch (the paper) or, with ``itm_hard_negatives``, drawn by in-batch
  contrastive similarity (ALBEF's hard negatives, Li et al. 2021). With ``itm_on_dual`` (not in
  LXMERT) the match logit is ``itm(pooled) + w * cos(t, m)``, the pair's dual-encoder cosine
  (gradient stopped) with a learnt weight ``w`` starting at 1/temperature, so re-ranking starts
  from the first stage's order.
* In-batch contrastive InfoNCE (CLIP/ALBEF's ITC, not in LXMERT): the *single-stream* outputs, text
  [CLS] (or mean) and media mean (or the global token), projected and L2-normalised, with a
  learnable temperature. It makes :meth:`Lxmert.encode_text` / :meth:`Lxmert.encode_media` a dual
  encoder for the first retrieval stage, re-ranked by the cross-encoder :meth:`Lxmert.match_score`.
  By default it reuses the single-stream states of the masked inputs (no extra forward pass; the
  positives are the *original* pairs, since the ITM shuffle only applies at the cross layers);
  ``contrastive_on_clean`` spends a second single-stream pass on the uncorrupted inputs instead.

The paper's model is ``Lxmert(LxmertConfig())``: hidden 768, 12 heads, 9/5/5 layers, BERT's
uncased vocabulary, 2048-d features. :func:`fusion.models.hf_weights.lxmert_backbone` builds one
whose language stream is a BERT-family :class:`~fusion.models.backbone.TextBackbone` (its
embeddings and layers 0..N-1; vision and cross layers start random).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.heads import MLMHead
from fusion.models.layers import (CrossLayer, TransformerLayer, activation, block_sizes, init_bert_weights,
                                  key_mask, summary)
from fusion.models.objectives import (hard_negative_pairs, info_nce, itm_pairs, mask_regions, mlm_mask, pool,
                                      region_label_loss, regression_loss)
from fusion.models.regions import LxmertRegionEmbedding

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


# ----------------------------------------------------------------------------------------------
# inputs


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


class LxmertOutput(NamedTuple):
    language_output: torch.Tensor   # (B, L, D) after the cross layers
    vision_output: torch.Tensor     # (B, R, D) after the cross layers
    pooled_output: torch.Tensor     # (B, D) tanh(W [CLS] + b) of language_output
    text_single: torch.Tensor       # (B, L, D) the language encoder alone (before cross layers)
    media_single: torch.Tensor      # (B, R, D) the object-relationship encoder alone


# ----------------------------------------------------------------------------------------------
# the model


class Corruption(NamedTuple):
    input_ids: torch.Tensor              # (B, L) after MLM masking
    mlm_labels: torch.Tensor | None      # (B, L) original ids at chosen words, IGNORE elsewhere
    features: torch.Tensor               # (B, R, F) chosen regions zeroed
    masked_regions: torch.Tensor | None  # (B, R) bool, the chosen regions
    text_index: torch.Tensor             # (B,) item i is paired with text text_index[i]
    matched: torch.Tensor | None         # (B,) bool, text_index[i] == i


class Lxmert(nn.Module):
    """LXMERT with its pretraining heads (see the module docstring).

    Inputs: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``features`` (B, R, F) (float16 fine),
    ``boxes`` (B, R, 4), ``region_mask`` (B, R) (1 on real regions; None: all real), optional
    ``token_type_ids`` (B, L). :func:`fusion.models.regions.collate_regions` pads per-item regions
    into that layout.
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.config = cfg = config
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = TextEmbeddings(cfg)
        self.visual_embedding = LxmertRegionEmbedding(cfg.visual_feat_dim, D, cfg.visual_pos_dim,
                                                      cfg.dropout, eps)
        self.l_layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg)) for _ in range(cfg.l_layers))
        self.r_layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg)) for _ in range(cfg.r_layers))
        self.x_layers = nn.ModuleList(CrossLayer(**block_sizes(cfg)) for _ in range(cfg.x_layers))
        self.pooler = nn.Linear(D, D)                                # tanh(W [CLS] + b)
        # pretraining heads
        self.mlm_head = MLMHead(self.embeddings.word, D, eps)        # tied to the word embeddings
        self.region_transform = nn.Sequential(nn.Linear(D, D), activation(cfg.hidden_act),
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
        init_bert_weights(self, self.config.initializer_range)
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
        h = pool(text, attention_mask, first=self.config.text_pool == "cls")          # (B, D)
        return F.normalize(self.text_proj(h), dim=-1)                                # (B, P)

    def _media_vector(self, media: torch.Tensor, region_mask: torch.Tensor | None) -> torch.Tensor:
        h = pool(media, region_mask, first=self.config.global_token)                  # (B, D)
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
                losses["region_feat"] = regression_loss(self.region_feat(h), features[chosen],
                                                        cfg.region_loss)             # (n, F) each
                weights["region_feat"] = cfg.region_feat_weight
            if labels_on:
                if self.region_label is None:
                    raise ValueError("the batch has region_labels but the config has no num_region_labels")
                losses["region_label"] = region_label_loss(self.region_label(h),
                                                           batch["region_labels"][chosen])
                weights["region_label"] = cfg.region_label_weight
        if cfg.itm_weight:
            logit = self._match_logit(self.pool(lang), text[text_idx], attn[text_idx], media,
                                      region_mask)                                   # (B,)
            losses["itm"] = F.binary_cross_entropy_with_logits(logit.float(), c.matched.float())
            weights["itm"] = cfg.itm_weight
        losses["total"] = sum(weights[k] * losses[k] for k in weights)
        return losses

    def num_parameters(self, encoder_only: bool = False) -> int:
        heads = ("mlm_head.", "region_", "itm.", "itm_dual", "text_proj.", "media_proj.", "logit_scale")
        return sum(p.numel() for n, p in self.named_parameters()
                   if not (encoder_only and n.startswith(heads)))

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=c.hidden_size, num_heads=c.num_heads, l_layers=c.l_layers,
                       r_layers=c.r_layers, x_layers=c.x_layers, visual_feat_dim=c.visual_feat_dim,
                       vocab_size=c.vocab_size)
