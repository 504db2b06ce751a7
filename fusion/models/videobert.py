"""VideoBERT: one BERT over text and *visual words* (quantised frame features).

Sun, Myers, Vondrick, Murphy & Schmid (2019), "VideoBERT: A Joint Model for Video and Language
Representation Learning", ICCV (arXiv:1904.01766).

**Visual words**. Clip features (S3D in the paper; here a feature artifact's frames, regions in
time order) are quantised by *hierarchical k-means*: k-means with ``b`` centroids
over all the features, then again with ``b`` centroids inside each cluster, ``d`` levels deep, so
the vocabulary has ``K = b^d`` words (the paper: ``d = 4``, ``b = 12``; small defaults here). With
``c^(l)`` the centroids of level ``l`` (``b^(l+1)`` rows, a node's ``b`` children consecutive), a
feature ``x`` descends greedily::

    k_0 = argmin_j ||x - c^(0)_j||^2                              j < b
    k_l = argmin_j ||x - c^(l)_{b * n_(l-1) + j}||^2,  n_l = b * n_(l-1) + k_l   (n_0 = k_0)
    word(x) = n_(d-1)                                             in [0, K)

:func:`fit_hierarchical_kmeans` fits the tree once from a bounded, seeded sample of the training
frames (:mod:`fusion.pretrain.video_recipes`); it is stored in the model's buffers (``codebook_<l>``,
so in ``model.safetensors``) and the same tree tokenises at evaluation (:meth:`VideoBert.visual_words`).
Each node runs Lloyd's algorithm from ``b`` of its points drawn by a generator seeded by
``(seed, level, node)`` (all of them, cycled, when it has fewer; a node without points repeats its
parent's centroid), an empty cluster keeps its centroid, and the points are partitioned by the final
centroids, so the fit's partition is exactly what the greedy descent gives.

**Model**. The visual words are appended to the word vocabulary (``V + K`` rows, the text's first)
and one BERT reads::

    [CLS] w_1 ... w_n [SEP] v_1 ... v_T [SEP]
    x_i = LN(E[tok_i] + P[pos_i] + S[seg_i])        seg 0 on the text, 1 on the video     (B, L+T+1, D)
    h = Transformer(x)                                                                   (B, L+T+1, D)

The text is padded on the right, so the video's positions continue each item's own text
(``pos = n_i + t``). The paper separates the two with ``[>]``; ``[SEP]`` plays that role here.
Frames are padded in time (their boxes, the time spans, are not read: order is time), and a global
mean-frame token (``global_token``, region 0) is left out: it is not a frame, and it would carry
the content of masked frames.

**Objectives** (the paper's video-text regime): one MLM head tied to the joint table ``E``
(:class:`fusion.models.heads.MLMHead`, logits over all ``V + K`` rows)::

    L_text  = -mean_{i masked word}  log softmax(MLM(h_i))[w_i]       BERT's 80/10/10, 15%
    L_video = -mean_{t masked frame} log softmax(MLM(h_t))[V + v_t]    80/10/10 among visual words
    L_align = BCE(w^T tanh(W h_[CLS] + b) + c, aligned)                 aligned vs a random caption

Masked losses count aligned pairs only. The paper also trains on text-only and video-only
sequences; those regimes are not implemented. For a dual-encoder first stage
(:mod:`fusion.retrieval`) the same transformer runs over one modality alone, mean-pooled and
projected, trained by an optional in-batch InfoNCE (``contrastive_weight``; not in the paper).
Retrieval: ``text_states`` are the caption's ids, ``media_states`` its visual words (the only
per-item work: quantisation), ``score_states`` the alignment logit of the pair.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone
from fusion.models.heads import MLMHead
from fusion.models.layers import TransformerLayer, block_sizes, init_bert_weights, key_mask, summary
from fusion.models.lxmert import TextEmbeddings
from fusion.models.objectives import IGNORE, info_nce, itm_pairs, mlm_mask, pool


@dataclasses.dataclass
class VideoBertConfig:
    """Sizes, the visual vocabulary, rates and loss weights (a weight of 0 switches it off)."""

    vocab_size: int = 30522              # V: text words (the visual words follow)
    hidden_size: int = 768               # D
    num_heads: int = 12
    intermediate_size: int = 3072
    num_layers: int = 12
    visual_feat_dim: int = 1024          # F
    kmeans_depth: int = 2                # d (the paper: 4)
    kmeans_branching: int = 8            # b (the paper: 12)
    type_vocab_size: int = 2             # segment 0: text, 1: video
    max_position: int = 512              # text and video share the position table
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    mask_token_id: int = 103             # masks words and visual words alike
    sep_token_id: int = 102              # closes the text and the video
    global_token: bool = False           # region 0 is a mean-frame token: left out
    contrastive_dim: int | None = None
    temperature: float = 0.07
    mlm_prob: float = 0.15
    visual_mask_prob: float = 0.15
    align_mismatch_prob: float = 0.5
    mlm_weight: float = 1.0
    visual_weight: float = 1.0
    align_weight: float = 1.0
    contrastive_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{self.num_heads} heads do not divide hidden_size {self.hidden_size}")
        if self.kmeans_depth < 1 or self.kmeans_branching < 2:
            raise ValueError(f"hierarchical k-means needs depth >= 1 and branching >= 2, got "
                             f"{self.kmeans_depth} and {self.kmeans_branching}")
        if self.type_vocab_size < 2:
            raise ValueError("the video takes segment 1: type_vocab_size >= 2")

    @property
    def num_visual_words(self) -> int:
        return self.kmeans_branching ** self.kmeans_depth                           # K = b^d


# ----------------------------------------------------------------------------------------------
# hierarchical k-means


def _node_generator(seed: int, level: int, node: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, level, node]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean; ties: the first) of each row of ``x`` (n, F)
    among ``centroids`` (k, F), or its own (n, k, F). The fit and the descent share this one formula,
    so a point's word at evaluation is its cluster in the fit; in row chunks, bounding memory."""
    out = []
    for s in range(0, len(x), chunk):
        c = centroids if centroids.dim() == 2 else centroids[s:s + chunk]
        out.append(((x[s:s + chunk, None, :] - c) ** 2).sum(-1).argmin(1))           # (n, k) -> (n,)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def _nearest_fast(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """:func:`_nearest` among shared centroids (k, F) by ``||x||^2 - 2 x.c + ||c||^2``: one matmul,
    for Lloyd's iterations; rounding may order near-ties differently from the direct difference."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)   # (n, k)
    return d.argmin(1)


def kmeans(x: torch.Tensor, init: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm from ``init`` (k, F) over ``x`` (n, F): ``(centroids (k, F), assignment
    (n,))``; an empty cluster keeps its centroid; stops early once no assignment changes (the
    centroids are then a fixed point). The assignment returned is to the returned centroids by
    :func:`_nearest`, the formula the descent uses."""
    c = init.clone()
    assign = _nearest_fast(x, c)
    for _ in range(iterations):
        sums = torch.zeros_like(c).index_add_(0, assign, x)                         # (k, F)
        counts = torch.bincount(assign, minlength=len(c)).to(x.dtype)               # (k,)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        new = _nearest_fast(x, c)
        if torch.equal(new, assign):
            break
        assign = new
    return c, _nearest(x, c)


def fit_hierarchical_kmeans(x: torch.Tensor, depth: int, branching: int, iterations: int = 20,
                            seed: int = 0) -> list[torch.Tensor]:
    """The tree of centroids over ``x`` (n, F): level ``l`` is (b^(l+1), F), node ``m``'s children
    at rows ``b*m .. b*m + b - 1`` (module docstring)."""
    if not len(x):
        raise ValueError("hierarchical k-means needs at least one feature")
    b = branching
    levels: list[torch.Tensor] = []
    groups = [torch.arange(len(x))]            # the points of each node of the level above
    parents = [x.mean(0)]
    for level in range(depth):
        cents, next_groups = [], []
        for node, (idx, parent) in enumerate(zip(groups, parents)):
            pts = x[idx]
            if not len(pts):
                cents.append(parent.expand(b, -1))
                next_groups += [idx] * b
                continue
            g = _node_generator(seed, level, node)
            pick = (torch.randperm(len(pts), generator=g)[:b] if len(pts) >= b
                    else torch.arange(b) % len(pts))
            c, assign = kmeans(pts, pts[pick], iterations)
            cents.append(c)
            next_groups += [idx[assign == j] for j in range(b)]
        levels.append(torch.cat(cents))                                             # (b^(l+1), F)
        groups, parents = next_groups, list(levels[-1])
    return levels


def hierarchical_assign(x: torch.Tensor, levels: list[torch.Tensor], branching: int,
                        chunk: int = 4096) -> torch.Tensor:
    """Each row of ``x`` (n, F) -> its visual word (n,) in [0, b^d) by greedy descent (in row
    chunks: a level gathers each row's b candidate centroids)."""
    b, words = branching, []
    for s in range(0, len(x), chunk):
        rows = x[s:s + chunk]
        node = _nearest(rows, levels[0])                                            # (n,)
        for c in levels[1:]:
            node = node * b + _nearest(rows, c.view(-1, b, c.shape[-1])[node])      # among (n, b, F)
        words.append(node)
    return torch.cat(words) if words else torch.zeros(0, dtype=torch.long, device=x.device)


# ----------------------------------------------------------------------------------------------
# the model


def video_frames(features: torch.Tensor, region_mask: torch.Tensor | None, global_token: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Regions as frames ``(B, T, F)``, mask ``(B, T)``: the global (mean-frame) token dropped."""
    mask = (torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
            if region_mask is None else region_mask.bool())
    if global_token:
        features, mask = features[:, 1:], mask[:, 1:]
    return features, mask


class VideoBertOutput(NamedTuple):
    text: torch.Tensor      # (B, L, D) outputs at the text positions
    video: torch.Tensor     # (B, T+1, D) outputs at the visual words and the closing [SEP]
    pooled: torch.Tensor    # (B, D) tanh(W h_[CLS] + b)


class VideoBert(nn.Module):
    """One BERT over ``[CLS] text [SEP] visual words [SEP]`` (module docstring).

    Inputs: ``input_ids`` (B, L) with [CLS]/[SEP], ``attention_mask`` (B, L), ``features`` (B, R, F)
    frames in time order, ``region_mask`` (B, R) (1 on real frames; None: all)."""

    def __init__(self, config: VideoBertConfig) -> None:
        super().__init__()
        self.config = cfg = config
        D, K = cfg.hidden_size, cfg.num_visual_words
        self.embeddings = TextEmbeddings(dataclasses.replace(cfg, vocab_size=cfg.vocab_size + K))
        self.layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg)) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(D, D)
        self.mlm_head = MLMHead(self.embeddings.word, D, cfg.layer_norm_eps)          # tied, V + K
        self.align = nn.Linear(D, 1)
        P = cfg.contrastive_dim or D
        self.text_proj, self.media_proj = nn.Linear(D, P), nn.Linear(D, P)
        self.logit_scale = nn.Parameter(torch.empty(()))
        b = cfg.kmeans_branching
        for level in range(cfg.kmeans_depth):
            self.register_buffer(f"codebook_{level}", torch.zeros(b ** (level + 1), cfg.visual_feat_dim))
        self.register_buffer("codebook_fitted", torch.zeros((), dtype=torch.bool))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation (the codebook is data, set by :meth:`set_codebook`)."""
        init_bert_weights(self, self.config.initializer_range)
        nn.init.zeros_(self.mlm_head.bias)
        nn.init.constant_(self.logit_scale, math.log(1 / self.config.temperature))

    # -- visual words --

    @property
    def codebook(self) -> list[torch.Tensor]:
        return [getattr(self, f"codebook_{level}") for level in range(self.config.kmeans_depth)]

    def set_codebook(self, levels: list[torch.Tensor]) -> None:
        """Install a :func:`fit_hierarchical_kmeans` tree (shapes checked)."""
        if [tuple(c.shape) for c in levels] != [tuple(c.shape) for c in self.codebook]:
            raise ValueError(f"codebook shapes {[tuple(c.shape) for c in levels]} do not fit depth "
                             f"{self.config.kmeans_depth}, branching {self.config.kmeans_branching}, "
                             f"{self.config.visual_feat_dim}-d features")
        with torch.no_grad():
            for mine, c in zip(self.codebook, levels):
                mine.copy_(c)
            self.codebook_fitted.fill_(True)

    def frames(self, features: torch.Tensor, region_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(frames (B, T, F), mask (B, T) bool)``: the regions without a global token."""
        return video_frames(features, region_mask, self.config.global_token)

    @torch.no_grad()
    def visual_words(self, features: torch.Tensor, region_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(words (B, T) in [0, K), mask (B, T))`` of the frames, by the stored tree (float32)."""
        if not bool(self.codebook_fitted):
            raise RuntimeError("VideoBert has no codebook: fit one (fit_hierarchical_kmeans, "
                               "set_codebook) or load a trained model's weights")
        f, mask = self.frames(features, region_mask)
        B, T, Fd = f.shape
        with torch.autocast(f.device.type, enabled=False):
            words = hierarchical_assign(f.reshape(B * T, Fd).float(), [c.float() for c in self.codebook],
                                        self.config.kmeans_branching).view(B, T)
        return words.masked_fill(~mask, 0), mask

    def video_ids(self, words: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint-vocabulary ids ``V + word`` then ``[SEP]`` after each item's last frame, and their
        mask: (B, T+1) each."""
        B, T = words.shape
        cfg = self.config
        ids = torch.full((B, T + 1), cfg.pad_token_id, dtype=torch.long, device=words.device)
        ids[:, :T] = torch.where(mask, words + cfg.vocab_size, ids[:, :T])
        n = mask.sum(1)                                                              # (B,)
        ids[torch.arange(B, device=ids.device), n] = cfg.sep_token_id
        return ids, torch.arange(T + 1, device=ids.device) <= n[:, None]              # (B, T+1)

    # -- encoder --

    def embed(self, ids: torch.Tensor, positions: torch.Tensor, segment: int) -> torch.Tensor:
        e = self.embeddings
        x = e.word(ids) + e.position(positions) + e.token_type.weight[segment]      # (B, S, D)
        return e.dropout(e.norm(x))

    def encode(self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None,
               video_ids: torch.Tensor | None, video_mask: torch.Tensor | None) -> torch.Tensor:
        """The layers over ``[text ; video]`` (either may be None), (B, S, D); the video's positions
        continue each item's text."""
        need = sum(x.shape[1] for x in (text_ids, video_ids) if x is not None)
        if need > self.config.max_position:   # from the shapes: no device sync
            raise ValueError(f"{need} text and frame positions exceed the model's "
                             f"{self.config.max_position}: shorten max_length or set max_regions")
        parts, masks, start = [], [], None
        if text_ids is not None:
            text_mask = torch.ones_like(text_ids) if text_mask is None else text_mask
            L = text_ids.shape[1]
            parts.append(self.embed(text_ids, torch.arange(L, device=text_ids.device).expand_as(text_ids), 0))
            masks.append(text_mask.bool())
            start = text_mask.sum(1, keepdim=True)                                    # (B, 1)
        if video_ids is not None:
            T = torch.arange(video_ids.shape[1], device=video_ids.device)
            pos = T.expand_as(video_ids) if start is None else start + T              # (B, T+1)
            parts.append(self.embed(video_ids, pos, 1))
            masks.append(video_mask.bool())
        x = torch.cat(parts, 1)                                                      # (B, S, D)
        mask = key_mask(torch.cat(masks, 1))
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def cls(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled [CLS], ``tanh(W h_0 + b)`` (B, D), what the alignment head reads."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, features: torch.Tensor,
                region_mask: torch.Tensor | None = None) -> VideoBertOutput:
        vids, vmask = self.video_ids(*self.visual_words(features, region_mask))
        h = self.encode(input_ids, attention_mask, vids, vmask)
        L = input_ids.shape[1]
        return VideoBertOutput(h[:, :L], h[:, L:], self.cls(h))

    # -- retrieval --

    @property
    def has_match_head(self) -> bool:
        return bool(self.config.align_weight)

    def match_score(self, text_batch: Mapping[str, torch.Tensor],
                    media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Alignment logit (B,) of pair ``(text_batch[i], media_batch[i])``."""
        return self.score_states(self.text_states(text_batch), self.media_states(media_batch))

    def text_states(self, text_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"ids": (B, L), "mask": (B, L)}``: nothing of the text runs before it meets the video."""
        ids = text_batch["input_ids"]
        attn = text_batch.get("attention_mask")
        return {"ids": ids, "mask": torch.ones_like(ids) if attn is None else attn}

    def media_states(self, media_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"ids": (B, T+1) joint ids of the visual words and [SEP], "mask": (B, T+1)}``."""
        words = self.visual_words(media_batch["features"], media_batch.get("region_mask"))
        ids, mask = self.video_ids(*words)
        return {"ids": ids, "mask": mask.long()}

    def score_states(self, text: Mapping[str, torch.Tensor],
                     media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The alignment logit (B,) of :meth:`text_states` and :meth:`media_states` of the pairs."""
        h = self.encode(text["ids"], text["mask"], media["ids"], media["mask"])
        return self.align(self.cls(h)).squeeze(-1)                                  # (B,)

    def encode_text(self, text_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit text vectors (B, P): the transformer over the caption alone, mean-pooled, projected."""
        t = self.text_states(text_batch)
        h = self.encode(t["ids"], t["mask"], None, None)
        return F.normalize(self.text_proj(pool(h, t["mask"], first=False)), dim=-1)

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit video vectors (B, P): the transformer over the visual words alone, mean-pooled."""
        m = self.media_states(media_batch)
        h = self.encode(None, None, m["ids"], m["mask"])
        return F.normalize(self.media_proj(pool(h, m["mask"], first=False)), dim=-1)

    # -- pretraining --

    def mask_video(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, labels)`` (B, T+1) with BERT's 80/10/10 at ``visual_mask_prob`` of the real visual
        words (never the closing [SEP]); a random replacement is a random *visual* word."""
        cfg = self.config
        n = mask.sum(1, keepdim=True) - 1                                            # frames per item
        frames = torch.arange(ids.shape[1], device=ids.device) < n                   # (B, T+1)
        words = (ids - cfg.vocab_size).clamp_min(0)
        # the [MASK] sentinel -1 is no visual word; shifted back into the joint vocabulary below
        out, labels = mlm_mask(words, frames, -1, cfg.num_visual_words, generator, cfg.visual_mask_prob)
        out = torch.where(out < 0, cfg.mask_token_id, out + cfg.vocab_size)
        out = torch.where(frames, out, ids)
        return out, torch.where(labels == IGNORE, labels, labels + cfg.vocab_size)

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"mlm", "visual", "align", ["contrastive"], "total"}`` (weight-0 objectives left out),
        one pass over the alignment pairs; ``batch``: :meth:`forward`'s inputs plus optionally
        ``special_tokens_mask``. ``generator`` lives on the batch's device."""
        cfg = self.config
        ids, attn = batch["input_ids"], batch["attention_mask"]
        B, dev = ids.shape[0], ids.device
        text_index, aligned = torch.arange(B, device=dev), torch.ones(B, dtype=torch.bool, device=dev)
        if cfg.align_weight:
            text_index, aligned = itm_pairs(B, generator, cfg.align_mismatch_prob, dev)
        t_ids, t_attn = ids[text_index], attn[text_index]
        t_labels = torch.full_like(t_ids, IGNORE)
        if cfg.mlm_weight:
            maskable = t_attn.bool()
            if "special_tokens_mask" in batch:
                maskable &= ~batch["special_tokens_mask"][text_index].bool()
            t_ids, t_labels = mlm_mask(t_ids, maskable, cfg.mask_token_id, cfg.vocab_size, generator,
                                       cfg.mlm_prob)
        v_ids, v_mask = self.video_ids(*self.visual_words(batch["features"], batch.get("region_mask")))
        v_labels = torch.full_like(v_ids, IGNORE)
        if cfg.visual_weight:
            v_ids, v_labels = self.mask_video(v_ids, v_mask, generator)
        h = self.encode(t_ids, t_attn, v_ids, v_mask)
        L = ids.shape[1]
        keep = aligned[:, None]
        losses: dict[str, torch.Tensor] = {}
        weights = {"mlm": cfg.mlm_weight, "visual": cfg.visual_weight, "align": cfg.align_weight,
                   "contrastive": cfg.contrastive_weight}
        if cfg.mlm_weight:
            losses["mlm"] = self.mlm_head.loss(h[:, :L], t_labels.masked_fill(~keep, IGNORE))
        if cfg.visual_weight:
            losses["visual"] = self.mlm_head.loss(h[:, L:], v_labels.masked_fill(~keep, IGNORE))
        if cfg.align_weight:
            logit = self.align(self.cls(h)).squeeze(-1)                             # (B,)
            losses["align"] = F.binary_cross_entropy_with_logits(logit.float(), aligned.float())
        if cfg.contrastive_weight:
            scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap on 1/temperature
            media = {"features": batch["features"], "region_mask": batch.get("region_mask")}
            losses["contrastive"] = info_nce(self.encode_text(batch), self.encode_media(media), scale)
        losses["total"] = sum(weights[k] * v for k, v in losses.items())
        return losses

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=c.hidden_size, num_heads=c.num_heads, num_layers=c.num_layers,
                       vocab_size=c.vocab_size, visual_words=c.num_visual_words,
                       visual_feat_dim=c.visual_feat_dim)


# the config fields a BERT-family backbone fixes <- its BertConfig's names (CBT reads them too)
BERT_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
               "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
               "max_position": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
               "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps",
               "dropout": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob",
               "initializer_range": "initializer_range"}
SIZES = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_layers")


def backbone_config(backbone: TextBackbone, config: dict[str, Any]) -> dict[str, Any]:
    """Config fields from a backbone (:data:`BERT_FIELDS`, the tokenizer's pad and mask ids), then
    ``config``, which may not change the sizes."""
    fixed = set(SIZES) & set(config)
    if fixed:
        raise ValueError(f"{sorted(fixed)} come from the backbone and cannot be overridden")
    bc, tok = backbone.model.config, backbone.tokenizer
    return ({k: getattr(bc, v) for k, v in BERT_FIELDS.items()}
            | {"pad_token_id": tok.pad_token_id or 0, "mask_token_id": tok.mask_token_id} | config)


def load_bert(model: nn.Module, backbone: TextBackbone, **replace: torch.Tensor) -> nn.Module:
    """``model``'s ``embeddings.*`` and ``layers.*`` from the backbone's weights, with ``replace``
    (name with ``__`` for ``.`` -> tensor) taking the place of a backbone tensor."""
    from fusion.models.hf_weights import bert_state

    state = {k.replace("l_layers.", "layers.", 1): v for k, v in bert_state(backbone.model).items()}
    state |= {k.replace("__", "."): v for k, v in replace.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k.startswith(("embeddings.", "layers."))]:
        raise ValueError(f"backbone weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def videobert_backbone(backbone: TextBackbone, **config: Any) -> VideoBert:
    """A :class:`VideoBert` whose text embeddings (the first ``V`` rows of the joint table) and layers
    start from a BERT-family backbone; the visual words' rows and the heads start random. A
    backbone with one segment row gives the video a copy of it."""
    fields = backbone_config(backbone, {"sep_token_id": backbone.tokenizer.sep_token_id} | config)
    types = backbone.model.embeddings.token_type_embeddings.weight.detach()
    model = VideoBert(VideoBertConfig(**(fields | {"type_vocab_size": max(2, len(types))})))
    word = model.embeddings.word.weight.detach().clone()
    V = model.config.vocab_size
    word[:V] = backbone.model.embeddings.word_embeddings.weight.detach()           # (V + K, D)
    return load_bert(model, backbone, embeddings__word__weight=word,
                     embeddings__token_type__weight=types if len(types) >= 2 else types.expand(2, -1).clone())
