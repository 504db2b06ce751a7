"""Downstream tasks built from the knowledge graph itself, for ``fusion.finetune``.

The papers' own evaluation sets (WN11 / FB13, BLESS / EVALution, SemEval-SS) are not reachable
offline. Each task here is the closest honest one that the KG of ``knowledge.ingest`` gives (WordNet
through :mod:`knowledge.sources.wordnet`, countryinfo, ...), built the same way for every encoder.
A WordNet synset is an entity whose first type is a lexname (``noun.animal``, ``verb.motion``, ...).

* ``triple_classification`` (KG-BERT, Yao et al. 2019, arXiv:1909.03193, section 4.2; the protocol
  of Socher et al. 2013 on WN11 / FB13): is ``(h, r, t)`` a fact? The text names the triple,
  ``"<h name> <r name> <t name>"`` (the relation's name without its leading ``_``, ``_`` read as a
  space), with ``h`` and ``t`` linked as mentions (the task is about these entities, as KG-BERT's
  input is the triple); the classifier reads ``[f(h) ; f(t)]``. Every triple is a ``true`` example
  and has one ``false`` twin: its tail or its head (by a hash of the triple) replaced by another
  entity seen in that position of the same relation (Socher et al.'s type-plausible corruption), such
  that no fact of that relation reads the same (WordNet has many synsets of one name: a twin must
  not be a true triple's text) and the corrupted pair lies on the true triple's side of the split.
  The KG is incomplete, so a few ``false`` triples may be true (the closed-world reading every
  triple classification benchmark makes). Split unit: the true triple's unordered entity pair; its
  twin goes with it, so no test pair is seen in fine-tuning, and KEPLER or KG-BERT pretrained with
  the same ``held_out_share`` and ``split_seed`` never saw a test triple.
* ``lexical_relation`` (the lexical knowledge LIBERT injects, Lauscher et al. 2020,
  arXiv:1909.02339, as the lexical relation classification of BLESS / EVALution): which relation
  holds between two words? Each triple between two WordNet synsets gives the pair of their first
  lemmas, labelled with the relation's name; each synset with two or more lemmas gives its first two,
  labelled ``synonym``; and one pair in four (by hash) has a ``random`` twin, its first word with a
  word of the same side of the split that is unrelated to it: no lemma of a synset of one is a lemma
  of a synset of the other or of a synset linked to one by a triple. The text is ``"<w1>, <w2>"``;
  the task asks about words, not senses, so the example names no entity (its mentions are the
  linker's, below), and K-BERT injects no triple between any synsets of the two words
  (:func:`word_pair_facts`, with ``hide_task_facts``). A pair met again (from another pair of
  synsets, with any label) keeps its first label and is counted. The split is *lexical* (Levy et
  al. 2015, "Do Supervised Distributional Methods Really Learn Lexical Inference Relations?"): a
  word is a test word with probability ``test_share`` (by hash), a pair is tested when both its
  words are test words, trained on when neither is, and left out (counted) otherwise. No test word
  was seen in fine-tuning, so no model scores by remembering prototypical hypernyms ("animal"); about
  ``test_share ** 2`` of the pairs are tested.
* ``supersense`` (SenseBERT, Levine et al. 2020, arXiv:1908.05646; SemEval-SS): the supersense (the
  lexname) of a word in context. WordNet's usage examples are a sense-annotated corpus: each quoted
  example of a synset's gloss (the entity's ``description``) uses one of its lemmas in that sense.
  The target is the synset's longest lemma as written in the example, else the first word whose
  base form by morphy's detachment rules for the synset's part of speech
  (:data:`fusion.models.sensebert.DETACH`) is a lemma (one-letter lemmas are not looked for: "a"
  would find the article); the label is the synset's lexname; the example names no entity (the
  sense is what is asked; its mentions are the linker's, below). Split unit: the lemma found, so a
  polysemous word's examples stay on one side and no test word was tagged in fine-tuning. The
  glosses are KEPLER's entity descriptions: it read the test sentences (not their labels) in
  pretraining.

Each builder returns ``(examples, left_out, info)`` as :func:`fusion.finetune.tasks.build_examples`.

The two lexical tasks' texts carry the mentions :mod:`knowledge.link`'s dictionary linker finds in
them (:func:`link_examples`, on the sampled examples), so ERNIE, K-BERT and KnowBERT read the KG as
they do in a document: the sense the linker's prior picks (or, for KnowBERT, every candidate), not
the one the pair or the usage example was built from.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from fusion.finetune.examples import TaskExample
from fusion.splits import hash_rank, pair_key, split_of

LEXNAME = re.compile(r"^(noun|verb|adj|adv)\.[A-Za-z]+$")
QUOTED = re.compile(r'"([^"]+)"')
# The tasks whose texts the dictionary linker reads after sampling (:func:`link_examples`); a
# triple's text is linked where it is built (its two entities).
LINKED = ("lexical_relation", "supersense")
MAX_TRIES = 50          # candidates looked at for a corrupted triple or a random pair
RANDOM_EVERY = 4        # one lexical pair in RANDOM_EVERY has a random twin
LEFT_OUT = {
    "triple_classification": ("triples_self_loop", "triples_entity_without_name",
                              "negatives_without_candidate"),
    "lexical_relation": ("pairs_entity_without_name", "pairs_same_word", "pairs_duplicate",
                         "pairs_across_split", "random_without_candidate"),
    "supersense": ("examples_lemma_not_found",),
}


def _name(s: str | None) -> str:
    return (s or "").replace("_", " ").strip()


def _relation_text(name: str) -> str:
    return _name(name.lstrip("_"))


def _pair_text(a: str, b: str, sep: str) -> tuple[str, tuple[tuple[int, int], tuple[int, int]]]:
    """``a + sep + b`` and the two spans."""
    start = len(a) + len(sep)
    return a + sep + b, ((0, len(a)), (start, start + len(b)))


def _lexnames(kg: Any) -> list[str | None]:
    """Each entity's lexname (None: not a WordNet synset)."""
    return [t[0] if t and LEXNAME.match(t[0]) else None for t in kg.entities["types"].to_pylist()]


def _lemmas(kg: Any) -> list[list[str]]:
    """Each entity's lemmas, lower-cased, ``_`` read as spaces, first the name, each once."""
    out = []
    for n, aliases in zip(kg.entities["name"].to_pylist(), kg.entities["aliases"].to_pylist()):
        ws: list[str] = []
        for w in [n, *(aliases or [])]:
            w = _name(w).lower()
            if w and w not in ws:
                ws.append(w)
        out.append(ws)
    return out


# ------------------------------------------------------------------------- triple classification
def triple_examples(kg: Any, test_share: float, seed: int = 0
                    ) -> tuple[list[TaskExample], Counter, Counter]:
    ids = kg.entities["id"].to_pylist()
    names = [_name(n) for n in kg.entities["name"].to_pylist()]
    rel_ids, rel_names = kg.relations["id"].to_pylist(), kg.relations["name"].to_pylist()
    triples = list(zip(*(kg.triples[c].to_pylist() for c in ("head", "relation", "tail"))))
    read = {(names[h].lower(), r, names[t].lower()) for h, r, t in triples}   # what a fact's text says
    heads: dict[int, list[int]] = defaultdict(list)
    tails: dict[int, list[int]] = defaultdict(list)
    for h, r, t in dict.fromkeys(triples):
        heads[r].append(h)
        tails[r].append(t)
    heads = {r: sorted(set(v)) for r, v in heads.items()}
    tails = {r: sorted(set(v)) for r, v in tails.items()}
    left, info = Counter(dict.fromkeys(LEFT_OUT["triple_classification"], 0)), Counter()
    out: list[TaskExample] = []

    def example(h: int, r: int, t: int, tid: str, key: str, label: str) -> TaskExample:
        text, (sh, st) = _pair_text(names[h], names[t], f" {_relation_text(rel_names[r])} ")
        return TaskExample(f"{tid}:{label}" if label == "true" else f"{tid}:false:{ids[h]}>{ids[t]}",
                           f"{tid}:{label}", text, ((*sh, ids[h]), (*st, ids[t])), (sh, st),
                           (ids[h], ids[t]), key, label)

    for h, r, t in dict.fromkeys(triples):      # each fact once, in the KG's order
        info["triples"] += 1
        if h == t:
            left["triples_self_loop"] += 1
            continue
        if not names[h] or not names[t]:
            left["triples_entity_without_name"] += 1
            continue
        tid, key = f"{ids[h]}|{rel_ids[r]}|{ids[t]}", pair_key(ids[h], ids[t])
        side = split_of(key, test_share, seed)
        out.append(example(h, r, t, tid, key, "true"))
        corrupt_tail = hash_rank(f"side\x1f{tid}", seed) % 2 == 0
        pool = tails[r] if corrupt_tail else heads[r]
        start = hash_rank(f"negative\x1f{tid}", seed) % len(pool)
        old = t if corrupt_tail else h
        for i in range(min(len(pool), MAX_TRIES)):
            c = pool[(start + i) % len(pool)]
            nh, nt = (h, c) if corrupt_tail else (c, t)
            if (c != old and nh != nt and names[c]
                    and (names[nh].lower(), r, names[nt].lower()) not in read
                    and split_of(pair_key(ids[nh], ids[nt]), test_share, seed) == side):
                out.append(example(nh, r, nt, tid, key, "false"))
                break
        else:
            left["negatives_without_candidate"] += 1
    return out, left, info


# ------------------------------------------------------------------------------ lexical relation
def lexical_examples(kg: Any, test_share: float, seed: int = 0
                     ) -> tuple[list[TaskExample], Counter, Counter]:
    lex, lemmas = _lexnames(kg), _lemmas(kg)
    rel_names = kg.relations["name"].to_pylist()
    left, info = Counter(dict.fromkeys(LEFT_OUT["lexical_relation"], 0)), Counter()
    pairs: dict[tuple[str, str], str] = {}   # (w1, w2) -> label, first met

    def add(a: str, b: str, label: str) -> None:
        if a == b:
            left["pairs_same_word"] += 1
        elif (a, b) in pairs:
            left["pairs_duplicate"] += 1
        else:
            pairs[(a, b)] = label

    for i, ws in enumerate(lemmas):
        if lex[i] is not None and len(ws) > 1:
            add(ws[0], ws[1], "synonym")
    for h, r, t in zip(*(kg.triples[c].to_pylist() for c in ("head", "relation", "tail"))):
        if lex[h] is None or lex[t] is None:
            continue
        if lemmas[h] and lemmas[t]:
            add(lemmas[h][0], lemmas[t][0], _relation_text(rel_names[r]))
        else:
            left["pairs_entity_without_name"] += 1
    related = _relatedness(kg, lex, lemmas)
    made: set[tuple[str, str]] = set()       # random pairs already made, either order
    side = {w: split_of(w, test_share, seed) for pair in pairs for w in pair}
    vocab = {s: sorted(w for w, v in side.items() if v == s) for s in ("train", "test")}
    info["word_pairs"] = len(pairs)
    out: list[TaskExample] = []
    for (a, b), label in pairs.items():
        if side[a] != side[b]:
            left["pairs_across_split"] += 1
            continue
        out.append(_word_pair(a, b, label, side[a]))
        if hash_rank(f"random\x1f{a}\x1f{b}", seed) % RANDOM_EVERY:
            continue
        pool = vocab[side[a]]
        start = hash_rank(f"random word\x1f{a}\x1f{b}", seed) % len(pool)
        for i in range(min(len(pool), MAX_TRIES)):
            w = pool[(start + i) % len(pool)]
            if w != a and (a, w) not in made and (a, w) not in pairs and (w, a) not in pairs \
                    and not related(a, w):
                made |= {(a, w), (w, a)}
                out.append(_word_pair(a, w, "random", side[a]))
                break
        else:
            left["random_without_candidate"] += 1
    return out, left, info


def _senses(kg: Any, lex: list[str | None], lemmas: list[list[str]]
            ) -> tuple[dict[str, set[int]], dict[int, set[int]]]:
    """Each word's synsets (those it is a lemma of) and each entity's neighbours by a triple (either
    direction)."""
    synsets: dict[str, set[int]] = defaultdict(set)
    for i, ws in enumerate(lemmas):
        if lex[i] is not None:
            for w in ws:
                synsets[w].add(i)
    linked: dict[int, set[int]] = defaultdict(set)
    for h, t in zip(kg.triples["head"].to_pylist(), kg.triples["tail"].to_pylist()):
        linked[h].add(t)
        linked[t].add(h)
    return synsets, linked


def _relatedness(kg: Any, lex: list[str | None], lemmas: list[list[str]]) -> Callable[[str, str], bool]:
    """``related(a, b)``: a lemma of one of ``a``'s synsets is ``b``, or is a lemma of a synset
    linked to one of ``a``'s by a triple (either direction)."""
    synsets, linked = _senses(kg, lex, lemmas)

    def related(a: str, b: str) -> bool:
        mine, theirs = synsets.get(a, set()), synsets.get(b, set())
        return bool(mine & theirs) or any(linked[s] & theirs for s in mine)
    return related


def word_pair_facts(kg: Any, examples: Iterable[TaskExample]) -> frozenset[frozenset[int]]:
    """The KG entity pairs (``idx``) behind the word pairs of lexical ``examples``: every triple
    between a synset of one word and a synset of the other, whichever sense the pair was built from.
    K-BERT must not inject them: its branch would read the label ("dog hypernym canine")."""
    synsets, linked = _senses(kg, _lexnames(kg), _lemmas(kg))
    out: set[frozenset[int]] = set()
    for ex in examples:
        a, b = (ex.text[s:e].lower() for s, e in ex.spans)
        theirs = synsets.get(b, set())
        for s in synsets.get(a, ()):
            out.update(frozenset((s, t)) for t in linked[s] & theirs)
    return frozenset(out)


def link_examples(kg: Any, examples: Sequence[TaskExample], info: Counter) -> list[TaskExample]:
    """The lexical tasks' examples with the mentions :mod:`knowledge.link`'s dictionary linker (its
    stage's defaults: degree prior, English stop list, three characters at least) finds in their
    text: the knowledge context ERNIE, K-BERT and KnowBERT read, as they read a document's links.
    The linker chooses a sense by its prior, not the pair's or the usage example's own sense; the
    examples' ``entities`` stay empty, as the task asks about words. Counts into ``info``:
    ``link_mentions``, and the task spans a mention covers exactly (``link_spans_linked``) or not
    (``link_spans_without_entity``: stop words, short or unknown surfaces, part of a longer name)."""
    from knowledge.link import Gazetteer

    gazetteer = Gazetteer.from_kg(kg)
    out = []
    for ex in examples:
        mentions = tuple((m.start, m.end, m.entity_id) for m in gazetteer.link(ex.text))
        covered = {(s, e) for s, e, _ in mentions}
        info["link_mentions"] += len(mentions)
        info["link_spans_linked"] += sum(span in covered for span in ex.spans)
        info["link_spans_without_entity"] += sum(span not in covered for span in ex.spans)
        out.append(replace(ex, mentions=mentions))
    return out


def _word_pair(a: str, b: str, label: str, side: str) -> TaskExample:
    text, spans = _pair_text(a, b, ", ")
    return TaskExample(f"{a}|{b}", f"{a}|{b}", text, (), spans, (), pair_key(a, b), label, side)


# ------------------------------------------------------------------------------------ supersense
def find_lemma(sentence: str, lemmas: list[str], rules: tuple[tuple[str, str], ...]
               ) -> tuple[int, int, str] | None:
    """``(start, end, lemma)`` of a lemma in ``sentence``: the longest lemma as written (whole
    words, any case), else the first word whose base form by one of morphy's detachment ``rules``
    (``(suffix, ending)``, one part of speech's) is a one-word lemma; None when there is neither.
    One-letter lemmas are not looked for, and a hyphenated word is one word ("well-known" holds no
    "well")."""
    low = sentence.lower()
    lemmas = [w for w in lemmas if len(w) > 1]
    for lemma in sorted(lemmas, key=len, reverse=True):
        m = re.search(rf"(?<![\w-]){re.escape(lemma)}(?![\w-])", low)
        if m:
            return m.start(), m.end(), lemma
    single = {w for w in lemmas if " " not in w}
    for m in re.finditer(r"(?<![\w-])[a-z]+(?![\w-])", low):
        w = m.group()
        for suffix, ending in rules:
            if w.endswith(suffix) and len(w) > len(suffix) and w[: -len(suffix)] + ending in single:
                return m.start(), m.end(), w[: -len(suffix)] + ending
    return None


def supersense_examples(kg: Any) -> tuple[list[TaskExample], Counter, Counter]:
    from fusion.models.sensebert import DETACH

    lex, lemmas = _lexnames(kg), _lemmas(kg)
    left, info = Counter(dict.fromkeys(LEFT_OUT["supersense"], 0)), Counter()
    out: list[TaskExample] = []
    for i, (eid, gloss) in enumerate(zip(kg.entities["id"].to_pylist(),
                                         kg.entities["description"].to_pylist())):
        if lex[i] is None:
            continue
        info["synsets"] += 1
        examples = QUOTED.findall(gloss or "")
        info["synsets_without_examples"] += not examples
        for k, sentence in enumerate(examples):
            found = find_lemma(sentence, lemmas[i], DETACH[lex[i].split(".")[0]])
            if found is None:
                left["examples_lemma_not_found"] += 1
                continue
            s, e, lemma = found
            out.append(TaskExample(f"{eid}:ex{k}", f"{eid}:ex{k}", sentence, (), ((s, e),), (),
                                   lemma, lex[i]))
    info["usage_examples"] = sum(left.values()) + len(out)
    return out, left, info
