"""A knowledge-grounded dual encoder: a caption's vector also reads the KG entity its caption is linked to.

This is this project's construction for retrieval, not a published model. Its fusion step is ERNIE's
(Zhang et al. 2019, "ERNIE: Enhanced Language Representation with Informative Entities", ACL; the
K-Encoder's information fusion, eq. 4), applied once, to the pooled caption vector instead of to every
aligned token: a caption names (at most) one entity here (a flag emoji's country), so the entity
belongs to the caption as a whole. Everything else is the ``dual`` recipe's encoder
(:class:`fusion.models.lxmert.Lxmert` with no cross layers, trained with InfoNCE only), so the two
differ by the entity input alone::

    caption -> text stream (backbone layers) -> p = mean over real tokens            (B, D)
    entity  -> e = E[idx] / rms(E)  if the caption is linked and entities are on     (B, De)
               e = e_none           otherwise (a learned "no entity" vector)
    h  = GELU(W_t p + W_e e + b)                                                     (B, D)
    p' = LayerNorm(W'_t h + b' + p)                                                  (B, D)
    t  = normalize(W_proj p')            text vector                                 (B, P)
    m  = normalize(W_media pool(media stream))   media vector, as in ``dual``        (B, P)
    loss = InfoNCE(t, m) with CLIP's learnable temperature (symmetric, in-batch)

``E`` is the ``knowledge.embed`` artifact's entity table (TransE vectors in the demo): frozen, a
non-persistent buffer (never written into ``model.safetensors``; the recipe loads it by reference in
each worker and at evaluation), divided by its root mean square once so that ``W_e``'s BERT
initialisation sees unit-scale inputs whatever the KG model's norm. ERNIE skips the entity terms where
a token has no entity; here a caption without one reads ``e_none`` instead, so linked and unlinked
captions go through the same function and the switch :attr:`KgDual.entity_input` = False (every
caption reads ``e_none``) gives the same trained model without its entity input. With
``entity_dropout`` > 0 a linked caption reads ``e_none`` with that probability in training, so the
model also learns to do without.

Inputs: ``input_ids`` / ``attention_mask`` (B, L) and ``entity_idx`` (B,) long (a row of ``E``, or
:data:`NO_ENTITY`); a text batch without ``entity_idx`` (what ``fusion.retrieval`` passes) gets its
entities from the ``linker`` the recipe attaches (caption token ids -> entity rows); media as for
:class:`~fusion.models.lxmert.Lxmert` (``features`` (B, R, F), ``boxes`` (B, R, 4), ``region_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.layers import init_bert_weights, summary
from fusion.models.lxmert import Lxmert
from fusion.models.objectives import info_nce, pool

NO_ENTITY = -1

# token ids (B, L) -> entity rows (B,) long, NO_ENTITY where the caption links to none
Linker = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class KgDualConfig:
    """The entity side's sizes and its training switch; the text and media sides are the dual's."""

    entity_dim: int                  # De, the knowledge.embed vectors' width
    entity_dropout: float = 0.0      # P(a linked caption reads e_none) in training
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.entity_dim < 1:
            raise ValueError(f"entity_dim must be >= 1, got {self.entity_dim}")
        if not 0.0 <= self.entity_dropout < 1.0:
            raise ValueError(f"entity_dropout must be in [0, 1), got {self.entity_dropout}")


class EntityFusion(nn.Module):
    """ERNIE's fusion of one token with its entity (Zhang et al. 2019, eq. 4), on a pooled vector:
    ``h = GELU(W_t p + W_e e + b)``, ``p' = LN(W'_t h + b' + p)``."""

    def __init__(self, hidden_size: int, entity_dim: int, eps: float) -> None:
        super().__init__()
        self.w_t = nn.Linear(hidden_size, hidden_size)               # W_t, b
        self.w_e = nn.Linear(entity_dim, hidden_size, bias=False)    # W_e (b is W_t's)
        self.out = nn.Linear(hidden_size, hidden_size)               # W'_t, b'
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.w_t(p) + self.w_e(e.to(p.dtype)))                            # (B, D)
        return self.norm(self.out(h) + p)                                            # (B, D)


class KgDual(nn.Module):
    """The ``dual`` encoder whose caption vector fuses the caption's linked KG entity (module
    docstring). ``dual``: a contrastive :class:`~fusion.models.lxmert.Lxmert` with no cross layers;
    ``entities``: (N, De) the entity table; ``linker``: token ids -> entity rows, for text batches
    that do not carry ``entity_idx``."""

    # attributes an evaluation may switch after loading the trained model (the ablation)
    eval_switches: ClassVar[tuple[str, ...]] = ("entity_input",)

    def __init__(self, dual: Lxmert, entities: torch.Tensor, config: KgDualConfig,
                 linker: Linker | None = None) -> None:
        super().__init__()
        if dual.config.x_layers:
            raise ValueError(f"KgDual wraps a dual encoder (x_layers 0), got x_layers {dual.config.x_layers}")
        if entities.dim() != 2 or entities.shape[1] != config.entity_dim:
            raise ValueError(f"entity table of shape {tuple(entities.shape)}; "
                             f"expected (N, {config.entity_dim})")
        self.config = config
        self.dual = dual
        rms = entities.float().pow(2).mean().sqrt().clamp(min=1e-12)
        self.register_buffer("entity_table", entities.float() / rms, persistent=False)  # (N, De)
        self.no_entity = nn.Parameter(torch.zeros(config.entity_dim))               # e_none (De,)
        self.fusion = EntityFusion(dual.config.hidden_size, config.entity_dim, dual.config.layer_norm_eps)
        self.linker = linker
        self.entity_input = True     # False: every caption reads e_none (the ablation switch)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The fusion layers at BERT's initialisation; e_none at zero (no information)."""
        init_bert_weights(self.fusion, self.config.initializer_range)
        nn.init.zeros_(self.no_entity)

    @property
    def num_entities(self) -> int:
        return int(self.entity_table.shape[0])

    @property
    def hidden_size(self) -> int:
        return self.dual.config.hidden_size

    # -- entities --

    def entity_index(self, text_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The entity row of each caption (B,) long: all :data:`NO_ENTITY` with the switch off,
        else the batch's ``entity_idx``, else the linker's. A batch with neither is an error, not a
        silent evaluation without entities."""
        ids = text_batch["input_ids"]
        if not self.entity_input:
            return torch.full(ids.shape[:1], NO_ENTITY, dtype=torch.long, device=ids.device)
        idx = text_batch.get("entity_idx")
        if idx is None:
            if self.linker is None:
                raise ValueError("KgDual: the text batch has no entity_idx and the model no linker")
            idx = self.linker(ids)
        idx = idx.to(device=ids.device, dtype=torch.long)
        if idx.shape != ids.shape[:1]:
            raise ValueError(f"entity_idx of shape {tuple(idx.shape)} for {ids.shape[0]} captions")
        if bool(((idx < NO_ENTITY) | (idx >= self.num_entities)).any()):
            raise ValueError(f"entity_idx outside [-1, {self.num_entities}): {idx.tolist()}")
        return idx

    def entity_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """``E[idx]`` where ``idx`` >= 0, ``e_none`` where it is :data:`NO_ENTITY` (B, De)."""
        linked = idx >= 0                                                            # (B,)
        rows = self.entity_table[idx.clamp(min=0)]                                   # (B, De)
        return torch.where(linked[:, None], rows, self.no_entity.to(rows.dtype).expand_as(rows))

    # -- the dual encoder --

    def text_vector(self, text: torch.Tensor, attention_mask: torch.Tensor | None,
                    idx: torch.Tensor) -> torch.Tensor:
        """Unit text vectors (B, P) from the text stream's states (B, L, D) and entity rows (B,)."""
        p = pool(text, attention_mask, first=self.dual.config.text_pool == "cls")    # (B, D)
        fused = self.fusion(p, self.entity_vectors(idx))                             # (B, D)
        return F.normalize(self.dual.text_proj(fused), dim=-1)                      # (B, P)

    def encode_text(self, text_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit caption vectors (B, P): ``input_ids``, ``attention_mask`` and ``entity_idx`` (or the
        linker's); ``encode_text(t) @ encode_media(m).T`` scores all pairs."""
        idx = self.entity_index(text_batch)
        attn = text_batch.get("attention_mask")
        text = self.dual.text_stream(text_batch["input_ids"], attn, text_batch.get("token_type_ids"))
        return self.text_vector(text, attn, idx)

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit media vectors (B, P), the dual encoder's."""
        return self.dual.encode_media(media_batch)

    @property
    def has_match_head(self) -> bool:
        return False   # a dual encoder: fusion.retrieval scores it in mode ``dual`` only

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"contrastive", "total"}``: symmetric in-batch InfoNCE of the fused caption vectors
        against the media vectors, the dual's objective. ``batch``: the text and media inputs and
        ``entity_idx`` (B,). ``generator`` (on the batch's device) draws the entity dropout."""
        idx = self.entity_index(batch)
        if self.training and self.config.entity_dropout:
            drop = torch.rand(idx.shape, generator=generator, device=idx.device) < self.config.entity_dropout
            idx = torch.where(drop, torch.full_like(idx, NO_ENTITY), idx)
        attn = batch["attention_mask"]
        text = self.dual.text_stream(batch["input_ids"], attn, batch.get("token_type_ids"))
        t = self.text_vector(text, attn, idx)                                        # (B, P)
        m = self.dual.encode_media(batch)                                            # (B, P)
        scale = self.dual.logit_scale.clamp(max=math.log(100.0)).exp()   # CLIP's cap on 1/temperature
        c = info_nce(t, m, scale)
        return {"contrastive": c, "total": c}

    def __repr__(self) -> str:
        c = self.dual.config
        return summary(self, hidden_size=c.hidden_size, l_layers=c.l_layers, r_layers=c.r_layers,
                       visual_feat_dim=c.visual_feat_dim, num_entities=self.num_entities,
                       entity_dim=self.config.entity_dim, entity_dropout=self.config.entity_dropout)
