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

Both directions read the layer's inputs, attention runs at the co-attention width (the reference's
``bi_hidden_size``) and ``W_o`` maps back to each stream's width; all of it is newly initialised, as
in the reference. The attention and feed-forward blocks are :mod:`fusion.models.layers`'.

Placement, in the reference's own terms (``t_biattention_id``, ``v_biattention_id``): co-attention
layer k runs once the text stream has been through its first ``t_biattention_id[k]`` layers and the
visual stream through its first ``v_biattention_id[k]``; the layers left after the last connection
run last. The paper's base model (12 text layers, 6 visual layers, t = 6..11, v = 0..5) is::

    text:    T0 T1 T2 T3 T4 T5  C0 T6  C1 T7  C2 T8  C3 T9  C4 T10  C5 T11
    visual:  (embeddings)       C0 V0  C1 V1  C2 V2  C3 V3  C4 V4   C5 V5

:meth:`ViLBertConfig.schedule` spells the order out; ``None`` placements give the same pattern
at any depth (MiniLM's 6 layers: t = 3..5, v = 0..2).

Visual input (paper section 3.2): :class:`~fusion.models.regions.VilbertRegionEmbedding`,
``LN(W_f f + W_l loc)`` with an IMG token first (or region 0 as given with ``add_img_token=False``:
``vision.features``' ``global_token``); the visual pooler reads position 0.

Pretraining (paper section 3.2; :mod:`fusion.models.objectives`):

- masked language modelling: 15% of the words, 80/10/10, head tied to the word embeddings;
- masked region modelling: 15% of the real regions are chosen (never the IMG token nor padding), 90%
  of those zeroed and 10% left unchanged (the paper's split); the output at a chosen region
  regresses the original feature (MSE, the reference's ``visual_target=1``) and, given class
  distributions (``batch["region_classes"]``, e.g. a detector's softmax), predicts them with
  ``KL(target || predicted)`` (the paper's objective);
- multimodal alignment: half the captions are swapped for another item's, and a binary head on
  ``pooled_text * pooled_image`` (element-wise) tells matched from mismatched pairs; its logit is
  the cross-encoder retrieval score, :meth:`ViLBert.match_score`.

Deliberate differences from the reference, each small:

- The IMG token's mean is computed from the *corrupted* features (the reference uses the originals,
  so a zeroed region could be read off the mean).
- Masked-modelling losses count matched pairs only, as UNITER does: a word or region predicted from
  an unrelated caption or image is the unimodal task plus noise.
- The alignment head has one logit and a binary cross-entropy (the reference: a 2-way softmax).
- Single-stream vectors for a dual-encoder first stage (:meth:`ViLBert.encode_text`,
  :meth:`ViLBert.encode_media`), whose dot product is the alignment head without co-attention, and
  an optional in-batch contrastive loss on them (``contrastive_weight``, 0 by default).

Batches are dicts: ``input_ids``, ``attention_mask`` (B, L), optionally ``special_tokens_mask`` and
``token_type_ids``; ``features`` (B, R, F), ``boxes`` (B, R, 4), ``region_mask`` (B, R), optionally
``region_classes`` (B, R, C) (:func:`fusion.models.regions.collate`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone, backbone_mask, resolve_text_sizes
from fusion.models.heads import MLMHead
from fusion.models.layers import (Attention, FeedForward, TransformerLayer, init_bert_weights, key_mask,
                                  summary)
from fusion.models.objectives import IGNORE, info_nce, mlm_mask, region_label_loss, regression_loss
from fusion.models.regions import VilbertRegionEmbedding

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
        cfg = resolve_text_sizes(
            self, backbone, t_biattention_id=t_ids, v_biattention_id=v_ids,
            visual_layers=len(t_ids) if self.visual_layers is None else self.visual_layers,
            pooled_size=self.coattention_hidden_size if self.pooled_size is None else self.pooled_size)
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
# blocks


class CoAttentionLayer(nn.Module):
    """Co-TRM (paper Fig. 2b; the reference's ``BertConnectionLayer``): each stream's queries attend
    to the other stream's keys and values at the co-attention width, then each stream's own FFN.
    Both directions read the inputs (the equations in the module docstring)."""

    def __init__(self, cfg: ViLBertConfig, text_act: str, text_dropout: float,
                 text_attention_dropout: float, eps: float) -> None:
        super().__init__()
        D, V = cfg.hidden_size, cfg.visual_hidden_size
        C, H = cfg.coattention_hidden_size, cfg.coattention_heads
        self.text_from_visual = Attention(D, H, context_dim=V, inner=C, fused=False, eps=eps,
                                          dropout=text_dropout, attention_dropout=cfg.visual_attention_dropout)
        self.visual_from_text = Attention(V, H, context_dim=D, inner=C, fused=False, eps=eps,
                                          dropout=cfg.visual_dropout, attention_dropout=text_attention_dropout)
        self.text_ffn = FeedForward(D, cfg.intermediate_size, text_act, text_dropout, eps)
        self.visual_ffn = FeedForward(V, cfg.visual_intermediate_size, "gelu", cfg.visual_dropout, eps)

    def forward(self, t: torch.Tensor, v: torch.Tensor, t_keys: torch.Tensor | None,
                v_keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` (B, L, D), ``v`` (B, R', V) and their key masks (:func:`~fusion.models.layers.key_mask`)."""
        t_att = self.text_from_visual(t, v_keys, context=v)                 # (B, L, D)
        v_att = self.visual_from_text(v, t_keys, context=t)                 # (B, R', V)
        return self.text_ffn(t_att), self.visual_ffn(v_att)                 # (B, L, D), (B, R', V)


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
        super().__init__()
        self.config = cfg = (config or ViLBertConfig()).resolve(backbone)
        bert = copy.deepcopy(backbone.model)
        bc = self.bert_config = bert.config   # the attention-mask helper needs it (sdpa vs eager)
        eps = bc.layer_norm_eps
        D, V, P = cfg.hidden_size, cfg.visual_hidden_size, cfg.pooled_size
        self.embeddings = bert.embeddings                                          # text stream input
        self.text_layers = nn.ModuleList(bert.encoder.layer)                       # BERT's, all N
        self.visual_embeddings = VilbertRegionEmbedding(cfg.feature_dim, V, cfg.add_img_token,
                                                        cfg.visual_dropout, eps)
        self.visual_layers = nn.ModuleList(   # self-attention over the regions, then the FFN
            TransformerLayer(V, cfg.visual_heads, cfg.visual_intermediate_size, "gelu", fused=False,
                             dropout=cfg.visual_dropout, attention_dropout=cfg.visual_attention_dropout,
                             eps=eps) for _ in range(cfg.visual_layers))
        self.coattention_layers = nn.ModuleList(
            CoAttentionLayer(cfg, bc.hidden_act, bc.hidden_dropout_prob, bc.attention_probs_dropout_prob, eps)
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
                init_bert_weights(m, std)
        nn.init.zeros_(self.mlm.bias)

    # -- streams --

    def _text_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    token_type_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings (B, L, D), attention_mask (B, L))``, the mask all ones when None."""
        attn = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids), attn

    def _visual_input(self, features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings (B, R', V), mask (B, R'))`` with the IMG token first."""
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features are {features.shape[-1]}-d but the model was built for "
                             f"feature_dim={self.config.feature_dim}")
        if region_mask is None:
            region_mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        return self.visual_embeddings(features, boxes, region_mask)

    def _run(self, steps: list[tuple[str, int]], t: torch.Tensor | None, attn: torch.Tensor | None,
             v: torch.Tensor | None, v_mask: torch.Tensor | None,
             states: dict[str, list[torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers of ``steps`` (the schedule or a part of it) over the text stream ``t``
        (B, L, D) and the visual stream ``v`` (B, R', V); ``states`` collects each layer's output."""
        t_attn = None if t is None else backbone_mask(self.bert_config, t, attn)  # backbone's format
        t_keys, v_keys = key_mask(attn), key_mask(v_mask) # (B, 1, 1, L), (B, 1, 1, R')
        for kind, i in steps:
            if kind == "text":
                t = self.text_layers[i](t, t_attn)                                 # (B, L, D)
            elif kind == "visual":
                v = self.visual_layers[i](v, v_keys)                               # (B, R', V)
            else:
                t, v = self.coattention_layers[i](t, v, t_keys, v_keys)            # (B, L, D), (B, R', V)
            if states is not None and kind in states:
                states[kind].append(t if kind == "text" else v)
        return t, v

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> ViLBertOutput:
        """Both streams with co-attention, in the order of :meth:`ViLBertConfig.schedule`.

        ``input_ids`` (B, L), ``attention_mask`` (B, L) 1 on real tokens; ``features`` (B, R, F),
        ``boxes`` (B, R, 4) normalised ``(x1, y1, x2, y2)``, ``region_mask`` (B, R) 1 on real regions.
        """
        t, attn = self._text_input(input_ids, attention_mask, token_type_ids)      # (B, L, D)
        v, v_mask = self._visual_input(features, boxes, region_mask)               # (B, R', V), (B, R')
        states = {"text": [t], "visual": [v]}
        t, v = self._run(self.schedule, t, attn, v, v_mask, states)
        return ViLBertOutput(t, v, F.relu(self.text_pooler(t[:, 0])), F.relu(self.visual_pooler(v[:, 0])),
                             v_mask, tuple(states["text"]), tuple(states["visual"]))

    def text_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The text stream alone, co-attention left out: embeddings, then each text layer's output
        (N + 1 states). With a backbone's weights this is the backbone itself."""
        t, attn = self._text_input(input_ids, attention_mask, token_type_ids)      # (B, L, D)
        states = {"text": [t]}
        self._run([("text", i) for i in range(len(self.text_layers))], t, attn, None, None, states)
        return tuple(states["text"])

    def visual_stream(self, features: torch.Tensor, boxes: torch.Tensor,
                      region_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual stream alone, co-attention left out: ``(output (B, R', V), mask (B, R'))``."""
        v, v_mask = self._visual_input(features, boxes, region_mask)               # (B, R', V)
        _, v = self._run([("visual", j) for j in range(len(self.visual_layers))], None, None, v, v_mask)
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

    def _split_schedule(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """The schedule before the first co-attention (one modality each) and from it on."""
        n = next((n for n, (kind, _) in enumerate(self.schedule) if kind == "coattention"),
                 len(self.schedule))
        return self.schedule[:n], self.schedule[n:]

    def text_states(self, text_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, L, D) text stream before the first co-attention, "mask": (B, L)}``."""
        t, attn = self._text_input(text_batch["input_ids"], text_batch.get("attention_mask"),
                                   text_batch.get("token_type_ids"))               # (B, L, D)
        before, _ = self._split_schedule()
        t, _ = self._run([step for step in before if step[0] == "text"], t, attn, None, None)
        return {"states": t, "mask": attn}

    def media_states(self, media_batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, R', V) visual stream before the first co-attention, "mask": (B, R')}``."""
        v, v_mask = self._visual_input(media_batch["features"], media_batch["boxes"],
                                       media_batch.get("region_mask"))             # (B, R', V)
        before, _ = self._split_schedule()
        _, v = self._run([step for step in before if step[0] == "visual"], None, None, v, v_mask)
        return {"states": v, "mask": v_mask}

    def score_states(self, text: dict[str, torch.Tensor], media: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`match_score` from :meth:`text_states` and :meth:`media_states` of the pairs (B,)."""
        t, v = self._run(self._split_schedule()[1], text["states"], text["mask"], media["states"],
                         media["mask"])
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
        # MSE to the original (uncorrupted) features (n, F); KL to the class distributions (n, C)
        losses["region_feature"] = regression_loss(self.region_feature(z), batch["features"][at], "mse")
        if has_classes:
            losses["region_class"] = region_label_loss(self.region_class(z), batch["region_classes"][at])

        logit = self._align_logit(out.pooled_text, out.pooled_visual)              # (B,)
        losses["align"] = F.binary_cross_entropy_with_logits(logit.float(), c["matched"].float())
        total = sum(losses.values())
        if cfg.contrastive_weight > 0:
            losses["contrastive"] = info_nce(self.encode_text(batch), self.encode_media(batch), 1.0)
            total = total + cfg.contrastive_weight * losses["contrastive"]
        losses["total"] = total
        return losses

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=c.hidden_size, text_layers=c.num_layers,
                       visual_hidden_size=c.visual_hidden_size, visual_layers=c.visual_layers,
                       coattention_hidden_size=c.coattention_hidden_size,
                       t_biattention_id=list(c.t_biattention_id), v_biattention_id=list(c.v_biattention_id),
                       feature_dim=c.feature_dim, add_img_token=c.add_img_token,
                       num_region_classes=c.num_region_classes, vocab_size=c.vocab_size)


# ----------------------------------------------------------------------------------------------
# the fusion.pretrain recipe's placement

# MiniLM (6 layers, 384): the paper's pattern at half depth -- connections before the last 3 text
# layers (3, 4, 5), each followed by one visual layer, so the lower half stays MiniLM's pretrained
# text encoder as the lower half of BERT does in the paper; the visual width keeps the paper's
# ratio to the text width (1024 / 768 = 512 / 384).
MINILM_CONFIG = ViLBertConfig(
    visual_hidden_size=512, visual_heads=8, visual_intermediate_size=512,
    coattention_hidden_size=512, coattention_heads=8, visual_layers=3,
    t_biattention_id=(3, 4, 5), v_biattention_id=(0, 1, 2))
