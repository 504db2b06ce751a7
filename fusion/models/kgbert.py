"""KG-BERT: knowledge-graph triples read as sentences by a BERT, scored by its [CLS] vector.

Yao, Mao & Luo (2019), "KG-BERT: BERT for Knowledge Graph Completion", arXiv:1909.03193; reference
code yao8839836/kg-bert.

Inputs (paper section 3 and its figures): entity and relation text (names or descriptions) as::

    triple:  [CLS] head tokens [SEP] relation tokens [SEP] tail tokens [SEP]
             segment A on the head and the tail (with their [SEP]s and [CLS]), segment B on the relation
    pair:    [CLS] head tokens [SEP] tail tokens [SEP]            segments A, B (relation prediction)

truncated longest part first (kg-bert's ``_truncate_seq_triple``). ``C`` (B, D) is the last layer at
``[CLS]``.

Triple classification (paper section 3): ``s = sigmoid(C w + b)``, the plausibility of the triple;
``D+`` the training triples, ``D-`` their corruptions (head or tail replaced by a random entity,
redrawn when the corruption is itself a known triple), labels ``y = 1`` / ``0``::

    L_triple = - 1/|D+ u D-| sum_tau ( y log s_tau + (1 - y) log(1 - s_tau) )

The paper writes the score as a 2-way softmax ``(s_0, s_1)`` with ``s_0 + s_1 = 1``; one logit
through a sigmoid is the same family (``softmax(a, b)_1 = sigmoid(b - a)``) with one parameter
vector fewer.

Relation prediction (paper section 3, "KG-BERT(a, b)"): ``p(r | h, t) = softmax(C' W_r)`` on the
pair input, cross-entropy against the true relation. The paper trains the two tasks as separate
models; :meth:`KgBert.loss` adds them with weights (``relation_weight = 0``: classification only).

Link prediction (paper section 4): rank candidate entities by ``s`` of the completed triple, one
forward pass per candidate; :func:`rank_candidates` does it with the filtered protocol of
:mod:`knowledge.evaluate` (both sides, filter against every known triple, realistic rank) over at
most ``cap`` sampled candidates per query besides the true one; every result carries that cap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone
from fusion.models.layers import init_bert_weights, summary


@dataclasses.dataclass
class KgBertConfig:
    num_relations: int = 1
    triple_weight: float = 1.0      # L = triple_weight * L_triple + relation_weight * L_relation
    relation_weight: float = 1.0
    dropout: float | None = None    # before the heads; None: the backbone's hidden dropout
    initializer_range: float | None = None  # None: the backbone's


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """Losses in float32 at least (bf16 logits under autocast; float64 stays, for tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class KgBert(nn.Module):
    """The backbone (shared, not copied) with a triple-classification head (D -> 1) and a
    relation-prediction head (D -> num_relations) on the [CLS] vector."""

    def __init__(self, backbone: TextBackbone, config: KgBertConfig | None = None) -> None:
        super().__init__()
        cfg = config or KgBertConfig()
        bc = backbone.model.config
        if cfg.num_relations < 1:
            raise ValueError(f"num_relations={cfg.num_relations}: KG-BERT needs at least one relation")
        std = bc.initializer_range if cfg.initializer_range is None else cfg.initializer_range
        self.config = cfg = dataclasses.replace(
            cfg, dropout=bc.hidden_dropout_prob if cfg.dropout is None else cfg.dropout,
            initializer_range=std)
        self.encoder = backbone.model
        self.dropout = nn.Dropout(cfg.dropout)
        self.triple_head = nn.Linear(bc.hidden_size, 1)
        self.relation_head = nn.Linear(bc.hidden_size, cfg.num_relations)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for head in (self.triple_head, self.relation_head):
            init_bert_weights(head, self.config.initializer_range)

    def cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) each -> C (B, D), the last layer at [CLS]."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids)
        return self.dropout(out.last_hidden_state[:, 0])

    def triple_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor) -> torch.Tensor:
        """Triple inputs (B, L) -> logits (B,); ``sigmoid`` of them is the paper's ``s``."""
        return self.triple_head(self.cls(input_ids, attention_mask, token_type_ids)).squeeze(-1)

    def relation_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        token_type_ids: torch.Tensor) -> torch.Tensor:
        """Pair inputs (B, L) -> relation logits (B, num_relations)."""
        return self.relation_head(self.cls(input_ids, attention_mask, token_type_ids))

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
             ) -> dict[str, torch.Tensor]:
        """``{"triple", "relation", "total"}``: BCE over ``triple_*`` (B_t, L) with ``label``
        (B_t,) in {0, 1}, cross-entropy over ``pair_*`` (B_p, L) with ``relation`` (B_p,)."""
        cfg = self.config
        zero = self.triple_head.weight.sum() * 0.0  # a skipped task stays in the graph (DDP)
        triple = relation = zero
        if cfg.triple_weight and batch["triple_input_ids"].numel():
            logits = self.triple_logits(batch["triple_input_ids"], batch["triple_attention_mask"],
                                        batch["triple_token_type_ids"])
            logits = _at_least_f32(logits)
            triple = F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))
        if cfg.relation_weight and batch["pair_input_ids"].numel():
            logits = self.relation_logits(batch["pair_input_ids"], batch["pair_attention_mask"],
                                          batch["pair_token_type_ids"])
            relation = F.cross_entropy(_at_least_f32(logits), batch["relation"]) + zero
        return {"triple": triple, "relation": relation,
                "total": cfg.triple_weight * triple + cfg.relation_weight * relation}

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=self.triple_head.in_features, num_relations=c.num_relations,
                       triple_weight=c.triple_weight, relation_weight=c.relation_weight)


# ----------------------------------------------------------------------------------------------
# inputs


def truncate_longest(parts: list[list[int]], budget: int) -> list[list[int]]:
    """Drop tokens from the end of the longest part (the first of equals) until the parts fit in
    ``budget`` tokens together, as kg-bert's ``_truncate_seq_triple``."""
    parts = [list(p) for p in parts]
    while sum(map(len, parts)) > budget:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest].pop()
    return parts


def sequence(parts: Sequence[Sequence[int]], segments: Sequence[int], cls_id: int, sep_id: int,
             max_length: int) -> tuple[list[int], list[int]]:
    """``[CLS] p_1 [SEP] p_2 [SEP] ...`` (``max_length`` tokens at most) and its token types:
    ``[CLS]`` with the first part, each ``[SEP]`` with the part it closes."""
    budget = max_length - 1 - len(parts)
    if budget < len(parts):
        raise ValueError(f"max_length={max_length} leaves no room for {len(parts)} parts")
    parts = truncate_longest([list(p) for p in parts], budget)
    ids, types = [cls_id], [segments[0]]
    for p, s in zip(parts, segments):
        ids += [*p, sep_id]
        types += [s] * (len(p) + 1)
    return ids, types


def triple_input(head: Sequence[int], relation: Sequence[int], tail: Sequence[int], cls_id: int,
                 sep_id: int, max_length: int) -> tuple[list[int], list[int]]:
    """``[CLS] h [SEP] r [SEP] t [SEP]``, segments A, B, A (token ids without special tokens in)."""
    return sequence([head, relation, tail], [0, 1, 0], cls_id, sep_id, max_length)


def pair_input(head: Sequence[int], tail: Sequence[int], cls_id: int, sep_id: int, max_length: int
               ) -> tuple[list[int], list[int]]:
    """``[CLS] h [SEP] t [SEP]``, segments A, B (relation prediction)."""
    return sequence([head, tail], [0, 1], cls_id, sep_id, max_length)


def pad_sequences(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int, prefix: str
                  ) -> dict[str, torch.Tensor]:
    """``(ids, types)`` pairs -> ``{prefix}_input_ids``, ``_attention_mask``, ``_token_type_ids``
    (B, L), padded to the longest."""
    B, L = len(seqs), max((len(s[0]) for s in seqs), default=0)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    types = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, (s, t) in enumerate(seqs):
        ids[i, :len(s)], types[i, :len(t)], mask[i, :len(s)] = torch.tensor(s), torch.tensor(t), 1
    return {f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": mask, f"{prefix}_token_type_ids": types}


def corrupt(h: int, r: int, t: int, entities: Sequence[int], known: set[tuple[int, int, int]],
            rng: np.random.Generator, tries: int = 5) -> tuple[int, int, int] | None:
    """One corruption of ``(h, r, t)``: the head or the tail (probability 1/2 each) replaced by an
    entity drawn uniformly from ``entities``, redrawn up to ``tries`` times while the result is a
    ``known`` triple (kg-bert redraws 5 times); None when every draw was known (a false negative
    the caller counts and leaves out)."""
    for _ in range(tries):
        e = int(entities[rng.integers(len(entities))])
        triple = (e, r, t) if rng.random() < 0.5 else (h, r, e)
        if triple not in known and triple != (h, r, t):
            return triple
    return None


# ----------------------------------------------------------------------------------------------
# link prediction


class TripleScorer:
    """``score(triples (m, 3)) -> (m,)`` logits of a :class:`KgBert` (in eval mode, no gradient),
    from tokenised entity and relation texts (ids without special tokens), ``batch_size``
    sequences per forward pass."""

    def __init__(self, model: KgBert, tokenizer: Any, entity_tokens: Sequence[Sequence[int]],
                 relation_tokens: Sequence[Sequence[int]], max_length: int, batch_size: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.entities, self.relations = entity_tokens, relation_tokens
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def __call__(self, triples: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tok, out = self.tokenizer, []
        rows = triples.tolist()
        for i in range(0, len(rows), self.batch_size):
            seqs = [triple_input(self.entities[h], self.relations[r], self.entities[t], tok.cls_token_id,
                                 tok.sep_token_id, self.max_length)
                    for h, r, t in rows[i:i + self.batch_size]]
            b = {k: v.to(device) for k, v in pad_sequences(seqs, tok.pad_token_id, "t").items()}
            out.append(self.model.triple_logits(b["t_input_ids"], b["t_attention_mask"],
                                                b["t_token_type_ids"]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def rank_candidates(score: Callable[[torch.Tensor], torch.Tensor], test: Any, known: Any,
                    num_entities: int, cap: int | None, seed: int = 0,
                    candidates: Sequence[int] | None = None, num_relations: int | None = None,
                    sides: Sequence[str] = ("head", "tail"), ks: Sequence[int] = (1, 3, 10)
                    ) -> dict[str, Any]:
    """Link prediction by scoring completed triples, the filtered protocol of
    :mod:`knowledge.evaluate` over a capped candidate set.

    For each test triple and side, the candidates are ``candidates`` (default: every entity) less
    the target and less every other entity completing a ``known`` triple (the filter); ``cap`` of
    them (all when None or fewer) are sampled without replacement (seeded by ``seed``, the triple
    and the side) and scored beside the target by ``score`` ((m, 3) triples -> (m,), higher is
    better). Rank: realistic, ``(1 + #{s > s*} + #{s >= s*}) / 2`` with the target in the second
    count. With ``cap=None`` this is :func:`knowledge.evaluate.rank_metrics`' filtered ranking.

    Returns ``protocol`` (with ``candidate_cap``), ``filtered`` -> ``both``/``head``/``tail`` ->
    MRR, MR, Hits@k, ``count`` and ``candidate_cap`` (the cap stands beside every number: a capped
    rank is not comparable with a full one), ``ranks`` (per query: ``side``, ``rank``,
    ``candidates`` scored besides the target).
    """
    from knowledge.evaluate import KnownTriples, summarize

    test = torch.as_tensor(test, dtype=torch.long).cpu()
    known = torch.as_tensor(known, dtype=torch.long).cpu()
    if num_relations is None:
        num_relations = int(torch.cat([test[:, 1], known[:, 1], torch.zeros(1, dtype=torch.long)]).max()) + 1
    filt = KnownTriples.build(known, num_entities, num_relations)
    pool = np.arange(num_entities) if candidates is None else np.unique(np.asarray(candidates))
    side_ix, ranks, scored = [], [], []
    for side in sides:
        rows, others = filt.others(side, test)
        removed: list[set[int]] = [set() for _ in range(len(test))]
        for row, e in zip(rows.tolist(), others.tolist()):
            removed[row].add(e)
        for i, (h, r, t) in enumerate(test.tolist()):
            target = h if side == "head" else t
            keep = pool[~np.isin(pool, list(removed[i] | {target}))]
            if cap is not None and len(keep) > cap:
                rng = np.random.default_rng([seed, i, sides.index(side)])
                keep = rng.choice(keep, size=cap, replace=False)
            ents = torch.as_tensor(np.concatenate([[target], keep]), dtype=torch.long)
            triples = torch.tensor([h, r, t]).repeat(len(ents), 1)
            triples[:, 0 if side == "head" else 2] = ents
            s = score(triples).double()
            ranks.append((1 + (s[1:] > s[0]).sum().item() + (s >= s[0]).sum().item()) / 2)
            side_ix.append(side)
            scored.append(len(keep))
    rk, side_arr = torch.tensor(ranks, dtype=torch.double), np.array(side_ix)
    out: dict[str, Any] = {
        "protocol": {"sides": list(sides), "filtered": "against the known triples (Bordes et al. 2013)",
                     "rank": "realistic = (optimistic + pessimistic) / 2",
                     "candidate_cap": cap, "candidate_pool": len(pool)},
        "filtered": {}}
    for name, sel in (("both", np.ones(len(rk), bool)), *((s, side_arr == s) for s in sides)):
        out["filtered"][name] = {**summarize(rk[torch.from_numpy(sel)], ks), "candidate_cap": cap}
    out["ranks"] = {"side": side_arr, "rank": rk.numpy(), "candidates": np.array(scored)}
    return out
