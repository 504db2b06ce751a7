"""LIBERT: masked language modelling beside a lexical relation classification task from WordNet.

Lauscher, Vulić, Ponti, Korhonen & Glavaš (2020), "Specializing Unsupervised Pretraining Models for
Word-Level Semantic Similarity", COLING (arXiv 1909.02339; "Lexically Informed" BERT).

Linguistic constraints: word pairs that stand in a lexical relation, here from WordNet as in the
paper: synonyms (two single-word lemmas of one synset) and hyponym-hypernym pairs (a lemma of a
synset and a lemma of its direct hypernym). Each pair is one example of a binary task, fed as a
sentence pair::

    x      = [CLS] w1 [SEP] w2 [SEP]           token types 0 for "[CLS] w1 [SEP]", 1 for "w2 [SEP]"
    p(related | w1, w2) = softmax( W_c tanh(W_p h_[CLS] + b_p) + b_c )     (BERT's NSP head form)
    L_LCR  = cross-entropy over {unrelated, related}, averaged over the pairs of the batch
    L      = L_MLM + lambda * L_LCR                                    (lambda = 1: the paper's sum)

Negatives: in-batch nearest neighbours, the scheme of the paper (after Wieting et al. 2015 and
attract-repel, Mrkšić et al. 2017): for every positive (a, b) of a batch, two negatives (a, t_a)
and (t_b, b), each word keeping its slot, where t_x is the word of the same batch most similar to x
that is neither x nor related to x by a pair of the batch::

    t_x = argmax_{y in batch words, y != x, (x, y) not a batch pair} cos(v_x, v_y)

so the classifier must tell related words from merely similar ones. The paper measures similarity
with static word vectors (fastText); none is available offline, so ``v_x`` is the mean of the
backbone's (current, input) wordpiece embeddings of x. A word related to every other word of its
batch gets no negative (:func:`nearest_unrelated` gives -1): with several documents' pairs in a
batch that takes a word related to all of them. A pair related elsewhere in WordNet but not in the
batch can be drawn as a negative, as in the paper's in-batch scheme.

Multi-tasking. The paper alternates batches of BERT's objectives and of the relation task. Here every
pretraining row is a document (for MLM) carrying ``pairs_per_doc`` relation pairs (assigned by the
recipe so that consecutive documents walk through a seeded permutation of all pairs), and each step
sums both losses: the same expected gradient as alternating one batch of each, with the balance
fixed instead of left to chance. NSP is left out (stele's encoders all leave it out: RoBERTa showed
it does not help); MLM is BERT's 15%, 80/10/10 (:func:`fusion.models.objectives.mlm_mask`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.heads import MLMHead
from fusion.models.layers import summary
from fusion.models.objectives import mlm_mask

SYNONYM, HYPERNYM = 0, 1      # relation codes of a pair (both are the positive class)


# ----------------------------------------------------------------------------------- the pairs
def relation_pairs(synsets: Sequence[Sequence[str] | None], hypernyms: Iterable[tuple[int, int]],
                   synonyms: bool = True) -> tuple[list[tuple[str, str, int]], Counter]:
    """Positive pairs ``(w1, w2, relation)``, sorted, each ordered pair once.

    ``synsets[i]``: the lemmas of synset ``i`` (None: an entity that is no WordNet synset);
    ``hypernyms``: ``(hyponym synset, hypernym synset)`` index pairs. Only single-word lemmas
    (lower-cased) make pairs; synonyms (unless ``synonyms`` is False) come in the order of the
    synset's lemmas, hypernymy as (hyponym, hypernym). Counted: ``synonym_pairs``,
    ``hypernym_pairs``, ``lemmas_multiword``, ``pairs_same_word`` (a word related to itself, e.g.
    a lemma in both synsets), ``pairs_duplicate`` (one word pair from several synset pairs) and
    ``hypernym_edges_not_synsets`` (an end that is no WordNet synset)."""
    counts: Counter = Counter()
    words: list[list[str] | None] = []
    for lemmas in synsets:
        if lemmas is None:
            words.append(None)
            continue
        ws = []
        for lemma in lemmas:
            w = lemma.lower().replace("_", " ")
            if " " in w or "-" in w:
                counts["lemmas_multiword"] += 1
            elif w not in ws:
                ws.append(w)
        words.append(ws)
    seen: dict[tuple[str, str], int] = {}

    def add(a: str, b: str, rel: int) -> None:
        if a == b:
            counts["pairs_same_word"] += 1
        elif (a, b) in seen:
            counts["pairs_duplicate"] += 1
        else:
            seen[(a, b)] = rel
            counts["synonym_pairs" if rel == SYNONYM else "hypernym_pairs"] += 1

    for ws in words if synonyms else []:
        for i, a in enumerate(ws or []):
            for b in (ws or [])[i + 1:]:
                add(a, b, SYNONYM)
    for hypo, hyper in hypernyms:
        if words[hypo] is None or words[hyper] is None:
            counts["hypernym_edges_not_synsets"] += 1
            continue
        for a in words[hypo]:
            for b in words[hyper]:
                add(a, b, HYPERNYM)
    return sorted((a, b, r) for (a, b), r in seen.items()), counts


def doc_pair_indices(doc: int, per_doc: int, num_pairs: int) -> list[int]:
    """Which positions of the (permuted) pair list document ``doc`` (its global index) carries:
    ``doc * per_doc + j`` modulo the number of pairs, so the first ``num_pairs / per_doc``
    documents use every pair exactly once before any repeats."""
    return [(doc * per_doc + j) % num_pairs for j in range(per_doc)]


# ---------------------------------------------------------------------------------- negatives
def nearest_unrelated(vectors: torch.Tensor, related: torch.Tensor) -> torch.Tensor:
    """For each of W words, the index of the most cosine-similar word that is not itself and not
    ``related`` to it (``vectors`` (W, D), ``related`` (W, W) bool, symmetric); -1 where none."""
    v = F.normalize(vectors.float(), dim=-1)
    sim = v @ v.T                                                                  # (W, W)
    bad = related | torch.eye(len(v), dtype=torch.bool, device=v.device)
    sim = sim.masked_fill(bad, float("-inf"))
    best = sim.argmax(-1)                                                          # (W,)
    return torch.where(bad.all(-1), torch.full_like(best, -1), best)


def word_vectors(embedding: torch.Tensor, words: Sequence[Sequence[int]]) -> torch.Tensor:
    """(W, D): each word's mean wordpiece embedding (``embedding`` (V, D), no gradient)."""
    P = max(len(w) for w in words)
    idx = torch.zeros(len(words), P, dtype=torch.long)
    mask = torch.zeros(len(words), P)
    for i, w in enumerate(words):
        idx[i, :len(w)] = torch.tensor(w)
        mask[i, :len(w)] = 1
    with torch.no_grad():
        e = embedding.detach()[idx.to(embedding.device)].float().cpu()            # (W, P, D)
    return (e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def pair_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], embedding: torch.Tensor,
               cls_id: int, sep_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The relation task's batch from a batch's positive pairs (wordpiece ids of w1, w2): the
    positives (label 1) and their nearest-unrelated negatives (a, t_a), (t_b, b) (label 0, module
    docstring) as
    ``pair_input_ids``, ``pair_token_type_ids``, ``pair_attention_mask`` (N, T) and
    ``pair_labels`` (N,); positives first, then the negatives of each positive in turn."""
    if not pairs:
        raise ValueError("pair_batch: no pair to classify")
    keys: dict[tuple[int, ...], int] = {}
    for a, b in pairs:
        for w in (a, b):
            keys.setdefault(tuple(w), len(keys))
    words = list(keys)
    related = torch.zeros(len(words), len(words), dtype=torch.bool)
    for a, b in pairs:
        i, j = keys[tuple(a)], keys[tuple(b)]
        related[i, j] = related[j, i] = True
    nearest = nearest_unrelated(word_vectors(embedding, words), related).tolist()
    examples = [(list(a), list(b), 1) for a, b in pairs]
    for a, b in pairs:
        ta, tb = nearest[keys[tuple(a)]], nearest[keys[tuple(b)]]
        if ta >= 0:
            examples.append((list(a), list(words[ta]), 0))     # (a, t_a)
        if tb >= 0:
            examples.append((list(words[tb]), list(b), 0))     # (t_b, b)
    T = max(3 + len(a) + len(b) for a, b, _ in examples)
    N = len(examples)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    types = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    for n, (a, b, _) in enumerate(examples):
        seq = [cls_id, *a, sep_id, *b, sep_id]
        ids[n, :len(seq)] = torch.tensor(seq)
        types[n, 2 + len(a):len(seq)] = 1
        mask[n, :len(seq)] = 1
    return {"pair_input_ids": ids, "pair_token_type_ids": types, "pair_attention_mask": mask,
            "pair_labels": torch.tensor([e[2] for e in examples])}


# ----------------------------------------------------------------------------------- the model
@dataclass
class LibertConfig:
    lcr_weight: float = 1.0                 # lambda
    mask_prob: float = 0.15
    initializer_range: float | None = None  # None: the backbone's


class RelationHead(nn.Module):
    """BERT's pooler and a two-way classifier on the [CLS] vector: (N, D) -> (N, 2)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.pool = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.pool(cls)))


class Libert(nn.Module):
    """A BERT-family backbone with an MLM head and the lexical relation head.

    ``loss(batch, generator)`` takes the documents' ``input_ids``, ``attention_mask``,
    ``maskable`` (B, L) and the pairs' ``pair_*`` tensors (:func:`pair_batch`), returns
    ``{"mlm", "lcr", "total"}``."""

    def __init__(self, backbone: Any, config: LibertConfig | None = None):
        super().__init__()
        self.config = cfg = config or LibertConfig()
        self.encoder, bc = backbone.model, backbone.model.config
        self.mask_token_id, self.vocab_size = backbone.tokenizer.mask_token_id, bc.vocab_size
        if self.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; MLM needs one")
        self.std = bc.initializer_range if cfg.initializer_range is None else cfg.initializer_range
        self.mlm = MLMHead(self.encoder.get_input_embeddings(), bc.hidden_size, bc.layer_norm_eps)
        self.relation = RelationHead(bc.hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The new parts only (the backbone keeps its weights): BERT's initialisation."""
        for lin in (self.mlm.dense, self.relation.pool, self.relation.out):
            nn.init.normal_(lin.weight, std=self.std)
            nn.init.zeros_(lin.bias)
        self.mlm.norm.reset_parameters()
        nn.init.zeros_(self.mlm.bias)

    def relation_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) word pairs -> (N, 2) logits (unrelated, related)."""
        h = self.encoder(input_ids=input_ids, token_type_ids=token_type_ids,
                         attention_mask=attention_mask).last_hidden_state                # (N, T, D)
        return self.relation(h[:, 0])                                                  # (N, 2)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict:
        ids, labels = mlm_mask(batch["input_ids"], batch["maskable"], self.mask_token_id,
                               self.vocab_size, generator, prob=self.config.mask_prob)
        hidden = self.encoder(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        mlm = self.mlm.loss(hidden, labels)
        if "pair_input_ids" not in batch:   # no pair of this batch fit max_length: MLM alone
            lcr = sum(p.sum() for p in self.relation.parameters()) * 0.0   # kept in the graph (DDP)
            return {"mlm": mlm, "lcr": lcr, "total": mlm + lcr}
        logits = self.relation_logits(batch["pair_input_ids"], batch["pair_token_type_ids"],
                                      batch["pair_attention_mask"])
        lcr = F.cross_entropy(logits.float(), batch["pair_labels"])
        return {"mlm": mlm, "lcr": lcr, "total": mlm + self.config.lcr_weight * lcr}

    def __repr__(self) -> str:
        return summary(self, hidden_size=self.encoder.config.hidden_size,
                       lcr_weight=self.config.lcr_weight)
