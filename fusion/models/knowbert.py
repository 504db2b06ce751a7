"""KnowBERT: a knowledge attention and recontextualisation (KAR) layer between two BERT layers.

Peters, Neumann, Logan, Schwartz, Joshi, Singh & Smith (2019), "Knowledge Enhanced Contextual Word
Representations", EMNLP; reference code allenai/kb (``kb/knowbert.py``, ``kb/span_attention_layer.py``).

The backbone runs up to layer ``n`` (``layers_before``), the KAR rewrites its hidden states ``H``,
and the backbone's remaining layers run on the result. KAR (paper section 3.3, eq. 1-7), for one
sequence with ``L`` wordpieces, ``M`` candidate mention spans ``[i_m, j_m)`` and ``K`` candidate
entities per span (rows ``c_mk`` of a frozen KG embedding table ``T`` (N, E), priors ``p_mk``)::

    H^p    = H W_1 + b_1                                 projection to the entity width  (L, E)
    beta_m = softmax_{t in [i_m, j_m)}( w_a . H^p_t + b_a )    self-attentive span pooling
    s_m    = LN_s( sum_t beta_mt H^p_t )                 mention-span representation     (M, E)
    S^e    = TransformerLayer(S)                         span self-attention, one layer  (M, E)
    e_mk   = LN_e( T[c_mk] )                             candidate embeddings         (M, K, E)
    psi_mk = MLP( [ s^e_m . e_mk / sqrt(E) ,  p_mk ] )   entity linker, 2 -> linker_hidden
                                                         -> ReLU -> 1                   (M, K)
    alpha_mk = softmax_{k valid, psi_mk >= delta}( psi_mk )   (0 for a span with none left)
    e~_m   = sum_k alpha_mk e_mk                         weighted entity embedding       (M, E)
    s'_m   = LN_w( s^e_m + e~_m )                        knowledge-enhanced span         (M, E)
    H'^p   = FFN( LN_a( H^p + MHA(Q = H^p, K = V = S') ) )   word-to-entity-span attention: a
                                                         BERT layer whose keys are the spans (L, E)
    H'     = H + H'^p W_2 + b_2                          back to the model width, residual (L, D)

MHA has ``entity_heads`` heads; FFN and the span layer are post-LN blocks of width
``span_intermediate``. The three LayerNorms ``LN_s``, ``LN_e``, ``LN_w`` are not in the paper's
equations; allenai/kb has them (``projected_span_layer_norm``, ``kg_layer_norm``,
``weighted_entity_layer_norm``) and they put spans and KG vectors (whose scale depends on the KG
embedding model) on one scale before the dot product. Dropout (the backbone's rate) is applied to
``e~`` and to ``H'^p W_2 + b_2`` as allenai/kb does.

``W_2, b_2`` start as the inverse of the projection, ``W_2 = pinv(W_1)``, ``b_2 = -pinv(W_1) b_1``
(the paper initialises W_2 as W_1's pseudo-inverse; allenai/kb adds ``+pinv(W_1) b_1``, which does
not invert ``H W_1 + b_1``). The threshold ``delta`` (``threshold``; None: every valid candidate)
is the paper's: a span whose candidates all score below it gets no entity (allenai/kb's NULL
embedding; here the zero vector, since a KG embedding table has no NULL row).

Deliberate departures from allenai/kb, each with its reason:

* eq. 7 as the paper writes it, without allenai/kb's extra LayerNorm on the sum, and a sequence
  with no candidate span skips the KAR (``H' = H``): it has nothing to recontextualise with, and so
  the model on text without mentions is exactly its backbone (pretraining starts from the
  backbone's function; a test checks it). allenai/kb lets such a sequence attend uniformly to
  padding spans.
* The linker loss is the log-likelihood form (allenai/kb offers it beside a max-margin loss):
  ``L_EL = -log softmax_{k valid}(psi_mk)[gold_m]`` over the spans whose gold entity is among their
  candidates (here the entity ``knowledge.link`` chose). ``L = L_MLM + linker_weight * L_EL``,
  trained end to end (the backbone, the KAR, the MLM head; the entity table stays frozen). NSP is
  left out, as in stele's other encoders.

Batch layout (:func:`collate`): ``input_ids``, ``attention_mask``, ``special_tokens_mask`` (B, L);
``span_start``, ``span_end`` (B, M) wordpiece positions, end exclusive, -1 for padding spans;
``candidates`` (B, M, K) entity-table rows, -1 for padding; ``priors`` (B, M, K);
``gold`` (B, M) the gold candidate's position among the span's candidates, ``IGNORE`` when unknown.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.backbone import TextBackbone, backbone_mask, resolve_text_sizes
from fusion.models.heads import MLMHead
from fusion.models.layers import Attention, FeedForward, TransformerLayer, init_bert_weights, summary
from fusion.models.objectives import IGNORE, mlm_mask

NO_ENTITY = -1


@dataclass
class KnowBertConfig:
    """Sizes and rates; ``None`` fields come from the backbone and the entity table (:meth:`resolve`)."""

    layers_before: int | None = None   # backbone layers below the KAR; None: all but the top two
                                       # (KnowBERT-Wiki sits between layers 10 and 11 of 12), >= 1
    entity_heads: int = 4              # heads of the span self-attention and word-to-span attention
    span_intermediate: int | None = None  # FFN width of both span layers; None: 4 E
    linker_hidden: int = 100           # allenai/kb's MLP over (dot, prior)
    threshold: float | None = None     # delta: candidates scoring below it get no weight
    linker_weight: float = 1.0         # L = L_MLM + linker_weight * L_EL
    mlm_prob: float = 0.15             # BERT's masking rate, 80/10/10 inside it
    dropout: float | None = None       # None: the backbone's hidden dropout
    attention_dropout: float | None = None  # None: the backbone's
    initializer_range: float | None = None  # None: the backbone's (BERT: 0.02)
    # filled by resolve():
    hidden_size: int | None = None     # D
    intermediate_size: int | None = None  # the backbone's FFN width (recorded, not used by the KAR)
    num_layers: int | None = None      # the backbone's depth
    vocab_size: int | None = None
    mask_token_id: int | None = None
    num_entities: int | None = None    # N, rows of the entity table
    entity_dim: int | None = None      # E

    def resolve(self, backbone: TextBackbone, entities: torch.Tensor) -> KnowBertConfig:
        bc = backbone.model.config
        n = max(1, bc.num_hidden_layers - 2) if self.layers_before is None else self.layers_before
        if not 1 <= n <= bc.num_hidden_layers:
            raise ValueError(f"layers_before={n}: the KAR needs contextual states, so 1.."
                             f"{bc.num_hidden_layers} (the backbone's layers)")
        if entities.dim() != 2:
            raise ValueError(f"entity table must be (num_entities, entity_dim), got {tuple(entities.shape)}")
        E = int(entities.shape[1])
        if E % self.entity_heads:
            raise ValueError(f"entity_dim {E} is not a multiple of entity_heads {self.entity_heads}")
        return resolve_text_sizes(
            self, backbone, ("num_entities", "entity_dim"), "the backbone/entity table", layers_before=n,
            span_intermediate=4 * E if self.span_intermediate is None else self.span_intermediate,
            dropout=bc.hidden_dropout_prob if self.dropout is None else self.dropout,
            attention_dropout=(bc.attention_probs_dropout_prob if self.attention_dropout is None
                               else self.attention_dropout),
            num_entities=int(entities.shape[0]), entity_dim=E)


# ----------------------------------------------------------------------------------------------
# the KAR layer


class KAROutput(NamedTuple):
    hidden: torch.Tensor          # (B, L, D) H'
    scores: torch.Tensor          # (B, M, K) psi, -inf at invalid candidates
    weights: torch.Tensor         # (B, M, K) alpha
    spans: torch.Tensor           # (B, M, E) s'  (knowledge-enhanced spans)


def span_pool(hp: torch.Tensor, logits: torch.Tensor, start: torch.Tensor, end: torch.Tensor
              ) -> torch.Tensor:
    """Self-attentive span pooling (Lee et al. 2017, the paper's span extractor): ``hp`` (B, L, E),
    ``logits`` (B, L) the attention logit of every position, spans ``[start, end)`` (B, M) ->
    (B, M, E). A padding span (start < 0) or one covering no position gives 0."""
    pos = torch.arange(hp.shape[1], device=hp.device)                              # (L,)
    inside = (pos >= start[..., None]) & (pos < end[..., None]) & (start[..., None] >= 0)  # (B, M, L)
    a = masked_softmax(logits[:, None, :].expand(inside.shape), inside)            # (B, M, L)
    return a.to(hp.dtype) @ hp                                                     # (B, M, E)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 or wider: softmaxes and scores under bf16 autocast lose the prior's scale."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of ``x`` over the last axis among ``mask``ed entries, in float32 at least; 0 on a row
    with none (not NaN: a NaN row would poison the backward pass even when multiplied by 0)."""
    some = mask.any(-1, keepdim=True)
    x = _wide(x).masked_fill(~mask, float("-inf")).masked_fill(~some, 0.0)
    return torch.softmax(x, -1) * some


class KAR(nn.Module):
    """The knowledge attention and recontextualisation layer (module docstring, eq. 1-7)."""

    def __init__(self, cfg: KnowBertConfig, eps: float) -> None:
        super().__init__()
        D, E, heads = cfg.hidden_size, cfg.entity_dim, cfg.entity_heads
        drop = dict(dropout=cfg.dropout, attention_dropout=cfg.attention_dropout, eps=eps)
        self.threshold = cfg.threshold
        self.down = nn.Linear(D, E)                                  # W_1, b_1
        self.span_logit = nn.Linear(E, 1)                            # w_a, b_a
        self.span_norm = nn.LayerNorm(E, eps=eps)                    # LN_s
        self.span_encoder = TransformerLayer(E, heads, cfg.span_intermediate, **drop)
        self.entity_norm = nn.LayerNorm(E, eps=eps)                  # LN_e
        self.linker = nn.Sequential(nn.Linear(2, cfg.linker_hidden), nn.ReLU(),
                                    nn.Linear(cfg.linker_hidden, 1))
        self.enhanced_norm = nn.LayerNorm(E, eps=eps)                # LN_w
        self.word_to_span = Attention(E, heads, **drop)              # MHA + LN_a
        self.ffn = FeedForward(E, cfg.span_intermediate, "gelu", cfg.dropout, eps)
        self.up = nn.Linear(E, D)                                    # W_2, b_2
        self.dropout = nn.Dropout(cfg.dropout)

    def reset_parameters(self, std: float) -> None:
        init_bert_weights(self, std)
        with torch.no_grad():   # W_2 = pinv(W_1): H'^p = H^p maps back onto the part of H it came from
            pinv = torch.linalg.pinv(self.down.weight.double().T)    # (E, D)
            self.up.weight.copy_(pinv.T.to(self.up.weight.dtype))    # (D, E)
            self.up.bias.copy_(-(self.down.bias.double() @ pinv).to(self.up.bias.dtype))

    def link(self, spans: torch.Tensor, candidates: torch.Tensor, priors: torch.Tensor | None,
             table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(psi (B, M, K) with -inf at invalid candidates, alpha (B, M, K), e~ (B, M, E))`` from
        the contextual spans ``s^e`` (B, M, E), candidate rows (B, M, K) (-1: none) and priors."""
        valid = candidates >= 0                                                    # (B, M, K)
        e = self.entity_norm(table[candidates.clamp_min(0)].to(spans.dtype))       # (B, M, K, E)
        dot = (e @ spans[..., None]).squeeze(-1) / math.sqrt(spans.shape[-1])      # (B, M, K)
        p = torch.zeros_like(dot) if priors is None else priors.to(dot.dtype)
        psi = self.linker(torch.stack([dot, p], -1)).squeeze(-1)                   # (B, M, K)
        psi = _wide(psi).masked_fill(~valid, float("-inf"))
        keep = valid if self.threshold is None else valid & (psi >= self.threshold)
        alpha = masked_softmax(psi.masked_fill(~valid, 0.0), keep)                 # (B, M, K)
        return psi, alpha, (alpha.to(e.dtype)[..., None] * e).sum(-2)              # ..., (B, M, E)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None, span_start: torch.Tensor,
                span_end: torch.Tensor, candidates: torch.Tensor, priors: torch.Tensor | None,
                table: torch.Tensor) -> KAROutput:
        """``h`` (B, L, D), ``attention_mask`` (B, L), spans (B, M), candidates/priors (B, M, K),
        ``table`` (N, E). Padding positions never enter a span (the spans are built inside the text)."""
        has_span = span_start >= 0                                                 # (B, M)
        hp = self.down(h)                                                          # (B, L, E) H^p
        s = self.span_norm(span_pool(hp, self.span_logit(hp).squeeze(-1), span_start, span_end))
        # A sequence without spans still gets one (ignored) key: SDPA gives NaN on a row of no key.
        span_keys = (has_span | ~has_span.any(1, keepdim=True))[:, None, None, :]  # (B, 1, 1, M)
        se = self.span_encoder(s, span_keys)                                       # (B, M, E) S^e
        psi, alpha, e_tilde = self.link(se, candidates, priors, table)
        enhanced = self.enhanced_norm(se + self.dropout(e_tilde))                  # (B, M, E) S'
        hp2 = self.ffn(self.word_to_span(hp, span_keys, context=enhanced))         # (B, L, E) H'^p
        delta = self.dropout(self.up(hp2))                                         # (B, L, D)
        gate = has_span.any(1)[:, None, None].to(h.dtype)                          # (B, 1, 1)
        return KAROutput(h + gate * delta, psi, alpha, enhanced)


# ----------------------------------------------------------------------------------------------
# the model


class KnowBertOutput(NamedTuple):
    hidden: torch.Tensor          # (B, L, D) the top layer
    kar: KAROutput | None         # None when the batch has no span at all


class KnowBert(nn.Module):
    """A BERT-family backbone (copied: the caller's stays as it was) with one KAR after
    ``layers_before`` layers, an MLM head tied to the word embeddings, and a frozen entity table
    (a non-persistent buffer, kept out of checkpoints; the config records its shape)."""

    def __init__(self, backbone: TextBackbone, entities: torch.Tensor,
                 config: KnowBertConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = (config or KnowBertConfig()).resolve(backbone, entities)
        self.encoder = copy.deepcopy(backbone.model)
        eps = self.encoder.config.layer_norm_eps
        self.kar = KAR(cfg, eps)
        self.mlm = MLMHead(self.encoder.get_input_embeddings(), cfg.hidden_size, eps)
        self.register_buffer("entities", entities.detach().clone(), persistent=False)  # (N, E)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The new parts (KAR, MLM head); the encoder keeps the backbone's weights."""
        std = self.config.initializer_range
        self.kar.reset_parameters(std)
        self.mlm.reset_parameters(std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                span_start: torch.Tensor | None = None, span_end: torch.Tensor | None = None,
                candidates: torch.Tensor | None = None, priors: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> KnowBertOutput:
        """``input_ids`` (B, L); spans (B, M) and candidates/priors (B, M, K) as in the module
        docstring (None or M = 0: no span, the backbone exactly)."""
        bert = self.encoder
        h = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)     # (B, L, D)
        mask = backbone_mask(bert.config, h, attention_mask)
        n = self.config.layers_before
        for layer in bert.encoder.layer[:n]:
            h = layer(h, mask)                                                     # (B, L, D)
        kar = None
        if span_start is not None and span_start.numel():
            kar = self.kar(h, attention_mask, span_start, span_end, candidates, priors, self.entities)
            h = kar.hidden
        for layer in bert.encoder.layer[n:]:
            h = layer(h, mask)                                                     # (B, L, D)
        return KnowBertOutput(h, kar)

    def corrupt(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, mlm labels)`` (B, L): BERT's masking (``mlm_prob``, 80/10/10) of the real,
        non-special tokens. Mention wordpieces are masked like any other: the linker then has to
        find the entity from the context, as KnowBERT's pretraining asks of it."""
        attn = batch["attention_mask"].bool()
        maskable = attn & ~batch["special_tokens_mask"].bool()
        return mlm_mask(batch["input_ids"], maskable, self.config.mask_token_id, self.config.vocab_size,
                        generator, prob=self.config.mlm_prob)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
             ) -> dict[str, torch.Tensor]:
        """``{"mlm", "linker", "total"}`` on a batch of :func:`collate` (module docstring)."""
        cfg = self.config
        ids, labels = self.corrupt(batch, generator)
        out = self(ids, batch["attention_mask"], batch["span_start"], batch["span_end"],
                   batch["candidates"], batch["priors"])
        mlm = self.mlm.loss(out.hidden, labels)
        if out.kar is None:
            linker = self.kar.linker[0].weight.sum() * 0.0   # keeps the graph whole (DDP)
        else:
            linker = linker_loss(out.kar.scores, batch["gold"])
        return {"mlm": mlm, "linker": linker, "total": mlm + cfg.linker_weight * linker}

    def __repr__(self) -> str:
        c = self.config
        return summary(self, hidden_size=c.hidden_size, num_layers=c.num_layers,
                       layers_before=c.layers_before, entity_dim=c.entity_dim,
                       entity_heads=c.entity_heads, num_entities=c.num_entities, vocab_size=c.vocab_size)


def linker_loss(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``-log softmax_k(psi_mk)[gold_m]`` averaged over the spans with a gold candidate: ``scores``
    (B, M, K) with -inf at invalid candidates, ``gold`` (B, M) (``IGNORE``: no gold). 0 (in the
    graph) when no span has one."""
    known = gold != IGNORE                                                         # (B, M)
    if not known.any():
        return scores.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
    # A finite floor instead of -inf: cross_entropy over a row with -inf entries is fine, but its
    # gradient at those entries is NaN-free only when they are finite.
    return F.cross_entropy(_wide(scores[known]).clamp_min(-1e4), gold[known])


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass
class SpanCandidates:
    """One mention as the model reads it: its character span, candidate rows and their priors
    (best first), and the position of the gold entity among them (``IGNORE``: not there)."""

    start: int
    end: int
    rows: list[int]
    priors: list[float]
    gold: int = IGNORE


@dataclass
class KnowBertExample:
    input_ids: list[int]
    special_tokens_mask: list[int]
    span_start: list[int]          # (M,) wordpiece positions, end exclusive
    span_end: list[int]
    candidates: list[list[int]]    # (M, K_m)
    priors: list[list[float]]
    gold: list[int]                # (M,)
    counts: dict[str, int] = field(default_factory=dict)


def wordpiece_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """``[first, last + 1)`` of the wordpieces overlapping the characters ``[start, end)``, or None."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (hits[0], hits[-1] + 1) if hits else None


def encode_text(text: str, mentions: Sequence[SpanCandidates], tokenizer: Any, max_length: int,
                max_mentions: int | None = None) -> KnowBertExample:
    """Tokenise ``text`` (truncated, with special tokens) and map each mention to its wordpiece
    span. Counted, never dropped silently: ``spans`` (kept), ``spans_truncated`` (a wordpiece of it
    fell beyond ``max_length``), ``spans_unaligned`` (covers no wordpiece), ``spans_over_limit``
    (beyond ``max_mentions``). ``tokenizer`` must be fast (character offsets)."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    offsets = enc["offset_mapping"]
    covered = max((b for a, b in offsets), default=0)   # the last character the sequence kept
    cut = bool(text[covered:].strip())                   # real text beyond it: truncated
    ex = KnowBertExample(list(enc["input_ids"]), list(enc["special_tokens_mask"]), [], [], [], [], [])
    c = {"spans": 0, "spans_truncated": 0, "spans_unaligned": 0, "spans_over_limit": 0}
    for m in mentions:
        span = wordpiece_span(offsets, m.start, m.end)
        if cut and m.end > covered:   # a mention cut in two would pool half its wordpieces
            c["spans_truncated"] += 1
        elif span is None:
            c["spans_unaligned"] += 1
        elif max_mentions is not None and len(ex.span_start) >= max_mentions:
            c["spans_over_limit"] += 1
        else:
            ex.span_start.append(span[0])
            ex.span_end.append(span[1])
            ex.candidates.append(list(m.rows))
            ex.priors.append([float(p) for p in m.priors])
            ex.gold.append(int(m.gold))
            c["spans"] += 1
    ex.counts = c
    return ex


def collate(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows with :class:`KnowBertExample`'s fields -> the padded batch of the module docstring."""
    B = len(rows)
    L = max((len(r["input_ids"]) for r in rows), default=0)
    M = max((len(r["span_start"]) for r in rows), default=0)
    K = max((len(c) for r in rows for c in r["candidates"]), default=0)
    out = {"input_ids": torch.full((B, L), pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros(B, L, dtype=torch.long),
           "special_tokens_mask": torch.ones(B, L, dtype=torch.long),
           "span_start": torch.full((B, M), -1, dtype=torch.long),
           "span_end": torch.full((B, M), -1, dtype=torch.long),
           "candidates": torch.full((B, M, K), NO_ENTITY, dtype=torch.long),
           "priors": torch.zeros(B, M, K),
           "gold": torch.full((B, M), IGNORE, dtype=torch.long)}
    for b, r in enumerate(rows):
        n, m = len(r["input_ids"]), len(r["span_start"])
        out["input_ids"][b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        out["attention_mask"][b, :n] = 1
        out["special_tokens_mask"][b, :n] = torch.tensor(r["special_tokens_mask"], dtype=torch.long)
        if not m:
            continue
        out["span_start"][b, :m] = torch.tensor(r["span_start"], dtype=torch.long)
        out["span_end"][b, :m] = torch.tensor(r["span_end"], dtype=torch.long)
        out["gold"][b, :m] = torch.tensor(r["gold"], dtype=torch.long)
        for j, (cands, pri) in enumerate(zip(r["candidates"], r["priors"], strict=True)):
            out["candidates"][b, j, :len(cands)] = torch.tensor(list(cands), dtype=torch.long)
            out["priors"][b, j, :len(pri)] = torch.tensor(list(pri), dtype=torch.float)
    return out
