"""SentiLR (SentiLARE): label-aware masked language modelling with part of speech and word polarity.

Ke, Ji, Liu, Zhu & Huang (2020), "SentiLARE: Sentiment-Aware Language Representation Learning with
Linguistic Knowledge", EMNLP (arXiv 1911.02493); the survey names it SentiLR.

Every word carries a part-of-speech tag ``p`` (noun, verb, adjective, adverb, other: the four
classes a sentiment lexicon distinguishes, plus the rest) and a word polarity ``q`` (negative,
neutral, positive); the text carries a sentence-level polarity ``l`` (the same three, or *unknown*).
All three enter as extra input embeddings::

    v_i = W x_i + E_P p_i + E_Q q_i + E_L l          (B, L, D), then BERT's positions, types, LN

Label-aware MLM (LA-MLM) has two sub-tasks; each row takes one, early fusion with probability
``early_fusion_share`` (the paper alternates them), late supervision otherwise::

    early fusion     (l given):   L_EF = L_word + L_pos + L_polarity     at the masked words
    late supervision (l unknown): L_LS = L_sent + L_word + L_pos         L_sent on the [CLS] vector
    L = L_word + L_pos + L_polarity + L_sent                             each averaged over its set

``L_word`` is MLM over every piece of a masked word, ``L_pos`` and ``L_polarity`` cross-entropy
at its first piece (one prediction per word), ``L_sent`` cross-entropy of ``l`` from
``tanh(W h_[CLS])``. A masked or replaced word shows neither its POS nor its polarity (both inputs
become *unknown*), else the label would be read off the input. Words are masked whole (SenseBERT's
:func:`~fusion.models.sensebert.whole_word_mask`), sentiment words (polarity not neutral) at the
higher rate ``sentiment_mask_prob`` and other words at ``mask_prob``: the paper masks sentiment
words more often so that the model must infer them from context.

Knowledge without annotation. The paper matches each word to its SentiWordNet sense in context and
takes the sentence label from review ratings. Here, offline and without ratings:

* word polarity: the VADER lexicon (Hutto & Gilbert 2014), ``vader_lexicon.txt`` inside the
  ``vaderSentiment`` wheel on PyPI (MIT licence), loaded from the package's file path
  (:meth:`PolarityLexicon.from_vader`); a word's polarity is the sign of its mean valence (neutral
  within ``threshold``), one polarity per word form (no sense disambiguation). Words not in the
  lexicon are neutral and counted (``words_not_in_lexicon``).
* sentence polarity: *distant supervision* from the same lexicon, the sign of the summed valences of
  the row's words (neutral within ``margin``). Because it is a function of the word polarities, the
  late-supervision task partly reads the label off visible polarity inputs; it teaches the [CLS]
  vector to aggregate word sentiment, not a rating the text never states.
* part of speech: no tagger is available offline (NLTK's tagger needs a data download), so
  :func:`heuristic_pos` tags by closed-class word lists and suffixes, the rest as nouns. It is
  coarse (``light`` is always a noun); the tagger is a parameter of :func:`encode_sentilr`.

Row layout (:func:`encode_sentilr`): ``input_ids``, ``special_tokens_mask``, ``word_start``
(1 on a word's first piece), ``pos`` and ``polarity`` per piece (the word's; ``UNKNOWN`` on special
tokens), ``sentence_label`` (one int).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fusion.models.heads import MLMHead
from fusion.models.layers import summary
from fusion.models.sensebert import whole_word_mask

POS_TAGS: tuple[str, ...] = ("noun", "verb", "adj", "adv", "other")
POLARITIES: tuple[str, ...] = ("negative", "neutral", "positive")
NEGATIVE, NEUTRAL, POSITIVE = 0, 1, 2
POS_UNKNOWN, POLARITY_UNKNOWN = len(POS_TAGS), len(POLARITIES)   # the extra input row of each table

# ------------------------------------------------------------------------------ part of speech
_OTHER = set("""a an the this that these those some any each every no all both either neither
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
who whom whose which what where when why how there here and or but nor so yet if then than because
although though while whereas unless until as of in on at by for with about against between into
through during before after above below to from up down out off over under again further once
not""".split())
_VERBS = set("""is are was were be been being am has have had having do does did doing can could
will would shall should may might must""".split())
_ADVERBS = set("very too quite rather just also only even still never always often soon".split())
_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ly", "adv"), ("ness", "noun"), ("ment", "noun"), ("tion", "noun"), ("sion", "noun"),
    ("ity", "noun"), ("ous", "adj"), ("ful", "adj"), ("less", "adj"), ("ive", "adj"),
    ("able", "adj"), ("ible", "adj"), ("ical", "adj"), ("ic", "adj"), ("ish", "adj"),
    ("est", "adj"), ("ing", "verb"), ("ed", "verb"), ("ize", "verb"), ("ise", "verb"),
    ("ate", "verb"), ("ify", "verb"))


def heuristic_pos(word: str) -> int:
    """A coarse POS tag index of :data:`POS_TAGS` (module docstring): non-alphabetic words and
    closed-class words are ``other`` (auxiliaries ``verb``), then the first matching suffix of a
    word longer than the suffix plus two letters, else ``noun``."""
    w = word.lower()
    if not w.isalpha() or w in _OTHER:
        return POS_TAGS.index("other")
    if w in _VERBS:
        return POS_TAGS.index("verb")
    if w in _ADVERBS:
        return POS_TAGS.index("adv")
    for suffix, tag in _SUFFIXES:
        if w.endswith(suffix) and len(w) > len(suffix) + 2:
            return POS_TAGS.index(tag)
    return POS_TAGS.index("noun")


# ------------------------------------------------------------------------------ the lexicon
class PolarityLexicon:
    """Word form (lower-cased) -> valence; a word's polarity is its valence's sign (neutral within
    ``threshold``), a missing word's neutral."""

    def __init__(self, valence: Mapping[str, float], threshold: float = 0.0):
        self.valence, self.threshold = dict(valence), threshold

    @classmethod
    def from_file(cls, path: str | Path, threshold: float = 0.0) -> PolarityLexicon:
        """A VADER-format file: ``token<TAB>mean valence<TAB>...`` per line. A malformed line is an
        error naming the file and line."""
        with open(path, encoding="utf-8") as f:
            return cls.from_lines(f, str(path), threshold)

    @classmethod
    def from_lines(cls, lines: Iterable[str], where: str, threshold: float = 0.0) -> PolarityLexicon:
        """:meth:`from_file` on lines already read (``where`` names their file in errors)."""
        valence: dict[str, float] = {}
        for n, line in enumerate(lines, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                valence[parts[0].lower()] = float(parts[1])
            except (IndexError, ValueError):
                raise ValueError(f"{where}:{n}: expected 'token<TAB>valence', got {line[:60]!r}") from None
        if not valence:
            raise ValueError(f"{where}: no lexicon entry")
        return cls(valence, threshold)

    @classmethod
    def from_vader(cls, threshold: float = 0.0) -> PolarityLexicon:
        """VADER's lexicon from the installed ``vaderSentiment`` package (ImportError without it)."""
        import importlib.util

        spec = importlib.util.find_spec("vaderSentiment")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the VADER lexicon needs the vaderSentiment package "
                              "(pip install 'stele[sentiment]')")
        return cls.from_file(Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt",
                             threshold)

    def score(self, word: str) -> float | None:
        return self.valence.get(word.lower())

    def polarity(self, word: str) -> int:
        v = self.score(word)
        if v is None or abs(v) <= self.threshold:
            return NEUTRAL
        return POSITIVE if v > 0 else NEGATIVE

    def __len__(self) -> int:
        return len(self.valence)


def sentence_polarity(valences: list[float], margin: float = 0.0) -> int:
    """Distant supervision: the sign of the summed valences (neutral within ``margin``)."""
    s = sum(valences)
    return NEUTRAL if abs(s) <= margin else POSITIVE if s > 0 else NEGATIVE


class SentiExample(NamedTuple):
    input_ids: list[int]
    special_tokens_mask: list[int]
    word_start: list[int]
    pos: list[int]
    polarity: list[int]
    sentence_label: int
    counts: Counter


def encode_sentilr(text: str, tokenizer: Any, max_length: int, lexicon: PolarityLexicon,
                   margin: float = 0.0, tagger: Callable[[str], int] = heuristic_pos) -> SentiExample:
    """One text -> a SentiLR row (module docstring). Words are the fast tokenizer's pre-tokenised
    words (``word_ids``) within ``max_length``; counts: ``words_positive``, ``words_negative``,
    ``words_neutral`` (in the lexicon, within the threshold), ``words_not_in_lexicon`` (neutral),
    ``pos:<tag>`` and ``sentence_<polarity>``."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    counts: Counter = Counter()
    starts, pos, pol, valences = [], [], [], []
    prev, p, q = None, POS_UNKNOWN, POLARITY_UNKNOWN
    for w in enc.word_ids(0):
        if w is None:
            starts.append(0)
            pos.append(POS_UNKNOWN)
            pol.append(POLARITY_UNKNOWN)
            prev = None
            continue
        if w != prev:
            a, e = enc.word_to_chars(0, w)
            word = text[a:e]
            v = lexicon.score(word)
            p, q = tagger(word), lexicon.polarity(word)
            if v is None:
                counts["words_not_in_lexicon"] += 1
            else:
                valences.append(v)
                counts[f"words_{POLARITIES[q]}"] += 1
            counts[f"pos:{POS_TAGS[p]}"] += 1
        starts.append(int(w != prev))
        pos.append(p)
        pol.append(q)
        prev = w
    label = sentence_polarity(valences, margin)
    counts[f"sentence_{POLARITIES[label]}"] += 1
    return SentiExample(list(enc["input_ids"]), list(enc["special_tokens_mask"]), starts, pos, pol,
                        label, counts)


# ----------------------------------------------------------------------------------- the model
@dataclass
class SentiLrConfig:
    mask_prob: float = 0.15            # words without polarity
    sentiment_mask_prob: float = 0.3   # words with a polarity: masked more often
    early_fusion_share: float = 0.5    # rows given their sentence label (the rest predict it)
    pos_weight: float = 1.0
    polarity_weight: float = 1.0
    sentence_weight: float = 1.0
    initializer_range: float | None = None  # None: the backbone's


class LabelAwareMask(NamedTuple):
    input_ids: torch.Tensor   # (B, L) corrupted
    labels: torch.Tensor      # (B, L) MLM labels (IGNORE where not chosen)
    chosen: torch.Tensor      # (B, L) bool
    changed: torch.Tensor     # (B, L) bool: masked or replaced
    early: torch.Tensor       # (B,) bool: early fusion (sentence label given)


def label_aware_mask(batch: dict[str, Any], cfg: SentiLrConfig, mask_token_id: int, vocab_size: int,
                     generator: torch.Generator | None = None) -> LabelAwareMask:
    """Whole-word masking with one rate for sentiment words and one for the others, and each row's
    sub-task (early fusion with probability ``cfg.early_fusion_share``)."""
    sentiment = (batch["polarity"] != NEUTRAL) & (batch["polarity"] != POLARITY_UNKNOWN)   # (B, L)
    # whole_word_mask compares its draws with ``prob`` elementwise: a (B, L) rate per word start
    prob = torch.where(sentiment, cfg.sentiment_mask_prob, cfg.mask_prob)                 # (B, L)
    wm = whole_word_mask(batch["input_ids"], batch["word_start"], batch["maskable"], mask_token_id,
                         vocab_size, generator, prob=prob)
    early = torch.rand(len(batch["input_ids"]), generator=generator,
                       device=batch["input_ids"].device) < cfg.early_fusion_share
    return LabelAwareMask(wm.input_ids, wm.labels, wm.chosen, wm.changed, early)


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32; an empty set gives a zero that keeps the graph whole (DDP)."""
    return nn.functional.cross_entropy(logits.float(), target) if len(target) else logits.sum() * 0.0


class SentiLr(nn.Module):
    """A BERT-family backbone with SentiLR's POS, word-polarity and sentence-polarity input
    embeddings and its word (MLM), POS, polarity and sentence heads.

    ``loss(batch, generator)`` takes ``input_ids``, ``attention_mask``, ``maskable``,
    ``word_start``, ``pos``, ``polarity`` (B, L) and ``sentence_label`` (B,) and returns
    ``{"mlm", "pos", "polarity", "sentence", "total"}``."""

    def __init__(self, backbone: Any, config: SentiLrConfig | None = None):
        super().__init__()
        self.config = cfg = config or SentiLrConfig()
        self.encoder, bc = backbone.model, backbone.model.config
        self.mask_token_id, self.vocab_size = backbone.tokenizer.mask_token_id, bc.vocab_size
        if self.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; MLM needs one")
        D = bc.hidden_size
        self.std = bc.initializer_range if cfg.initializer_range is None else cfg.initializer_range
        self.pos_embeddings = nn.Embedding(len(POS_TAGS) + 1, D)                 # E_P, + unknown
        self.polarity_embeddings = nn.Embedding(len(POLARITIES) + 1, D)          # E_Q, + unknown
        self.sentence_embeddings = nn.Embedding(len(POLARITIES) + 1, D)          # E_L, + unknown
        self.mlm = MLMHead(self.encoder.get_input_embeddings(), D, bc.layer_norm_eps)
        self.pos_head = nn.Linear(D, len(POS_TAGS))
        self.polarity_head = nn.Linear(D, len(POLARITIES))
        self.sentence_pool = nn.Linear(D, D)
        self.sentence_head = nn.Linear(D, len(POLARITIES))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The new parts only (the backbone keeps its weights): BERT's initialisation."""
        for emb in (self.pos_embeddings, self.polarity_embeddings, self.sentence_embeddings):
            nn.init.normal_(emb.weight, std=self.std)
        for lin in (self.mlm.dense, self.pos_head, self.polarity_head, self.sentence_pool,
                    self.sentence_head):
            nn.init.normal_(lin.weight, std=self.std)
            nn.init.zeros_(lin.bias)
        self.mlm.norm.reset_parameters()
        nn.init.zeros_(self.mlm.bias)

    def embed(self, input_ids: torch.Tensor, pos: torch.Tensor, polarity: torch.Tensor,
              sentence_label: torch.Tensor) -> torch.Tensor:
        """``W x + E_P p + E_Q q + E_L l`` (B, L, D); ``sentence_label`` (B,) is added to every
        position (``POLARITY_UNKNOWN``: not given)."""
        x = self.encoder.get_input_embeddings()(input_ids)                            # (B, L, D)
        x = x + self.pos_embeddings(pos) + self.polarity_embeddings(polarity)         # (B, L, D)
        return x + self.sentence_embeddings(sentence_label)[:, None]                  # (B, L, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pos: torch.Tensor,
                polarity: torch.Tensor, sentence_label: torch.Tensor | None = None) -> torch.Tensor:
        """Contextual vectors (B, L, D); no ``sentence_label``: unknown (as in fine-tuning)."""
        if sentence_label is None:
            sentence_label = torch.full((len(input_ids),), POLARITY_UNKNOWN, device=input_ids.device)
        x = self.embed(input_ids, pos, polarity, sentence_label)
        return self.encoder(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state

    def sentence_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """[CLS] vectors (N, D) -> (N, 3)."""
        return self.sentence_head(torch.tanh(self.sentence_pool(cls)))

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        m = label_aware_mask(batch, cfg, self.mask_token_id, self.vocab_size, generator)
        pos_in = batch["pos"].masked_fill(m.changed, POS_UNKNOWN)
        pol_in = batch["polarity"].masked_fill(m.changed, POLARITY_UNKNOWN)
        sent_in = batch["sentence_label"].masked_fill(~m.early, POLARITY_UNKNOWN)         # (B,)
        hidden = self(m.input_ids, batch["attention_mask"], pos_in, pol_in, sent_in)     # (B, L, D)
        mlm = self.mlm.loss(hidden, m.labels)
        words = m.chosen & batch["word_start"].bool()                                    # (B, L)
        pos = _ce(self.pos_head(hidden[words]), batch["pos"][words])
        at = words & m.early[:, None]
        polarity = _ce(self.polarity_head(hidden[at]), batch["polarity"][at])
        late = ~m.early
        sentence = _ce(self.sentence_logits(hidden[late, 0]), batch["sentence_label"][late])
        total = (mlm + cfg.pos_weight * pos + cfg.polarity_weight * polarity
                 + cfg.sentence_weight * sentence)
        return {"mlm": mlm, "pos": pos, "polarity": polarity, "sentence": sentence, "total": total}

    def __repr__(self) -> str:
        return summary(self, hidden_size=self.encoder.config.hidden_size,
                       pos_tags=len(POS_TAGS), polarities=len(POLARITIES),
                       sentiment_mask_prob=self.config.sentiment_mask_prob)

