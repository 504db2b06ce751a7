"""The pretraining objectives of :class:`fusion.models.single_stream.SingleStream`: masking, the
masked losses, the matching losses, word-region alignment by optimal transport, and the passes of
one pretraining step that combine them (:func:`pretraining_loss`).

The model, its inputs and its variants live in :mod:`fusion.models.single_stream`; here are the parts
that only read its config and call its heads (duck-typed: this module imports no model, so the two
files never import each other).

Masking (:func:`masked_inputs`): MLM 80/10/10 at 15% of the maskable words (BERT), regions zeroed at
15% of the real regions; special tokens, padding, padded regions and a global token (region 0 with
``global_token``) are never chosen. With ``conditional_masking`` (UNITER) each item masks its words or
its regions (probability 1/2 each when both objectives are on), never both.

Masked losses (:func:`masked_losses`), at the masked positions of the kept items:

* MLM: mean cross-entropy of the tied word decoder at the chosen words;
* masked region feature regression (MRFR, UNITER; VL-BERT's stand-in for masked RoI
  classification, see the model's docstring): ``f_hat = W_f^T g(h) + c``, ``g`` a transform
  (Linear, activation, LN), ``W_f`` the input projection of the region features (tied); MSE (or
  smooth L1) against the original feature ``f``;
* masked region classification (MRC): cross-entropy to class ids, or KL(p || softmax(head(h))) to
  class distributions ``p`` (UNITER's MRC-kl), when the batch carries ``region_labels``.

Matching losses (:func:`match_losses`): ITM, binary cross-entropy of ``w^T pooled + b`` against
matched / mismatched; and WRA (UNITER section 3.2): the transport plan ``T`` between the text outputs
``t_i`` ([CLS] and [SEP] included) and the region outputs ``v_j``, uniform masses over the real
positions, cost ``C_ij = 1 - cos(t_i, v_j)``, by IPOT (Xie et al. 2018, "A Fast Proximal Point Method
for Computing Exact Wasserstein Distance") without gradient; ``D = sum_ij C_ij T_ij`` is
differentiated through C::

    G = exp(-C / beta),  T = 1 1^T,  sigma = 1_N / N
    repeat n:  Q = G * T;  repeat k: delta = a / (Q sigma),  sigma = b / (Q^T delta)
               T = diag(delta) Q diag(sigma)
    L_WRA = (sum_{matched} D - sum_{mismatched} D) / B
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from fusion.models.objectives import (IGNORE, info_nce, itm_pairs, mask_regions, mlm_mask, region_label_loss,
                                      regression_loss)


class Masking(NamedTuple):
    input_ids: torch.Tensor         # (B, L) after MLM masking
    mlm_labels: torch.Tensor        # (B, L) original ids at chosen words, IGNORE elsewhere
    features: torch.Tensor          # (B, R, F) chosen regions zeroed
    masked_regions: torch.Tensor    # (B, R) bool


# ----------------------------------------------------------------------------------------------
# masking


def corrupt(cfg: Any, batch: Mapping[str, torch.Tensor], text_index: torch.Tensor, words_on: torch.Tensor,
            regions_on: torch.Tensor, generator: torch.Generator | None = None) -> Masking:
    """MLM (80/10/10) on the words of items ``words_on`` (B,) bool, of the texts ``text_index``
    (B,); regions zeroed in items ``regions_on`` (B,). ``cfg``: a ``SingleStreamConfig``;
    ``generator`` lives on the batch's device."""
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


def masked_inputs(cfg: Any, batch: Mapping[str, torch.Tensor], text_index: torch.Tensor, regions: bool,
                  generator: torch.Generator | None = None) -> Masking:
    """The masking of one pretraining pass over the texts ``text_index`` (module docstring): words
    (when MLM is on) and, when ``regions``, regions; conditional masking picks one side per item."""
    B, dev, words = len(text_index), text_index.device, bool(cfg.mlm_weight)
    on_words = torch.full((B,), words, dtype=torch.bool, device=dev)
    on_regions = torch.full((B,), regions, dtype=torch.bool, device=dev)
    if cfg.conditional_masking:
        if words and regions:
            on_words = torch.rand(B, generator=generator, device=dev) < 0.5
        on_regions = ~on_words & regions
    return corrupt(cfg, batch, text_index, on_words, on_regions, generator)


# ----------------------------------------------------------------------------------------------
# losses


def masked_losses(model: Any, out: Any, m: Masking, batch: Mapping[str, torch.Tensor], keep: torch.Tensor,
                  labels_on: bool, losses: dict, weights: dict) -> None:
    """MLM, MRFR and MRC of ``model`` (a ``SingleStream``) at the masked positions of the items
    ``keep`` (B,) bool, from its output ``out`` (text (B, L, D), media (B, R, D)); written into
    ``losses`` and ``weights``."""
    cfg = model.config
    if cfg.mlm_weight:
        losses["mlm"] = model.mlm_head.loss(out.text, m.mlm_labels.masked_fill(~keep[:, None], IGNORE))
        weights["mlm"] = cfg.mlm_weight
    at = m.masked_regions & keep[:, None]                                            # (B, R)
    if cfg.region_feat_weight:   # the decoder is W_f^T, tied to the input projection
        h = model.region_transform(out.media[at])                                    # (n, D)
        pred = F.linear(h, model.regions.feat.weight.t(), model.region_feat_bias)    # (n, F)
        losses["region_feat"] = regression_loss(pred, batch["features"][at], cfg.region_loss)
        weights["region_feat"] = cfg.region_feat_weight
    if labels_on:
        if model.region_label is None:
            raise ValueError("the batch has region_labels but the config has no num_region_labels")
        logits = model.region_label(out.media[at])                                   # (n, C)
        losses["region_label"] = region_label_loss(logits, batch["region_labels"][at])
        weights["region_label"] = cfg.region_label_weight


def match_losses(model: Any, out: Any, attn: torch.Tensor, region_mask: torch.Tensor, matched: torch.Tensor,
                 losses: dict, weights: dict) -> None:
    """ITM (binary cross-entropy on the match logit) and, when its weight is on, WRA (module
    docstring), for the pairs of ``out`` with ``matched`` (B,) bool."""
    cfg = model.config
    logit = model.itm(out.pooled).squeeze(-1)                                        # (B,)
    losses["itm"] = F.binary_cross_entropy_with_logits(logit.float(), matched.float())
    weights["itm"] = cfg.itm_weight
    if cfg.wra_weight:
        d = ot_distance(out.text, attn, out.media, region_mask, cfg.ot_beta, cfg.ot_iterations,
                        cfg.ot_inner)                                                # (B,)
        losses["wra"] = (d[matched].sum() - d[~matched].sum()) / len(d)
        weights["wra"] = cfg.wra_weight


def pretraining_loss(model: Any, batch: Mapping[str, torch.Tensor],
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The losses of one pretraining step of ``model`` (a ``SingleStream``; see its ``loss``). ITM
    pairs come first; with ``conditional_masking`` a masked pass on the true pairs (each item's words
    or its regions) and a clean pass on the ITM pairs, else one pass, masked, on the ITM pairs, the
    masked losses counting matched pairs only (unless ``masked_loss_on_mismatched``); the in-batch
    InfoNCE on the single-modality passes last."""
    cfg = model.config
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

    def run(m: Masking, ti: torch.Tensor) -> Any:
        return model(m.input_ids, attn[ti], m.features, boxes, rm, None if tt is None else tt[ti],
                     m.masked_regions)

    if cfg.conditional_masking:
        # masked modelling on the true pairs, each item's words or its regions; ITM on clean pairs
        if words or regions:
            m = masked_inputs(cfg, batch, same, regions, generator)
            masked_losses(model, run(m, same), m, batch, torch.ones_like(matched), labels_on, losses,
                          weights)
        if cfg.itm_weight:
            clean = Masking(ids[text_index], torch.full_like(ids, IGNORE), features,
                            torch.zeros_like(rm, dtype=torch.bool))
            match_losses(model, run(clean, text_index), attn[text_index], rm, matched, losses, weights)
    else:
        # one pass: masked words (and regions) on the ITM pairing
        m = masked_inputs(cfg, batch, text_index, regions, generator)
        out = run(m, text_index)
        keep = matched | cfg.masked_loss_on_mismatched
        masked_losses(model, out, m, batch, keep, labels_on, losses, weights)
        if cfg.itm_weight:
            match_losses(model, out, attn[text_index], rm, matched, losses, weights)
    if cfg.contrastive_weight:
        scale = model.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap on 1/temperature
        losses["contrastive"] = info_nce(model.encode_text(batch), model.encode_media(batch), scale)
        weights["contrastive"] = cfg.contrastive_weight
    losses["total"] = sum(weights[k] * losses[k] for k in weights)
    return losses


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
