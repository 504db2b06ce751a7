"""Dictionary entity linking: find the KG's entity names in text, with exact character offsets.

ERNIE (Zhang et al., 2019, ACL) aligns the first wordpiece of each entity mention with that entity's
KG embedding; its mentions came from TAGME (Ferragina & Scaglione, 2010), an anchor-text linker over
Wikipedia. stele's graphs have no anchor statistics, so this is the dictionary equivalent: every
entity's name and aliases in one Aho-Corasick automaton (pyahocorasick), matched in one pass, giving
``(start, end, surface, entity_idx, entity_id, score, n_candidates)`` per mention. Offsets index the
ORIGINAL ``str``, so a tokenizer's ``return_offsets_mapping`` lines wordpieces up with entities.

* **Normalisation** (NFKC, case folding, typographic apostrophes to ``'``, whitespace runs to one
  space) of names and text alike, so "CÔTE  D’IVOIRE" finds "Côte d'Ivoire"; :class:`Normalized`
  maps offsets back, as normalising changes lengths ("ﬁ" -> "fi") and one wrong offset would
  misalign every later wordpiece.
* **Word boundaries**: no match begins or ends inside a word ("Paris" not in "Parisian"), except on
  a side where the name has a non-word character ("C++"). So space-delimited scripts only: in
  Chinese, Japanese or Thai a name inside a run of word characters never matches.
* **Leftmost-longest, non-overlapping** among the boundary-respecting matches: the longer name is the
  more specific ("New York City" is not "New York" + "City"), and a character aligns with one
  embedding in ERNIE's fusion layer. Boundaries are checked first, so "New York" still links in
  "New York Cityscape" (pyahocorasick's ``iter_long`` would commit to the longest key before).
* **Noise control**: surfaces shorter than ``min_length`` or on a stop list ("a", "I" and "in" are
  WordNet lemmas) never enter the automaton.
* **Ambiguity** is resolved by a prior, as TAGME does by "commonness": ``prior="degree"`` weights a
  candidate by ``1 + its degree in the train triples`` (well-connected entities are the common senses
  and the best-trained embeddings; valid/test triples stay out so nothing leaks from evaluation).
  ``score`` is the chosen entity's prior among its ``n_candidates``, so a consumer can drop ambiguous
  links without re-linking. No context is used (TAGME also votes with the other mentions); a later
  step can re-rank :meth:`Gazetteer.candidates`.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import ahocorasick
import numpy as np

if TYPE_CHECKING:
    from .kg import KnowledgeGraph

Prior = Literal["degree", "uniform"]

# Function words that are also WordNet lemmas or common aliases ("a" = ampere, "in" = inch, "i" = iodine,
# "it", "as" = arsenic, "be" = beryllium, "he" = helium, ...). Only a whole surface equal to one of these
# is dropped; "The Hague" still links.
ENGLISH_STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
nor not now of off on once only or other our ours ourselves out over own same she should so some such
than that the their theirs them themselves then there these they this those through to too under until
up very was we were what when where which while who whom why will with would you your yours yourself
yourselves one two may might must shall us
""".split())

# Typographic apostrophes -> ASCII, so "Côte d’Ivoire" in text finds "Côte d'Ivoire" in the KG.
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'"})
# What needs the slow path: whitespace runs to collapse (2+ chars, or one that is not " "), and
# non-ASCII characters (NFKC/case folding may change their length). ASCII letters are lowered in bulk.
_SPECIAL = re.compile(r"\s{2,}|[^\S ]|[^\x00-\x7f\s]+")


def is_word_char(c: str) -> bool:
    """Python ``re``'s ``\\w`` for ``str``: letters, digits (any script) and underscore."""
    return c.isalnum() or c == "_"


class Mention(NamedTuple):
    start: int          # character offsets into the original text, end exclusive
    end: int
    surface: str        # text[start:end]
    entity_idx: int
    entity_id: str
    score: float        # prior probability of entity_idx among the candidates of this surface
    n_candidates: int


@dataclass
class Normalized:
    """A normalised text and the map from its offsets back to the original's.

    The map is piecewise: segment ``i`` covers normalised ``[norm[i], norm[i+1])`` and original
    ``[orig[i], orig[i] + olen[i])``; a ``linear`` segment maps character for character, any other
    (a collapsed whitespace run, an expanded ligature) maps as a whole. ``norm is None`` means the
    identity map (the common case of ASCII text with single spaces costs nothing).
    """

    text: str
    norm: list[int] | None = None
    orig: list[int] = field(default_factory=list)
    olen: list[int] = field(default_factory=list)
    linear: list[bool] = field(default_factory=list)

    def span(self, a: int, b: int) -> tuple[int, int]:
        """Original ``(start, end)`` of the normalised span ``[a, b)`` (``b > a``)."""
        if self.norm is None:
            return a, b
        i = bisect_right(self.norm, a) - 1
        start = self.orig[i] + (a - self.norm[i] if self.linear[i] else 0)
        j = bisect_right(self.norm, b - 1) - 1
        end = (self.orig[j] + (b - self.norm[j]) if self.linear[j]
               else self.orig[j] + self.olen[j])
        return start, end


class _Builder:
    """Accumulates normalised pieces and their segments, merging adjacent linear ones."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0
        self.norm: list[int] = []
        self.orig: list[int] = []
        self.olen: list[int] = []
        self.linear: list[bool] = []

    def add(self, piece: str, orig_start: int, orig_len: int, linear: bool) -> None:
        if not piece:
            return
        if (linear and self.linear and self.linear[-1]
                and self.orig[-1] + self.olen[-1] == orig_start):
            self.olen[-1] += orig_len  # contiguous linear run: extend instead of a new segment
        else:
            self.norm.append(self.n)
            self.orig.append(orig_start)
            self.olen.append(orig_len)
            self.linear.append(linear)
        self.parts.append(piece)
        self.n += len(piece)


def _fold_unit(u: str, lowercase: bool, fold_quotes: bool) -> str:
    n = unicodedata.normalize("NFKC", u)
    if lowercase:
        # casefold can leave non-NFKC output (e.g. for some Greek), hence NFKC again (= NFKC_Casefold).
        n = unicodedata.normalize("NFKC", n.casefold())
    return n.translate(_QUOTES) if fold_quotes else n


def normalize(text: str, *, lowercase: bool = True, fold_quotes: bool = True) -> Normalized:
    """NFKC, optional case folding and apostrophe folding, whitespace runs -> one space; with the
    offset map back to ``text`` (see :class:`Normalized`)."""
    if text.isascii() and _SPECIAL.search(text) is None:
        return Normalized(text.lower() if lowercase else text)
    b = _Builder()
    pos = 0
    for m in _SPECIAL.finditer(text):
        s, e = m.start(), m.end()
        first = text[s]
        if first.isspace():
            if s > pos:
                piece = text[pos:s]
                b.add(piece.lower() if lowercase else piece, pos, s - pos, True)
            b.add(" ", s, e - s, e - s == 1)
            pos = e
            continue
        # Non-ASCII run. A combining mark belongs with the base character before it (which may be an
        # ASCII letter from the preceding plain piece): NFKC composes "e" + U+0301 into "é".
        if unicodedata.combining(first) and s > pos:
            s -= 1
        if s > pos:
            piece = text[pos:s]
            b.add(piece.lower() if lowercase else piece, pos, s - pos, True)
        i = s
        while i < e:
            j = i + 1
            while j < e and unicodedata.combining(text[j]):
                j += 1
            unit = text[i:j]
            out = _fold_unit(unit, lowercase, fold_quotes)
            b.add(out, i, j - i, len(out) == j - i)
            i = j
        pos = e
    if pos < len(text):
        piece = text[pos:]
        b.add(piece.lower() if lowercase else piece, pos, len(text) - pos, True)
    return Normalized("".join(b.parts), b.norm, b.orig, b.olen, b.linear)


def normalize_name(name: str, *, lowercase: bool = True, fold_quotes: bool = True) -> str:
    """A gazetteer key: the same normalisation as the text, without surrounding spaces."""
    return normalize(name, lowercase=lowercase, fold_quotes=fold_quotes).text.strip()


@dataclass
class _Surface:
    key: str
    candidates: list[int]           # entity indices
    probs: list[float]              # prior of each candidate (sums to 1)
    best: int                       # position in candidates of the chosen entity


class Gazetteer:
    """Entity names and aliases in an Aho-Corasick automaton; :meth:`link` finds them in text.

    Build it with :meth:`from_kg` (names, aliases and train-split degrees of a KnowledgeGraph) or
    :meth:`from_names`. See the module docstring for the matching rules.
    """

    def __init__(self, entries: Iterable[tuple[int, str, str, Iterable[str]]], *,
                 degree: np.ndarray | None = None, prior: Prior = "degree", min_length: int = 3,
                 stopwords: Iterable[str] | None = ENGLISH_STOPWORDS, lowercase: bool = True,
                 fold_quotes: bool = True, max_candidates: int | None = None):
        """``entries``: ``(idx, id, name, aliases)`` per entity. ``degree``: per-entity weight source for
        ``prior="degree"`` (indexed by idx; missing means 0). ``stopwords``: surfaces never linked
        (compared after normalisation); ``None`` for none. ``max_candidates``: surfaces naming more
        entities than this are left out as hopelessly ambiguous. ``prior``: ``"degree"`` weighs a
        surface's candidates by ``1 + degree`` (add-one, so entities without train edges keep a
        chance), ``"uniform"`` alike; ties go to the entity whose primary name the surface is, then
        to the lower index."""
        if prior not in ("degree", "uniform"):
            raise ValueError(f"prior must be 'degree' or 'uniform', got {prior!r}")
        if min_length < 1:
            raise ValueError(f"min_length must be >= 1, got {min_length}")
        self.prior, self.min_length = prior, min_length
        self.lowercase, self.fold_quotes = lowercase, fold_quotes
        norm = lambda s: normalize_name(s, lowercase=lowercase, fold_quotes=fold_quotes)  # noqa: E731
        stop = {norm(w) for w in stopwords} if stopwords is not None else set()
        self.entity_ids: dict[int, str] = {}
        # surface -> {entity idx: True if the surface is that entity's primary name}
        by_surface: dict[str, dict[int, bool]] = {}
        self.stats = {"entities": 0, "names": 0, "dropped_empty": 0, "dropped_short": 0,
                      "dropped_stopword": 0, "dropped_too_ambiguous": 0}
        for idx, eid, name, aliases in entries:
            idx = int(idx)
            self.entity_ids[idx] = eid
            self.stats["entities"] += 1
            for k, raw in enumerate([name, *(aliases or ())]):
                if raw is None:
                    continue
                self.stats["names"] += 1
                key = norm(raw)
                if not key:
                    self.stats["dropped_empty"] += 1
                elif len(key) < min_length:
                    self.stats["dropped_short"] += 1
                elif key in stop:
                    self.stats["dropped_stopword"] += 1
                else:
                    cands = by_surface.setdefault(key, {})
                    cands[idx] = cands.get(idx, False) or k == 0

        weights = None if degree is None else np.asarray(degree, dtype=np.float64)
        self.surfaces: list[_Surface] = []
        self.automaton = ahocorasick.Automaton()
        for key, cands in by_surface.items():
            if max_candidates is not None and len(cands) > max_candidates:
                self.stats["dropped_too_ambiguous"] += 1
                continue
            idxs = sorted(cands)
            if prior == "degree":
                w = np.array([1.0 + (weights[i] if weights is not None and i < len(weights) else 0.0)
                              for i in idxs])
            else:
                w = np.ones(len(idxs))
            probs = (w / w.sum()).tolist()
            # Highest prior; then the entity whose primary name this is; then the lowest index.
            best = max(range(len(idxs)), key=lambda j: (probs[j], cands[idxs[j]], -idxs[j]))
            self.automaton.add_word(key, (len(self.surfaces), len(key)))
            self.surfaces.append(_Surface(key, idxs, probs, best))
        if self.surfaces:
            self.automaton.make_automaton()
        self.stats["surfaces"] = len(self.surfaces)
        self.stats["ambiguous_surfaces"] = sum(len(s.candidates) > 1 for s in self.surfaces)
        self._by_key = {s.key: s for s in self.surfaces}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_kg(cls, kg: "KnowledgeGraph", **kw) -> "Gazetteer":
        """Names and aliases of every entity; degrees from the train split (see the module docstring)."""
        ents = kg.entities
        degree = np.zeros(kg.num_entities, dtype=np.int64)
        train = kg.split_array("train")
        if len(train):
            degree += np.bincount(train[:, 0], minlength=kg.num_entities)[:kg.num_entities]
            degree += np.bincount(train[:, 2], minlength=kg.num_entities)[:kg.num_entities]
        entries = zip(ents["idx"].to_pylist(), ents["id"].to_pylist(), ents["name"].to_pylist(),
                      ents["aliases"].to_pylist())
        return cls(entries, degree=degree, **kw)

    @classmethod
    def from_names(cls, names: Iterable[str], ids: Iterable[str] | None = None, **kw) -> "Gazetteer":
        """One entity per name, indexed in order (e.g. Wikipedia titles); ``ids`` default to names."""
        names = list(names)
        ids = list(ids) if ids is not None else names
        kw.setdefault("prior", "uniform")
        return cls(((i, e, n, ()) for i, (e, n) in enumerate(zip(ids, names))), **kw)

    # -- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.surfaces)

    def candidates(self, surface: str) -> list[tuple[int, str, float]]:
        """``(entity idx, entity id, prior)`` for a surface form, best first; [] when not in the
        gazetteer."""
        s = self._by_key.get(normalize_name(surface, lowercase=self.lowercase,
                                            fold_quotes=self.fold_quotes))
        if s is None:
            return []
        order = sorted(range(len(s.candidates)), key=lambda j: j != s.best)
        return [(s.candidates[j], self.entity_ids[s.candidates[j]], s.probs[j]) for j in order]

    def matches(self, norm: str) -> list[tuple[int, int, int]]:
        """Every boundary-respecting occurrence ``(start, end, surface number)`` in normalised text,
        sorted by start, longest first."""
        if not self.surfaces:
            return []
        out = []
        n = len(norm)
        for last, (sid, length) in self.automaton.iter(norm):
            a, b = last - length + 1, last + 1
            # A boundary is needed only on a side where the name itself starts/ends with a word char.
            if a > 0 and is_word_char(norm[a]) and is_word_char(norm[a - 1]):
                continue
            if b < n and is_word_char(norm[last]) and is_word_char(norm[b]):
                continue
            out.append((a, b, sid))
        out.sort(key=lambda m: (m[0], -m[1]))
        return out

    def link(self, text: str) -> list[Mention]:
        """Leftmost-longest, non-overlapping mentions in ``text`` with offsets into ``text``."""
        nt = normalize(text, lowercase=self.lowercase, fold_quotes=self.fold_quotes)
        out: list[Mention] = []
        taken = 0
        for a, b, sid in self.matches(nt.text):
            if a < taken:
                continue  # overlaps the mention just taken, or a shorter match at the same start
            taken = b
            s = self.surfaces[sid]
            start, end = nt.span(a, b)
            e = s.candidates[s.best]
            out.append(Mention(start, end, text[start:end], e, self.entity_ids[e], s.probs[s.best],
                               len(s.candidates)))
        return out

    def link_many(self, texts: Iterable[str]) -> Iterator[list[Mention]]:
        for t in texts:
            yield self.link(t)
