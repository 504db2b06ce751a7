"""KEPLER: one text encoder trained as a language model and as a knowledge-graph embedding at once.

Wang, Gao, Zhu, Zhang, Liu, Li & Tang (2021), "KEPLER: A Unified Model for Knowledge Embedding and
Pre-trained Language Representation", TACL 9; reference code THU-KEG/KEPLER (fairseq).

Entities have no embedding table: an entity's vector is the encoder's output at the first token
(``[CLS]`` / ``<s>``) of its description, the relations are a learned table (paper section 2)::

    e = E(text_e)[0]                        (D,)   the same encoder MLM trains
    r = R[rel]                              (D,)   relation embedding, a parameter
    d_r(h, t) = || h + r - t ||_p                  TransE's distance (Bordes et al. 2013)

Knowledge-embedding loss with negative sampling (paper section 2), ``n`` corruptions ``(h'_i, r, t'_i)``
of each positive (the head or the tail replaced by another entity), margin ``gamma``, ``s`` the
logistic sigmoid::

    L_KE  = -log s(gamma - d_r(h, t)) - 1/n sum_i log s(d_r(h'_i, t'_i) - gamma)
    L     = L_KE + L_MLM                     one shared encoder, both losses on every step

averaged over the positives of the batch. Descriptions are encoded unmasked; the MLM batch is
BERT's (15%, 80/10/10, head tied to the word embeddings).

Batch layout (:meth:`Kepler.loss`): the distinct entities of the batch are encoded once,
``entity_input_ids`` / ``entity_attention_mask`` (U, Ld), and the triples point into them:
``ke_head``, ``ke_relation``, ``ke_tail`` (B,), ``ke_negative`` (B, n) the replacing entity and
``ke_negative_is_head`` (B, n) whether it replaces the head (else the tail).

Link prediction (transductive or inductive alike, since an unseen entity is encoded from its text):
:func:`candidate_scorer` encodes every entity's description once and returns a
:class:`knowledge.scoring.CandidateScorer` (``score = -||q - e||_p``), which
:func:`knowledge.evaluate.rank_metrics` ranks with the filtered, two-sided protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone, resolve_text_sizes
from fusion.models.heads import MLMHead
from fusion.models.layers import summary
from fusion.models.objectives import mlm_mask


@dataclass
class KeplerConfig:
    """Sizes and rates; ``None`` fields come from the backbone (:meth:`resolve`)."""

    num_relations: int = 1
    gamma: float = 4.0                 # margin of L_KE
    p: float = 1.0                     # norm of the TransE distance
    ke_weight: float = 1.0             # L = ke_weight * L_KE + L_MLM (the paper: 1)
    mlm_prob: float = 0.15
    initializer_range: float | None = None
    # filled by resolve():
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    mask_token_id: int | None = None

    def resolve(self, backbone: TextBackbone) -> KeplerConfig:
        if self.num_relations < 1:
            raise ValueError(f"num_relations={self.num_relations}: KEPLER needs at least one relation")
        return resolve_text_sizes(self, backbone)


def transe_distance(h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, p: float) -> torch.Tensor:
    """``||h + r - t||_p`` over the last axis: (..., D) each -> (...)."""
    return torch.linalg.vector_norm(h + r - t, ord=p, dim=-1)


def ke_loss(pos: torch.Tensor, neg: torch.Tensor, gamma: float) -> torch.Tensor:
    """L_KE (module docstring) from distances: ``pos`` (B,), ``neg`` (B, n); mean over the B
    positives, in float32 at least (logsigmoid of a bf16 distance loses the margin's scale)."""
    dtype = torch.promote_types(pos.dtype, torch.float32)
    pos, neg = pos.to(dtype), neg.to(dtype)
    return (-F.logsigmoid(gamma - pos) - F.logsigmoid(neg - gamma).mean(1)).mean()


class Kepler(nn.Module):
    """The backbone (shared, not copied, as the plain MLM recipe does) with an MLM head and a
    relation table (num_relations, D)."""

    def __init__(self, backbone: TextBackbone, config: KeplerConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = (config or KeplerConfig()).resolve(backbone)
        self.encoder = backbone.model
        eps = backbone.model.config.layer_norm_eps
        self.mlm = MLMHead(self.encoder.get_input_embeddings(), cfg.hidden_size, eps)
        self.relations = nn.Embedding(cfg.num_relations, cfg.hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The new parts only (the encoder keeps the backbone's weights). Relations uniform in
        ``+-(gamma + 2) / D``, the range RotatE's code (Sun et al. 2019) gives its TransE relation
        tables: a relation starts at the scale of the margin, not of BERT's 0.02."""
        bound = (self.config.gamma + 2.0) / self.config.hidden_size
        nn.init.uniform_(self.relations.weight, -bound, bound)
        std = self.config.initializer_range
        self.mlm.reset_parameters(std)

    # -- encoders --

    def entity_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Descriptions (U, Ld) -> entity vectors (U, D): the last layer at the first token."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def distances(self, entities: torch.Tensor, head: torch.Tensor, relation: torch.Tensor,
                  tail: torch.Tensor, negative: torch.Tensor, negative_is_head: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d_r(h, t) (B,), d_r(h'_i, t'_i) (B, n))`` from entity vectors (U, D) and the batch's
        indices into them (module docstring)."""
        h, t = entities[head], entities[tail]                                  # (B, D)
        r = self.relations(relation)                                           # (B, D)
        e = entities[negative]                                                 # (B, n, D)
        flip = negative_is_head[..., None]                                     # (B, n, 1)
        h_neg = torch.where(flip, e, h[:, None])                               # (B, n, D)
        t_neg = torch.where(flip, t[:, None], e)                               # (B, n, D)
        p = self.config.p
        return transe_distance(h, r, t, p), transe_distance(h_neg, r[:, None], t_neg, p)

    # -- pretraining --

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
             ) -> dict[str, torch.Tensor]:
        """``{"mlm", "ke", "total"}``: MLM on ``input_ids`` / ``attention_mask`` / ``maskable``
        (B_t, L) and L_KE on the triples (module docstring); a batch without triples gives ke = 0
        (kept in the graph for DDP)."""
        cfg = self.config
        ids, labels = mlm_mask(batch["input_ids"], batch["maskable"], cfg.mask_token_id, cfg.vocab_size,
                               generator, prob=cfg.mlm_prob)
        hidden = self.encoder(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        mlm = self.mlm.loss(hidden, labels)
        if batch["ke_head"].numel() and batch["entity_input_ids"].numel():
            ent = self.entity_vectors(batch["entity_input_ids"], batch["entity_attention_mask"])
            pos, neg = self.distances(ent, batch["ke_head"], batch["ke_relation"], batch["ke_tail"],
                                      batch["ke_negative"], batch["ke_negative_is_head"].bool())
            ke = ke_loss(pos, neg, cfg.gamma)
        else:
            ke = self.relations.weight.sum() * 0.0
        return {"mlm": mlm, "ke": ke, "total": mlm + cfg.ke_weight * ke}

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=c.hidden_size, num_layers=c.num_layers,
                       num_relations=c.num_relations, gamma=c.gamma, p=c.p, vocab_size=c.vocab_size)


# ----------------------------------------------------------------------------------------------
# inputs


def description_batch(descriptions: Sequence[Sequence[int]], pad_token_id: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists (already with their special tokens) -> ``(input_ids, attention_mask)``
    (U, Ld), padded to the longest."""
    U, L = len(descriptions), max((len(d) for d in descriptions), default=0)
    ids = torch.full((U, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros(U, L, dtype=torch.long)
    for i, d in enumerate(descriptions):
        ids[i, :len(d)] = torch.tensor(list(d), dtype=torch.long)
        mask[i, :len(d)] = 1
    return ids, mask


def ke_batch(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The KE half of a batch from rows that each hold ``ke_entities`` (KG indices), their
    tokenised descriptions ``ke_entity_tokens``, and triples pointing into the row's entities:
    ``ke_triples`` [[h, r, t]], ``ke_negatives`` [[e_1..e_n]], ``ke_negative_is_head``. An entity
    in several rows is encoded once: indices are remapped to the batch's distinct entities."""
    where: dict[int, int] = {}
    tokens: list[Sequence[int]] = []
    heads, rels, tails, negs, flips = [], [], [], [], []
    for row in rows:
        local = []
        for kg, tok in zip(row["ke_entities"], row["ke_entity_tokens"]):
            if kg not in where:
                where[kg] = len(tokens)
                tokens.append(tok)
            local.append(where[kg])
        for (h, r, t), neg, flip in zip(row["ke_triples"], row["ke_negatives"],
                                        row["ke_negative_is_head"]):
            heads.append(local[h])
            rels.append(r)
            tails.append(local[t])
            negs.append([local[e] for e in neg])
            flips.append(list(flip))
    n = len(negs[0]) if negs else 0
    ids, mask = description_batch(tokens, pad_token_id)
    return {"entity_input_ids": ids, "entity_attention_mask": mask,
            "ke_head": torch.tensor(heads, dtype=torch.long),
            "ke_relation": torch.tensor(rels, dtype=torch.long),
            "ke_tail": torch.tensor(tails, dtype=torch.long),
            "ke_negative": torch.tensor(negs, dtype=torch.long).view(len(negs), n),
            "ke_negative_is_head": torch.tensor(flips, dtype=torch.bool).view(len(flips), n)}


# ----------------------------------------------------------------------------------------------
# link prediction


@torch.no_grad()
def encode_entities(model: Kepler, descriptions: Sequence[Sequence[int]], pad_token_id: int,
                    batch_size: int = 64) -> torch.Tensor:
    """Every entity's vector (N, D) from its tokenised description, ``batch_size`` at a time, on
    the model's device (call on a model in eval mode: dropout would make vectors random)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(descriptions), batch_size):
        ids, mask = description_batch(descriptions[i:i + batch_size], pad_token_id)
        out.append(model.entity_vectors(ids.to(device), mask.to(device)).float())
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size, device=device)


def candidate_scorer(model: Kepler, entities: torch.Tensor, exact: bool = True) -> Any:
    """KEPLER as a full-candidate scorer for :func:`knowledge.evaluate.rank_metrics`: entity vectors
    (N, D) from :func:`encode_entities` as the candidates, ``q = e_h + r`` for tails and
    ``q = e_t - r`` for heads, ``score = -||q - e||_p`` (higher is better)."""
    from knowledge.scoring import CandidateScorer

    rel = model.relations.weight.detach().float().to(entities.device)                # (R, D)
    return CandidateScorer(candidates=entities,
                           tail_query=lambda h, r: entities[h] + rel[r],
                           head_query=lambda r, t: entities[t] - rel[r],
                           kind="distance", p=model.config.p, exact=exact)


def draw_negatives(head: int, tail: int, described: Sequence[int], position: dict[int, int], n: int,
                   rng: np.random.Generator, head_prob: float = 0.5) -> tuple[list[int], list[bool]]:
    """``n`` corruptions of one positive: ``(entities, replaces_head)``. Each replaces the head
    with probability ``head_prob``, else the tail, by an entity drawn uniformly from the
    ``described`` ones (KG indices; ``position`` maps each to its place there) other than the one
    it replaces: ``u ~ U{0..M-2}`` shifted past it, so a corruption is never the positive itself.
    The replaced entity must be described (the positive's ends are) and ``M >= 2``."""
    flips = (rng.random(n) < head_prob).tolist()
    draws = rng.integers(len(described) - 1, size=n).tolist()
    out = []
    for flip, u in zip(flips, draws):
        at = position[head if flip else tail]
        out.append(int(described[u + (u >= at)]))
    return out, [bool(f) for f in flips]
