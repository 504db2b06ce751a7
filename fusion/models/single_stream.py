"""Single-stream vision-language encoders: text tokens and region embeddings in ONE transformer.

One model; its variants (:data:`VARIANTS`) differ where the papers do, in region input and objectives:

* **VisualBERT** (Li, Yatskar, Yin, Hsieh & Chang 2019, "VisualBERT: A Simple and Performant
  Baseline for Vision and Language", arXiv:1908.03557; code uclanlp/visualbert). Regions are
  projected into the word-embedding space and get a segment embedding and a position embedding of
  their own; one LayerNorm (the text's) over the whole sequence::

      e_w = word(w) + pos(i) + seg_t(0)        e_f = W_f f + pos_v(0) + seg_v(1)
      x   = LN([e_w ; e_f])                                                        (B, L+R, D)

  Boxes are not used. Objectives: MLM on the text, and sentence-image prediction, a binary head on
  the pooled [CLS] ``tanh(W h_0 + b)``. The paper's text is two captions, the second one of the same
  image or (half the time) a random one; with one caption per pair (stele's batches) that is ITM on
  the pair, and MLM counts matched pairs only (in the paper the masked text always holds a caption
  of the image). ``transformers.VisualBertModel`` is an independent port;
  :func:`fusion.models.hf_visualbert.from_hf_visualbert` loads its weights with equal outputs.
* **UNITER** (Chen, Li, Yu, El Kholy, Ahmed, Gan, Cheng & Liu 2020, "UNITER: UNiversal Image-TExt
  Representation Learning", ECCV; code ChenRocks/UNITER ``model/model.py``, ``model/pretrain.py``,
  ``model/ot.py``). Regions carry their 7-d location ``(x1, y1, x2, y2, w, h, w*h)``::

      e_f = LN(LN(W_f f) + LN(W_l loc) + seg_t(1))        the text's segment table, row 1

  Objectives: MLM, masked region feature regression (MRFR: the output at a masked region regresses
  the original feature, MSE, through a transform and ``W_f^T``, tied to the input projection), MRC-kl
  when the batch has class distributions, ITM, and word-region alignment (WRA) by optimal transport.
  *Conditional masking*: one modality is masked at a time, on matched pairs only (UNITER samples one
  task per batch; here each item masks its words or its regions with probability 1/2, so one pass
  serves both), and ITM/WRA run on a second, uncorrupted pass. Masked regions are zeroed plus a
  learnt mask vector (UNITER's ``mask_embedding``).

WRA (UNITER section 3.2): the transport plan ``T`` between the text outputs ``t_i`` ([CLS] and [SEP]
included) and the region outputs ``v_j``, uniform masses over the real positions, cost
``C_ij = 1 - cos(t_i, v_j)``, by IPOT (Xie et al. 2018, "A Fast Proximal Point Method for Computing
Exact Wasserstein Distance") without gradient; ``D = sum_ij C_ij T_ij`` is differentiated through C::

    G = exp(-C / beta),  T = 1 1^T,  sigma = 1_N / N
    repeat n:  Q = G * T;  repeat k: delta = a / (Q sigma),  sigma = b / (Q^T delta)
               T = diag(delta) Q diag(sigma)
    L_WRA = (sum_{matched} D - sum_{mismatched} D) / B

Retrieval (:mod:`fusion.retrieval.scorer`): only the embeddings are single-modality, so
``text_states`` / ``media_states`` are the embedded inputs and ``score_states`` runs the whole
transformer on the pair. ``encode_text`` / ``encode_media`` run the same transformer over one
modality alone (UNITER's model accepts text-only and image-only inputs) for a dual-encoder first
stage, trained by an optional in-batch InfoNCE (``contrastive_weight``; not in the papers).
Masked regions never include padding nor a global token (region 0 with ``global_token``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.heads import MLMHead
from fusion.models.layers import (TransformerLayer, activation, block_sizes, init_bert_weights, key_mask,
                                  summary)
from fusion.models.lxmert import TextEmbeddings
from fusion.models.objectives import (IGNORE, info_nce, itm_pairs, mask_regions, mlm_mask, pool,
                                      region_label_loss, regression_loss)


@dataclasses.dataclass
class SingleStreamConfig:
    """Sizes, inputs, rates and loss weights (a loss weight of 0 switches its objective off)."""

    variant: str = "visualbert"          # a name of VARIANTS (checkpoint metadata)
    vocab_size: int = 30522
    hidden_size: int = 768               # D
    num_heads: int = 12
    intermediate_size: int = 3072
    num_layers: int = 12
    visual_feat_dim: int = 2048          # F
    max_position: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    mask_token_id: int | None = 103
    region_input: str = "visualbert"     # "visualbert" (projection + segment) or "uniter" (+ 7-d location)
    global_token: bool = False           # region 0 is a global token: never masked; the media vector
    num_region_labels: int | None = None  # C for MRC (class ids or distributions)
    text_pool: str = "cls"               # dual-encoder text vector: "cls" or "mean"
    contrastive_dim: int | None = None
    temperature: float = 0.07
    mlm_prob: float = 0.15
    region_mask_prob: float = 0.15
    itm_mismatch_prob: float = 0.5
    conditional_masking: bool = False    # UNITER: one modality masked per item; ITM on a clean pass
    masked_loss_on_mismatched: bool = False  # masked losses on mismatched pairs too
    region_loss: str = "mse"             # MRFR: "mse" (UNITER) or "smooth_l1"
    ot_beta: float = 0.5                 # IPOT's proximal step (UNITER: 0.5, 50 iterations, k = 1)
    ot_iterations: int = 50
    ot_inner: int = 1
    mlm_weight: float = 1.0
    region_feat_weight: float = 0.0
    region_label_weight: float = 0.0
    itm_weight: float = 1.0
    wra_weight: float = 0.0              # UNITER's itm_ot_lambda: 0.1
    contrastive_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        for field, value, allowed in (("region_input", self.region_input, ("visualbert", "uniter")),
                                      ("text_pool", self.text_pool, ("cls", "mean")),
                                      ("region_loss", self.region_loss, ("mse", "smooth_l1"))):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        if self.region_input == "uniter" and self.type_vocab_size < 2:
            raise ValueError("UNITER's regions take row 1 of the segment table: type_vocab_size >= 2")
        if self.mlm_weight and self.mask_token_id is None:
            raise ValueError("MLM needs mask_token_id (or set mlm_weight=0)")


# parameters outside the encoder (no counterpart in transformers' VisualBertModel)
HEADS = ("mlm_head.", "region_", "itm.", "text_proj.", "media_proj.", "logit_scale", "regions.mask_vector")

VARIANTS: dict[str, dict[str, Any]] = {
    # Li et al. 2019: projected regions with segment 1, MLM + sentence-image prediction.
    "visualbert": {"region_input": "visualbert", "mlm_weight": 1.0, "itm_weight": 1.0,
                   "region_feat_weight": 0.0, "region_label_weight": 0.0, "wra_weight": 0.0,
                   "conditional_masking": False},
    # Chen et al. 2020: MLM + MRFR + MRC-kl (given labels) + ITM + WRA (itm_ot_lambda 0.1).
    "uniter": {"region_input": "uniter", "mlm_weight": 1.0, "itm_weight": 1.0, "region_feat_weight": 1.0,
               "region_label_weight": 1.0, "wra_weight": 0.1, "conditional_masking": True,
               "region_loss": "mse"},
}


def variant_config(name: str, **overrides: Any) -> SingleStreamConfig:
    """The config of variant ``name`` with ``overrides`` (sizes, rates, weights)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown single-stream variant {name!r}; known: {sorted(VARIANTS)}")
    return SingleStreamConfig(**({"variant": name} | VARIANTS[name] | overrides))


# ----------------------------------------------------------------------------------------------
# region inputs


def uniter_location(boxes: torch.Tensor) -> torch.Tensor:
    """UNITER's 7-d location from normalised ``(x1, y1, x2, y2)`` (..., 4): corners, width, height, area."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)                      # (..., 7)


class VisualBertRegions(nn.Module):
    """``LN_text(W_f f + pos_v(0) + seg_v(1))`` (the text's LayerNorm and dropout, passed in)."""

    def __init__(self, cfg: SingleStreamConfig) -> None:
        super().__init__()
        self.feat = nn.Linear(cfg.visual_feat_dim, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type = nn.Embedding(max(cfg.type_vocab_size, 2), cfg.hidden_size)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, text: TextEmbeddings,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        x = self.feat(features) + self.position.weight[0] + self.token_type.weight[1]  # (B, R, D)
        return text.dropout(text.norm(x))


class UniterRegions(nn.Module):
    """``LN(LN(W_f f') + LN(W_l loc) + seg_t(1))``, ``f' = f + m`` at masked regions (``m`` learnt)."""

    def __init__(self, cfg: SingleStreamConfig) -> None:
        super().__init__()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.feat = nn.Linear(cfg.visual_feat_dim, D)
        self.feat_norm = nn.LayerNorm(D, eps=eps)
        self.location = nn.Linear(7, D)
        self.location_norm = nn.LayerNorm(D, eps=eps)
        self.norm = nn.LayerNorm(D, eps=eps)
        self.mask_vector = nn.Parameter(torch.zeros(cfg.visual_feat_dim))

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, text: TextEmbeddings,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        if masked is not None:
            features = features + masked[..., None].to(features.dtype) * self.mask_vector  # (B, R, F)
        loc = uniter_location(boxes.to(features.dtype))                             # (B, R, 7)
        x = self.feat_norm(self.feat(features)) + self.location_norm(self.location(loc))
        return text.dropout(self.norm(x + text.token_type.weight[1]))               # (B, R, D)


# ----------------------------------------------------------------------------------------------
# word-region alignment by optimal transport


@torch.no_grad()
def ipot(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor, beta: float = 0.5,
         iterations: int = 50, inner: int = 1) -> torch.Tensor:
    """The IPOT transport plan (B, M, N) for ``cost`` (B, M, N) between uniform masses on the real
    rows ``x_mask`` (B, M) and columns ``y_mask`` (B, N) (see the module docstring); zero on padding."""
    xm, ym = x_mask.to(cost.dtype), y_mask.to(cost.dtype)
    a = xm / xm.sum(1, keepdim=True).clamp_min(1)                                   # (B, M)
    b = ym / ym.sum(1, keepdim=True).clamp_min(1)                                   # (B, N)
    joint = xm[:, :, None] * ym[:, None, :]                                         # (B, M, N)
    G = torch.exp(-cost / beta) * joint
    T, sigma = joint.clone(), b.clone()
    tiny = torch.finfo(cost.dtype).tiny    # padded rows/columns have no mass: 0 / tiny = 0, never NaN
    for _ in range(iterations):
        Q = G * T
        for _ in range(inner):
            delta = a / (Q @ sigma[..., None]).squeeze(-1).clamp_min(tiny)          # (B, M)
            sigma = b / (Q.transpose(1, 2) @ delta[..., None]).squeeze(-1).clamp_min(tiny)  # (B, N)
        T = delta[:, :, None] * Q * sigma[:, None, :]
    return T


def ot_distance(x: torch.Tensor, x_mask: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor,
                beta: float = 0.5, iterations: int = 50, inner: int = 1) -> torch.Tensor:
    """UNITER's WRA distance (B,) between ``x`` (B, M, D) and ``y`` (B, N, D): ``sum C * T`` with
    ``C = 1 - cos`` and ``T`` the (gradient-free) IPOT plan; in float32, as the reference."""
    with torch.autocast(x.device.type, enabled=False):   # float32 under bf16 training too
        x, y = F.normalize(x.float(), dim=-1, eps=1e-5), F.normalize(y.float(), dim=-1, eps=1e-5)
        cost = 1 - x @ y.transpose(1, 2)                                            # (B, M, N)
        plan = ipot(cost.detach(), x_mask.bool(), y_mask.bool(), beta, iterations, inner)
        return (cost * plan).sum((1, 2))                                            # (B,)


# ----------------------------------------------------------------------------------------------
# the model


class SingleStreamOutput(NamedTuple):
    text: torch.Tensor      # (B, L, D) outputs at the text positions
    media: torch.Tensor     # (B, R, D) outputs at the regions
    pooled: torch.Tensor    # (B, D) tanh(W h_[CLS] + b)


class Masking(NamedTuple):
    input_ids: torch.Tensor         # (B, L) after MLM masking
    mlm_labels: torch.Tensor        # (B, L) original ids at chosen words, IGNORE elsewhere
    features: torch.Tensor          # (B, R, F) chosen regions zeroed
    masked_regions: torch.Tensor    # (B, R) bool


class SingleStream(nn.Module):
    """One transformer over ``[text ; regions]`` with its pretraining heads (module docstring).

    Inputs: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``features`` (B, R, F), ``boxes``
    (B, R, 4), ``region_mask`` (B, R) (1 on real regions; None: all), ``token_type_ids`` (B, L)."""

    def __init__(self, config: SingleStreamConfig) -> None:
        super().__init__()
        self.config = cfg = config
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = TextEmbeddings(cfg)
        self.regions = (VisualBertRegions if cfg.region_input == "visualbert" else UniterRegions)(cfg)
        self.layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg)) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(D, D)
        self.mlm_head = MLMHead(self.embeddings.word, D, eps)                        # tied
        self.region_transform = nn.Sequential(nn.Linear(D, D), activation(cfg.hidden_act),
                                              nn.LayerNorm(D, eps=eps))
        self.region_feat_bias = nn.Parameter(torch.zeros(cfg.visual_feat_dim))      # decoder: W_f^T (tied)
        self.region_label = (nn.Sequential(nn.Linear(D, D), activation(cfg.hidden_act),
                                           nn.LayerNorm(D, eps=eps), nn.Linear(D, cfg.num_region_labels))
                             if cfg.num_region_labels else None)                    # MRC: its own transform
        self.itm = nn.Linear(D, 1)
        P = cfg.contrastive_dim or D
        self.text_proj, self.media_proj = nn.Linear(D, P), nn.Linear(D, P)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation; the MLM and MRFR biases zero; UNITER's mask vector normal(0, std)
        (its ``mask_embedding`` row); InfoNCE's scale log(1/temperature)."""
        init_bert_weights(self, self.config.initializer_range)
        nn.init.zeros_(self.mlm_head.bias)
        nn.init.zeros_(self.region_feat_bias)
        if isinstance(self.regions, UniterRegions):
            nn.init.normal_(self.regions.mask_vector, std=self.config.initializer_range)
        nn.init.constant_(self.logit_scale, math.log(1 / self.config.temperature))

    # -- encoder --

    def embed_text(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids, token_type_ids)                            # (B, L, D)

    def embed_media(self, features: torch.Tensor, boxes: torch.Tensor,
                    masked: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.regions.feat.weight.dtype   # features are stored float16
        return self.regions(features.to(dtype), boxes, self.embeddings, masked)     # (B, R, D)

    def encode(self, text: torch.Tensor | None, text_mask: torch.Tensor | None, media: torch.Tensor | None,
               media_mask: torch.Tensor | None) -> torch.Tensor:
        """The layers over ``[text ; media]`` (either may be None: one modality alone), (B, S, D)."""
        parts = [(x, m) for x, m in ((text, text_mask), (media, media_mask)) if x is not None]
        x = torch.cat([p for p, _ in parts], 1)                                      # (B, L+R, D)
        masks = [torch.ones(p.shape[:2], dtype=torch.bool, device=p.device) if m is None else m.bool()
                 for p, m in parts]
        mask = key_mask(torch.cat(masks, 1))                                         # (B, 1, 1, L+R)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))                                # (B, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, features: torch.Tensor,
                boxes: torch.Tensor, region_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                masked_regions: torch.Tensor | None = None) -> SingleStreamOutput:
        L = input_ids.shape[1]
        h = self.encode(self.embed_text(input_ids, token_type_ids), attention_mask,
                        self.embed_media(features, boxes, masked_regions), region_mask)  # (B, L+R, D)
        return SingleStreamOutput(h[:, :L], h[:, L:], self.pool(h))

    # -- retrieval: cross-encoder score and dual-encoder vectors --

    @property
    def has_match_head(self) -> bool:
        return bool(self.config.itm_weight)

    def match_score(self, text_batch: Mapping[str, torch.Tensor],
                    media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """ITM logit (B,) of pair ``(text_batch[i], media_batch[i])``; ``sigmoid`` is P(match)."""
        out = self(text_batch["input_ids"], text_batch.get("attention_mask"), media_batch["features"],
                   media_batch["boxes"], media_batch.get("region_mask"), text_batch.get("token_type_ids"))
        return self.itm(out.pooled).squeeze(-1)

    def text_states(self, text_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, L, D) embedded text, "mask": (B, L)}`` (the only text-alone part)."""
        ids, attn = text_batch["input_ids"], text_batch.get("attention_mask")
        attn = torch.ones_like(ids) if attn is None else attn
        return {"states": self.embed_text(ids, text_batch.get("token_type_ids")), "mask": attn}

    def media_states(self, media_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, R, D) embedded regions, "mask": (B, R)}``."""
        f, rm = media_batch["features"], media_batch.get("region_mask")
        rm = torch.ones(f.shape[:2], dtype=torch.long, device=f.device) if rm is None else rm
        return {"states": self.embed_media(f, media_batch["boxes"]), "mask": rm}

    def score_states(self, text: Mapping[str, torch.Tensor],
                     media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`match_score` from :meth:`text_states` and :meth:`media_states` of the pairs (B,)."""
        h = self.encode(text["states"], text["mask"], media["states"], media["mask"])
        return self.itm(self.pool(h)).squeeze(-1)

    def encode_text(self, text_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit text vectors (B, P): the transformer over the text alone, pooled and projected."""
        attn = text_batch.get("attention_mask")
        h = self.encode(self.embed_text(text_batch["input_ids"], text_batch.get("token_type_ids")), attn,
                        None, None)                                                  # (B, L, D)
        return F.normalize(self.text_proj(pool(h, attn, first=self.config.text_pool == "cls")), dim=-1)

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit media vectors (B, P): the transformer over the regions alone, mean-pooled (or the
        global token), projected."""
        rm = media_batch.get("region_mask")
        h = self.encode(None, None, self.embed_media(media_batch["features"], media_batch["boxes"]), rm)
        return F.normalize(self.media_proj(pool(h, rm, first=self.config.global_token)), dim=-1)

    # -- pretraining --

    def corrupt(self, batch: Mapping[str, torch.Tensor], text_index: torch.Tensor, words_on: torch.Tensor,
                regions_on: torch.Tensor, generator: torch.Generator | None = None) -> Masking:
        """MLM (80/10/10) on the words of items ``words_on`` (B,) bool, of the texts ``text_index``
        (B,); regions zeroed in items ``regions_on`` (B,). Special tokens, padding, padded regions
        and a global token are never chosen. ``generator`` lives on the batch's device."""
        cfg = self.config
        ids, attn = batch["input_ids"][text_index], batch["attention_mask"][text_index]
        labels = torch.full_like(ids, IGNORE)
        if cfg.mlm_weight:
            maskable = attn.bool() & words_on[:, None]
            special = batch.get("special_tokens_mask")
            if special is not None:
                maskable &= ~special[text_index].bool()
            ids, labels = mlm_mask(ids, maskable, cfg.mask_token_id, cfg.vocab_size, generator, cfg.mlm_prob)
        features = batch["features"]
        rm = batch.get("region_mask")
        maskable_r = (torch.ones(features.shape[:2], dtype=torch.bool, device=ids.device) if rm is None
                      else rm.bool().clone()) & regions_on[:, None]
        if cfg.global_token and maskable_r.shape[1]:
            maskable_r[:, 0] = False
        features, chosen = mask_regions(features, maskable_r, generator, cfg.region_mask_prob)
        return Masking(ids, labels, features, chosen)

    def masked_inputs(self, batch: Mapping[str, torch.Tensor], text_index: torch.Tensor, regions: bool,
                      generator: torch.Generator | None = None) -> Masking:
        """The masking of one pretraining pass over the texts ``text_index``: words (when MLM is on)
        and, when ``regions``, regions; with ``conditional_masking`` each item masks its words or
        its regions (probability 1/2 each when both objectives are on), never both."""
        cfg = self.config
        B, dev, words = len(text_index), text_index.device, bool(cfg.mlm_weight)
        on_words = torch.full((B,), words, dtype=torch.bool, device=dev)
        on_regions = torch.full((B,), regions, dtype=torch.bool, device=dev)
        if cfg.conditional_masking:
            if words and regions:
                on_words = torch.rand(B, generator=generator, device=dev) < 0.5
            on_regions = ~on_words & regions
        return self.corrupt(batch, text_index, on_words, on_regions, generator)

    def _masked_losses(self, out: SingleStreamOutput, m: Masking, batch: Mapping[str, torch.Tensor],
                       keep: torch.Tensor, labels_on: bool, losses: dict, weights: dict) -> None:
        """MLM, MRFR and MRC at the masked positions of the items ``keep`` (B,) bool."""
        cfg = self.config
        if cfg.mlm_weight:
            losses["mlm"] = self.mlm_head.loss(out.text, m.mlm_labels.masked_fill(~keep[:, None], IGNORE))
            weights["mlm"] = cfg.mlm_weight
        at = m.masked_regions & keep[:, None]                                        # (B, R)
        if cfg.region_feat_weight:   # UNITER's decoder: W_f^T, tied to the input projection
            h = self.region_transform(out.media[at])                                 # (n, D)
            pred = F.linear(h, self.regions.feat.weight.t(), self.region_feat_bias)  # (n, F)
            losses["region_feat"] = regression_loss(pred, batch["features"][at], cfg.region_loss)
            weights["region_feat"] = cfg.region_feat_weight
        if labels_on:
            if self.region_label is None:
                raise ValueError("the batch has region_labels but the config has no num_region_labels")
            logits = self.region_label(out.media[at])                                # (n, C)
            losses["region_label"] = region_label_loss(logits, batch["region_labels"][at])
            weights["region_label"] = cfg.region_label_weight

    def _match_losses(self, out: SingleStreamOutput, attn: torch.Tensor, region_mask: torch.Tensor,
                      matched: torch.Tensor, losses: dict, weights: dict) -> None:
        """ITM (binary cross-entropy on the match logit) and WRA (module docstring)."""
        cfg = self.config
        logit = self.itm(out.pooled).squeeze(-1)                                     # (B,)
        losses["itm"] = F.binary_cross_entropy_with_logits(logit.float(), matched.float())
        weights["itm"] = cfg.itm_weight
        if cfg.wra_weight:
            d = ot_distance(out.text, attn, out.media, region_mask, cfg.ot_beta, cfg.ot_iterations,
                            cfg.ot_inner)                                            # (B,)
            losses["wra"] = (d[matched].sum() - d[~matched].sum()) / len(d)
            weights["wra"] = cfg.wra_weight

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"mlm", ["region_feat"], ["region_label"], "itm", ["wra"], ["contrastive"], "total"}``
        (objectives with weight 0 left out); total = the weighted sum. ``batch``: the
        :meth:`forward` inputs plus optionally ``special_tokens_mask`` and ``region_labels`` ((B, R)
        ids or (B, R, C) distributions). ``generator`` must live on the batch's device."""
        cfg = self.config
        ids, attn, tt = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        features, boxes = batch["features"], batch["boxes"]
        B, dev = ids.shape[0], ids.device
        rm = batch.get("region_mask")
        rm = torch.ones(features.shape[:2], dtype=torch.long, device=dev) if rm is None else rm
        labels_on = bool(cfg.region_label_weight) and "region_labels" in batch
        words, regions = bool(cfg.mlm_weight), bool(cfg.region_feat_weight) or labels_on
        same = torch.arange(B, device=dev)
        text_index, matched = same, torch.ones(B, dtype=torch.bool, device=dev)
        if cfg.itm_weight:
            text_index, matched = itm_pairs(B, generator, cfg.itm_mismatch_prob, dev)
        losses: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}

        def run(m: Masking, ti: torch.Tensor) -> SingleStreamOutput:
            return self(m.input_ids, attn[ti], m.features, boxes, rm, None if tt is None else tt[ti],
                        m.masked_regions)

        if cfg.conditional_masking:
            # masked modelling on the true pairs, each item's words or its regions; ITM on clean pairs
            if words or regions:
                m = self.masked_inputs(batch, same, regions, generator)
                self._masked_losses(run(m, same), m, batch, torch.ones_like(matched), labels_on, losses,
                                    weights)
            if cfg.itm_weight:
                clean = Masking(ids[text_index], torch.full_like(ids, IGNORE), features,
                                torch.zeros_like(rm, dtype=torch.bool))
                self._match_losses(run(clean, text_index), attn[text_index], rm, matched, losses, weights)
        else:
            # one pass: masked words (and regions) on the ITM pairing
            m = self.masked_inputs(batch, text_index, regions, generator)
            out = run(m, text_index)
            keep = matched | cfg.masked_loss_on_mismatched
            self._masked_losses(out, m, batch, keep, labels_on, losses, weights)
            if cfg.itm_weight:
                self._match_losses(out, attn[text_index], rm, matched, losses, weights)
        if cfg.contrastive_weight:
            scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap on 1/temperature
            losses["contrastive"] = info_nce(self.encode_text(batch), self.encode_media(batch), scale)
            weights["contrastive"] = cfg.contrastive_weight
        losses["total"] = sum(weights[k] * losses[k] for k in weights)
        return losses

    def num_parameters(self, encoder_only: bool = False) -> int:
        return sum(p.numel() for n, p in self.named_parameters()
                   if not (encoder_only and n.startswith(HEADS)))

    def __repr__(self) -> str:
        c = self.config
        return summary(self, variant=c.variant, hidden_size=c.hidden_size, num_heads=c.num_heads,
                       num_layers=c.num_layers, visual_feat_dim=c.visual_feat_dim,
                       region_input=c.region_input, vocab_size=c.vocab_size)
