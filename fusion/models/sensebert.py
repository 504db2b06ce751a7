"""SenseBERT: masked-word supersense prediction beside masked language modelling.

Levine, Lenz, Dagan, Ram, Padnos, Sharir, Shalev-Shwartz, Shashua & Shoham (2020), "SenseBERT:
Driving Some Sense into BERT", ACL (arXiv 1908.05646).

Supersenses are WordNet's 45 lexicographer files (lexnames: 26 noun, 15 verb, 3 adjective, 1 adverb
class, e.g. ``noun.animal``, ``verb.motion``). No sense-annotated text is needed: WordNet gives each
word form w the set A(w) of supersenses of all its synsets, and the model is trained to put its
probability mass on that set::

    p(s | context) = softmax_s( W_S^T T(h) + b_S )            h: the masked word's output (B, L, D)
    L_SLM^allowed  = -log sum_{s in A(w)} p(s | context)       (the paper's "allowed senses" loss)
    L_SLM^reg      = -1/|A(w)| sum_{s in A(w)} log p(s | context)
    L              = L_MLM + L_SLM^allowed + lambda * L_SLM^reg      (paper: lambda = 1)

The regulariser spreads mass over the allowed set instead of letting the model pick one member
arbitrarily (for a word with one supersense both terms are the plain cross-entropy). ``T`` is a
transform (dense, GELU, LayerNorm) as in BERT's MLM head, and ``W_S`` (S, D) is the supersense
embedding matrix, shared by the output and the input (the paper's sense-aware input): every word of the input
adds the sum of its allowed supersenses' embeddings to its word embedding,
``v = W x + W_S^T M x + p`` (M: word -> allowed supersenses, binary), so a masked word (the
[MASK] token has no senses) gets none.

Words and wordpieces. SenseBERT treats a word as one input unit (its vocabulary was enlarged so
most words are one token; rare words averaged their pieces into one position). On a wordpiece
backbone this file keeps that unit by *whole-word masking*: a word is chosen with probability
``mask_prob`` and then all its pieces are masked together (80%), replaced by random tokens (10%)
or kept (10%), MLM labelling every piece. The supersense label sits on the word's *first* piece
only: one prediction per word, as in the paper, so a long word does not weigh more than a short
one, and because the whole word is hidden no visible piece gives the word away. The input sense
embedding is added to every piece of a visible word (each piece stands for the word).

Lookup. A(w) is the union over the four parts of speech of the supersenses of the lemmas WordNet's
morphology (morphy's detachment rules, wnmorph(7WN)) maps w to, lower-cased, as NLTK's
``wordnet.synsets(w)`` finds them minus the exception lists (``children`` -> ``child``), which a
``knowledge.ingest`` artifact does not hold. Words without any supersense (``the``, names,
punctuation) get MLM only and are counted by the recipe.

Left out: next-sentence prediction (stele's other encoders leave it out too: RoBERTa showed it
does not help); the paper's enlarged vocabulary (the backbone's tokenizer is used as it is).

Row layout (:func:`encode_senses`): ``input_ids``, ``special_tokens_mask``, ``word_start`` (1 on a
word's first piece) and ``senses`` (per piece, the word's allowed set as a bit mask, bit s =
supersense s of :data:`SUPERSENSES`; 0: none).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.heads import MLMHead
from fusion.models.layers import summary
from fusion.models.objectives import IGNORE

# WordNet's lexnames file, in its order (lex_filenum 0..44): bit s of a sense mask is SUPERSENSES[s].
SUPERSENSES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl")
SENSE_INDEX = {name: i for i, name in enumerate(SUPERSENSES)}

# morphy's detachment rules (wnmorph(7WN)): (suffix, ending) per part of speech, applied once.
DETACH: dict[str, tuple[tuple[str, str], ...]] = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
             ("men", "man"), ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
             ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}


def sense_bits(names: Iterable[str]) -> int:
    """The bit mask of supersense names (unknown names are ignored)."""
    out = 0
    for n in names:
        if n in SENSE_INDEX:
            out |= 1 << SENSE_INDEX[n]
    return out


def bits_to_multi_hot(bits: torch.Tensor, num: int = len(SUPERSENSES)) -> torch.Tensor:
    """Integer bit masks (...) -> bool (..., num): bit s set <=> supersense s allowed."""
    shifts = torch.arange(num, device=bits.device)
    return ((bits.long().unsqueeze(-1) >> shifts) & 1).bool()


# ----------------------------------------------------------------------------------- the lexicon
class SenseLexicon:
    """``(lemma, part of speech) -> allowed supersenses`` (a bit mask), and the lookup of a word."""

    def __init__(self, table: dict[tuple[str, str], int]):
        self.table = table

    @classmethod
    def from_synsets(cls, synsets: Iterable[tuple[Sequence[str], Sequence[str]]]
                     ) -> tuple[SenseLexicon, Counter]:
        """From ``(lemmas, types)`` per synset (a ``knowledge.ingest`` entity's name + aliases
        and types): each single-word lemma gets the supersense among ``types``. Counted:
        synsets with a supersense, entities without one (another source's entities in a merged
        KG), multi-word lemmas (``hot dog``: one word at a time is looked up, so never matched)."""
        table: dict[tuple[str, str], int] = {}
        counts: Counter = Counter()
        for lemmas, types in synsets:
            sense = next((t for t in types if t in SENSE_INDEX), None)
            if sense is None:
                counts["entities_without_supersense"] += 1
                continue
            counts["synsets_with_supersense"] += 1
            pos, bit = sense.split(".")[0], 1 << SENSE_INDEX[sense]
            for lemma in lemmas:
                lemma = lemma.lower().replace("_", " ")
                if " " in lemma or "-" in lemma:
                    counts["lemmas_multiword"] += 1
                    continue
                table[(lemma, pos)] = table.get((lemma, pos), 0) | bit
        counts["lexicon_lemmas"] = len({lemma for lemma, _ in table})
        return cls(table), counts

    def allowed(self, word: str) -> int:
        """A(w) as a bit mask: the word's own form and its morphy base forms, per part of speech."""
        w = word.lower()
        out = 0
        for pos, rules in DETACH.items():
            out |= self.table.get((w, pos), 0)
            for suffix, ending in rules:
                if w.endswith(suffix) and len(w) > len(suffix):
                    out |= self.table.get((w[: -len(suffix)] + ending, pos), 0)
        return out

    def __len__(self) -> int:
        return len(self.table)


class SenseExample(NamedTuple):
    input_ids: list[int]
    special_tokens_mask: list[int]
    word_start: list[int]
    senses: list[int]
    counts: Counter


def piece_senses(enc: Any, b: int, text: str, lexicon: SenseLexicon, counts: Counter | None = None
                 ) -> tuple[list[int], list[int]]:
    """``(word_start, senses)`` per token of sequence ``b`` of a fast tokenizer's encoding of
    ``text`` (padded or not): words are its pre-tokenised words (``word_ids``); special tokens and
    padding are no word. ``counts`` (if given) gets ``words_with_supersense``,
    ``words_without_supersense`` (alphabetic, no WordNet sense) and ``words_not_alphabetic``
    (numbers, punctuation: never looked up)."""
    starts, senses = [], []
    prev, bits = None, 0
    for w in enc.word_ids(b):
        if w is None:
            starts.append(0)
            senses.append(0)
            prev = None
            continue
        if w != prev:
            a, e = enc.word_to_chars(b, w)
            word = text[a:e]
            bits = lexicon.allowed(word) if word.isalpha() else 0
            if counts is not None:
                counts["words_with_supersense" if bits else "words_without_supersense"
                       if word.isalpha() else "words_not_alphabetic"] += 1
        starts.append(int(w != prev))
        senses.append(bits)
        prev = w
    return starts, senses


def encode_senses(text: str, tokenizer: Any, max_length: int, lexicon: SenseLexicon) -> SenseExample:
    """One text -> a SenseBERT row (see the module docstring), with the counts of
    :func:`piece_senses`."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    counts: Counter = Counter()
    starts, senses = piece_senses(enc, 0, text, lexicon, counts)
    return SenseExample(list(enc["input_ids"]), list(enc["special_tokens_mask"]), starts, senses,
                        counts)


# ----------------------------------------------------------------------------------- masking
class WordMask(NamedTuple):
    input_ids: torch.Tensor   # (B, L) corrupted ids
    labels: torch.Tensor      # (B, L) original ids at chosen pieces, IGNORE elsewhere
    chosen: torch.Tensor      # (B, L) bool: the piece belongs to a chosen word
    changed: torch.Tensor     # (B, L) bool: chosen and masked or replaced (not kept)


def whole_word_mask(input_ids: torch.Tensor, word_start: torch.Tensor, maskable: torch.Tensor,
                    mask_token_id: int, vocab_size: int, generator: torch.Generator | None = None,
                    prob: float = 0.15, mask_share: float = 0.8, random_share: float = 0.1
                    ) -> WordMask:
    """BERT's 80/10/10 masking with the *word* as the unit: each maskable word (``word_start``
    (B, L) marks its first piece) is chosen with probability ``prob``; a chosen word has all its
    pieces masked (``mask_share``), all replaced by random tokens (``random_share``) or all kept.
    A piece belongs to the latest word start at or before it; ``maskable`` (B, L) excludes special
    tokens and padding."""
    B, L = input_ids.shape
    dev = input_ids.device
    starts = word_start.bool() & maskable.bool()
    pos = torch.arange(L, device=dev).expand(B, L)
    owner = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values   # (B, L)
    u = torch.rand((B, L), generator=generator, device=dev)
    branch = torch.rand((B, L), generator=generator, device=dev)
    random_ids = torch.randint(vocab_size, (B, L), generator=generator, device=dev)
    chosen = ((u < prob) & starts).gather(1, owner) & maskable.bool()                   # (B, L)
    branch = branch.gather(1, owner)
    to_mask = chosen & (branch < mask_share)
    to_random = chosen & (branch >= mask_share) & (branch < mask_share + random_share)
    ids = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    ids = torch.where(to_random, random_ids, ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return WordMask(ids, labels, chosen, to_mask | to_random)


# ------------------------------------------------------------------------------------ the loss
def supersense_loss(logits: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_allowed, L_reg)`` averaged over N masked words: ``logits`` (N, S), ``allowed`` (N, S)
    bool, each row with at least one allowed supersense (module docstring: the allowed-senses
    loss and the regulariser)."""
    logp = F.log_softmax(logits.float(), dim=-1)                                      # (N, S)
    if not len(logp):
        zero = logits.sum() * 0.0  # keeps the graph connected for DDP
        return zero, zero
    allowed_term = -torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), dim=-1)  # (N,)
    reg = -(logp * allowed).sum(-1) / allowed.sum(-1)                                 # (N,)
    return allowed_term.mean(), reg.mean()


# ----------------------------------------------------------------------------------- the model
@dataclass
class SenseBertConfig:
    num_supersenses: int = len(SUPERSENSES)
    sense_input: bool = True          # add the allowed supersenses' embeddings to the input
    mask_prob: float = 0.15           # words chosen for MLM (and supersense prediction)
    regularizer_weight: float = 1.0   # lambda; the paper adds the regulariser with weight 1
    initializer_range: float | None = None  # None: the backbone's


class SenseBert(nn.Module):
    """A BERT-family backbone with SenseBERT's supersense embeddings, MLM head and supersense head.

    ``loss(batch, generator)`` takes ``input_ids``, ``attention_mask``, ``maskable``,
    ``word_start`` and ``senses`` (all (B, L), from the recipe's collate) and returns
    ``{"mlm", "slm", "slm_reg", "total"}``; a batch whose chosen words have no supersense gives
    ``slm = slm_reg = 0`` (MLM alone)."""

    def __init__(self, backbone: Any, config: SenseBertConfig | None = None):
        super().__init__()
        self.config = cfg = config or SenseBertConfig()
        self.encoder = backbone.model
        bc = backbone.model.config
        self.mask_token_id = backbone.tokenizer.mask_token_id
        if self.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; MLM needs one")
        self.vocab_size = bc.vocab_size
        words = self.encoder.get_input_embeddings()
        self.sense_embeddings = nn.Embedding(cfg.num_supersenses, bc.hidden_size)   # W_S (S, D)
        self.mlm = MLMHead(words, bc.hidden_size, bc.layer_norm_eps)
        self.sense_head = MLMHead(self.sense_embeddings, bc.hidden_size, bc.layer_norm_eps)  # tied W_S
        self.std = bc.initializer_range if cfg.initializer_range is None else cfg.initializer_range
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The new parts only (the backbone keeps its weights): BERT's initialisation."""
        nn.init.normal_(self.sense_embeddings.weight, std=self.std)
        for head in (self.mlm, self.sense_head):
            head.reset_parameters(self.std)

    def embed(self, input_ids: torch.Tensor, senses: torch.Tensor) -> torch.Tensor:
        """``W x + W_S^T M x`` (B, L, D): word embeddings plus the sum of each piece's allowed
        supersense embeddings (``senses`` (B, L) bit masks; 0 adds nothing). BERT's embedding
        layer adds positions and token types and normalises."""
        x = self.encoder.get_input_embeddings()(input_ids)                           # (B, L, D)
        if not self.config.sense_input:
            return x
        m = bits_to_multi_hot(senses, self.config.num_supersenses).to(x.dtype)       # (B, L, S)
        return x + m @ self.sense_embeddings.weight                                  # (B, L, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                senses: torch.Tensor) -> torch.Tensor:
        """Contextual vectors (B, L, D) of an (already masked) input."""
        x = self.embed(input_ids, senses)
        return self.encoder(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state

    def supersense_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, S)."""
        return self.sense_head(hidden)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        wm = whole_word_mask(batch["input_ids"], batch["word_start"], batch["maskable"],
                             self.mask_token_id, self.vocab_size, generator, prob=cfg.mask_prob)
        # A masked or replaced word shows no senses (the paper: [MASK] has none); a kept one does.
        senses = batch["senses"].masked_fill(wm.changed, 0)
        hidden = self(wm.input_ids, batch["attention_mask"], senses)                 # (B, L, D)
        mlm = self.mlm.loss(hidden, wm.labels)
        at = wm.chosen & batch["word_start"].bool() & (batch["senses"] != 0)          # (B, L)
        allowed = bits_to_multi_hot(batch["senses"][at], cfg.num_supersenses)        # (N, S)
        slm, reg = supersense_loss(self.supersense_logits(hidden[at]), allowed)
        total = mlm + slm + cfg.regularizer_weight * reg
        return {"mlm": mlm, "slm": slm, "slm_reg": reg, "total": total}

    def __repr__(self) -> str:
        return summary(self, hidden_size=self.encoder.config.hidden_size,
                       num_supersenses=self.config.num_supersenses,
                       sense_input=self.config.sense_input)
