"""Pretraining objectives shared by the fusion encoders.

Masked language modelling (Devlin et al. 2019, BERT): 15% of the maskable tokens are chosen; of
those, 80% become ``[MASK]``, 10% a random token, 10% stay as they are; the loss is the cross-entropy
of predicting the original token at the chosen positions only (label -100 elsewhere, PyTorch's
ignore index).

Masked region modelling (LXMERT, Tan & Bansal 2019; ViLBERT, Lu et al. 2019): chosen regions'
features are zeroed and the model regresses the originals (:func:`mask_regions`).

Image-text matching: a share of the pairs get another item's text, a binary head tells matched
from mismatched (:func:`itm_pairs`; :func:`hard_negative_pairs` draws the other text by
similarity, ALBEF's hard negatives, Li et al. 2021).

In-batch contrastive InfoNCE (CLIP, Radford et al. 2021), over L2-normalised vectors ``t_i``,
``m_j`` with a scale ``s`` (1 / temperature)::

    L = ( CE_i(s <t_i, m_j>)_j + CE_j(s <t_i, m_j>)_i ) / 2      positives on the diagonal
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion.models.backbone import mean_pool

IGNORE = -100


def mlm_mask(input_ids: torch.Tensor, maskable: torch.Tensor, mask_token_id: int, vocab_size: int,
             generator: torch.Generator | None = None, prob: float = 0.15,
             mask_share: float = 0.8, random_share: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(corrupted ids, labels)`` for MLM. ``maskable`` (bool, same shape) excludes special tokens
    and padding; labels are the original ids at chosen positions and ``IGNORE`` elsewhere."""
    def rand(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=input_ids.device)

    chosen = (rand(input_ids.shape) < prob) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    u = rand(input_ids.shape)
    to_mask = chosen & (u < mask_share)
    to_random = chosen & (u >= mask_share) & (u < mask_share + random_share)
    ids = input_ids.clone()
    ids[to_mask] = mask_token_id
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator,
                               device=input_ids.device)
    ids[to_random] = random_ids[to_random]
    return ids, labels


def mask_regions(features: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator | None = None,
                 prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features with the chosen regions zeroed, chosen (B, R) bool)``: each maskable region is
    chosen independently with probability ``prob`` (LXMERT zeroes every chosen one)."""
    u = torch.rand(maskable.shape, generator=generator, device=features.device)    # (B, R)
    chosen = (u < prob) & maskable.bool()
    return features.masked_fill(chosen[..., None], 0), chosen                       # (B, R, F), (B, R)


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
    """Symmetric in-batch InfoNCE (see the module docstring): ``s_ij = scale * <t_i, m_j>`` for
    rows ``text`` (B, P) and ``media`` (B, P), mean of the text->media and media->text losses."""
    logits = scale * text @ media.T                                                  # (B, B)
    target = torch.arange(text.shape[0], device=text.device)
    return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.T.float(), target)) / 2


def multi_positive_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-log sum_{j in pos} softmax(logits)_j``; ``logits``, ``pos`` (N, C): the
    cross-entropy when several candidates of a row are the right answer."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    pos_lse = torch.logsumexp(logits.float().masked_fill(~pos, float("-inf")), dim=-1)
    return (lse - pos_lse).mean()


def pool(x: torch.Tensor, mask: torch.Tensor | None, first: bool) -> torch.Tensor:
    """One vector per sequence for a dual encoder: position 0 (``first``: [CLS] or a global token),
    else the mean over the real positions of ``mask`` (B, S) (all of them when None)."""
    if first:
        return x[:, 0]                                                               # (B, D)
    return x.mean(1) if mask is None else mean_pool(x, mask)                        # (B, D)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Feature regression at the masked regions, ``pred`` and ``target`` (n, F): smooth L1 or MSE
    in float32, averaged; with no masked region a zero that keeps the graph whole (DDP)."""
    pred = pred.float()
    if not len(pred):
        return pred.sum() * 0.0
    loss = F.smooth_l1_loss if kind == "smooth_l1" else F.mse_loss
    return loss(pred, target.float())


def region_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The detector-class objective at the masked regions, ``logits`` (n, C): cross-entropy to class
    ids (n,) (``IGNORE`` skipped), or ``KL(p || q)`` to class distributions ``p`` (n, C), e.g. the
    detector's softmax (ViLBERT's objective, UNITER's MRC-kl), averaged over the regions."""
    logits = logits.float()
    if labels.dim() == 2:
        if not len(logits):
            return logits.sum() * 0.0
        return F.kl_div(F.log_softmax(logits, -1), labels.float(), reduction="batchmean")
    keep = labels != IGNORE
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], labels[keep])


def image_feature(features: torch.Tensor, region_mask: torch.Tensor | None, masked: torch.Tensor | None,
                  global_token: bool) -> torch.Tensor:
    """The whole image's feature (B, F) from region ``features`` (B, R, F): the mean over the real
    regions of ``region_mask`` (B, R), leaving out ``masked`` ones (B, R) and a global token (region
    0 with ``global_token``, which saw the masked regions' pixels); zero when none is left. VL-BERT's
    and B2T2's word terms (:mod:`fusion.models.single_stream`)."""
    keep = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    keep = keep if region_mask is None else keep & region_mask.bool()              # (B, R)
    keep = keep if masked is None else keep & ~masked.bool()
    if global_token and keep.shape[1]:
        keep[:, 0] = False
    w = keep.to(features.dtype)[..., None]                                          # (B, R, 1)
    return (features * w).sum(1) / w.sum(1).clamp_min(1)                            # (B, F)
