"""Downstream tasks for ``fusion.finetune``: examples, the held-out split, caps and metrics.

Five tasks, built from the same artifacts for every encoder so that comparisons are fair (same
examples, same split, same labels; only the encoder differs). Two read linked documents:

* ``entity_typing``: one example per linked mention whose KG entity has a type; the label is the
  entity's first type (the WordNet lexname for a WordNet synset, ``countryinfo``'s kind, ...); the
  input is the whole document and the mention's span. The K-Adapter paper's entity typing
  (Open Entity, FIGER) reads the mention the same way, one vector for the mention.
* ``relation_classification``: distant supervision as the ``kadapter`` factual recipe builds it
  (Mintz et al. 2009; K-Adapter's factual task): every ordered pair of linked mentions in a document
  whose entities are a KG triple's head and tail is an example labelled with that relation (the
  first triple's, as the recipe), at most ``max_pairs_per_doc`` per document.

Three are built from the KG alone (:mod:`fusion.finetune.kg_tasks`): ``triple_classification``
(KG-BERT), ``lexical_relation`` (LIBERT's word pairs) and ``supersense`` (SenseBERT, on WordNet's
usage examples).

Held-out split (:mod:`fusion.splits`): by *entity* for typing and by *entity pair* for relations
and triples (unordered, so a pair and its reverse land on the same side), by *word* for the two
lexical tasks. A test entity (pair, word) is never seen in training, so the score measures
generalisation to new entities, not memorised ones; the split depends on neither the model nor the
training seed, so a seed sweep varies the initialisation and the data order only.

Caps (``max_train_examples``, ``max_test_examples``, default none): after the split, a sample of at
most that many examples per split, chosen by a hash of ``split_seed`` and the example id (so the
same for every encoder and training seed). They bound a run's cost, which grows with the test split
when the steps are fixed; sampled-out examples are not counted as left out, since nothing was wrong
with them.

Metrics (:func:`classification_metrics`): accuracy, micro-F1 and macro-F1 on the test split. Each
example has exactly one gold and one predicted label (there is no "no relation" class), so micro-F1
equals accuracy here; it is reported because the papers' tables do. Macro-F1 averages over the labels
present in the test gold *or* the predictions (a label never predicted scores F1 = 0, a label
predicted but never gold too), as scikit-learn does by default.

Unusable input is counted and left out, never a crash: empty documents, documents without linked
mentions, mentions of entities not in the KG, spans outside the text or covering only whitespace,
mentions listed twice, spans beyond ``max_length`` wordpieces (tokenised once, with the encoder's
tokenizer, before any encoder sees them, so every encoder gets the same examples), entities without
a type, labels rarer than ``min_label_count``, test labels never seen in training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fusion.finetune.examples import Mention, TaskData, TaskExample
from fusion.finetune.kg_tasks import LEFT_OUT as KG_LEFT_OUT
from fusion.finetune.kg_tasks import (LINKED, lexical_examples, link_examples, supersense_examples,
                                      triple_examples)
from fusion.splits import hash_rank, pair_key, split_of

DOCUMENT_TASKS = ("entity_typing", "relation_classification")
TASKS = (*DOCUMENT_TASKS, *KG_LEFT_OUT)
NUM_SPANS = {"entity_typing": 1, "relation_classification": 2, "triple_classification": 2,
             "lexical_relation": 2, "supersense": 1}
_FILTERS = ("examples_span_without_wordpiece", "examples_span_beyond_max_length",
            "examples_rare_label", "test_examples_label_not_in_train")
_DOCUMENTS = ("documents_empty", "mentions_in_empty_documents", "mentions_not_in_kg",
              "mentions_bad_span", "mentions_duplicate", *_FILTERS)
LEFT_OUT = {  # every reason a task reports, zero or not
    "entity_typing": (*_DOCUMENTS, "mentions_without_type"),
    "relation_classification": (*_DOCUMENTS, "pairs_over_max_per_doc"),
    **{task: (*reasons, *_FILTERS) for task, reasons in KG_LEFT_OUT.items()},
}


# ------------------------------------------------------------------------------------ metrics
def classification_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy, micro-F1, macro-F1 and per-label counts for single-label classification.

    Labels are those in ``gold`` or ``pred``; precision (recall) of a label never predicted (never
    gold) is 0, so is its F1. Micro-F1 pools true/false positives and false negatives over the
    labels (with one gold and one prediction per example it equals accuracy).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    n = len(gold)
    support, predicted = Counter(gold), Counter(pred)
    correct = Counter(g for g, p in zip(gold, pred) if g == p)
    per_label: dict[str, dict[str, float | int]] = {}
    for label in sorted(set(gold) | set(pred)):
        tp, p_n, s_n = correct[label], predicted[label], support[label]
        precision = tp / p_n if p_n else 0.0
        recall = tp / s_n if s_n else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"support": s_n, "predicted": p_n, "correct": tp,
                            "precision": precision, "recall": recall, "f1": f1}
    tp = sum(correct.values())
    fp, fn = n - tp, n - tp  # every wrong prediction is a FP of its label and a FN of the gold one
    micro_p = tp / (tp + fp) if tp + fp else 0.0
    micro_r = tp / (tp + fn) if tp + fn else 0.0
    return {
        "examples": n,
        "accuracy": tp / n if n else 0.0,
        "micro_f1": 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0,
        "macro_f1": (sum(v["f1"] for v in per_label.values()) / len(per_label)) if per_label else 0.0,
        "macro_labels": len(per_label),
        "per_label": per_label,
    }


# -------------------------------------------------------------------------------- task examples
def sample_examples(examples: Sequence[TaskExample], cap: int | None, split_seed: int = 0
                    ) -> tuple[list[TaskExample], list[TaskExample]]:
    """At most ``cap`` of the examples (in their order) and the rest: those whose
    ``blake2b(split_seed, "sample", id)`` is smallest. The hash of the id, not the list order or the
    training seed, decides, so every encoder and every training seed of a sweep gets the same
    sample (paired comparisons), and a larger cap only adds examples to a smaller cap's sample."""
    if cap is None or len(examples) <= cap:
        return list(examples), []
    chosen = {ex.id for ex in sorted(examples, key=lambda ex: hash_rank(f"sample\x1f{ex.id}", split_seed))[:cap]}
    return ([ex for ex in examples if ex.id in chosen], [ex for ex in examples if ex.id not in chosen])


def _usable_mentions(docs: Iterable[dict], kg_index: dict[str, int], left: Counter, info: Counter
                     ) -> list[tuple[dict, tuple[Mention, ...]]]:
    """Each document with the mentions a task can use (entity in the KG, span inside the text and
    not blank, not listed before); the others are counted by reason."""
    out = []
    for d in docs:
        text = d["text"] or ""
        info["documents"] += 1
        if not text.strip():
            left["documents_empty"] += 1
            left["mentions_in_empty_documents"] += len(d["mentions"])
            continue
        if not d["mentions"]:
            info["documents_without_mentions"] += 1
        ms: dict[Mention, None] = {}  # an ordered set: a mention listed twice counts once
        for s, e, ent in d["mentions"]:
            if ent not in kg_index:
                left["mentions_not_in_kg"] += 1
            elif not (0 <= s < e <= len(text)) or not text[s:e].strip():
                left["mentions_bad_span"] += 1
            elif (int(s), int(e), ent) in ms:
                left["mentions_duplicate"] += 1
            else:
                ms[(int(s), int(e), ent)] = None
        out.append((d, tuple(ms)))
    return out


def build_examples(docs: Iterable[dict], kg: Any, task: str, *, max_pairs_per_doc: int = 8,
                   test_share: float = 0.2, split_seed: int = 0
                   ) -> tuple[list[TaskExample], Counter, Counter]:
    """All task examples of the documents (``load_linked_docs`` records) or, for the tasks of
    :mod:`fusion.finetune.kg_tasks`, of the KG (``docs`` unused), before filtering by length and
    label; returns them and the counts of what was left out (and other counts)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    left, info = Counter(dict.fromkeys(LEFT_OUT[task], 0)), Counter()   # every reason, zero or not
    if task in KG_LEFT_OUT:
        build = {"triple_classification": lambda: triple_examples(kg, test_share, split_seed),
                 "lexical_relation": lambda: lexical_examples(kg, test_share, split_seed),
                 "supersense": lambda: supersense_examples(kg)}[task]
        examples, found, info = build()
        left.update(found)
        return examples, left, info
    ids = kg.entities["id"].to_pylist()
    index = dict(zip(ids, kg.entities["idx"].to_pylist()))
    out: list[TaskExample] = []
    usable = _usable_mentions(docs, index, left, info)
    if task == "entity_typing":
        types = kg.entities["types"].to_pylist()
        for d, ms in usable:
            for s, e, ent in ms:
                t = types[index[ent]]
                if not t:
                    left["mentions_without_type"] += 1
                    continue
                out.append(TaskExample(f"{d['id']}:{s}-{e}:{ent}", d["id"], d["text"], ms,
                                       ((s, e),), (ent,), ent, t[0]))
    else:
        rel_names = kg.relations["name"].to_pylist()
        facts: dict[tuple[str, str], str] = {}
        for h, r, t in zip(*(kg.triples[c].to_pylist() for c in ("head", "relation", "tail"))):
            facts.setdefault((ids[h], ids[t]), rel_names[r])  # the first triple's, as the recipe
        for d, ms in usable:
            pairs = 0
            for s1, e1, h in ms:
                for s2, e2, t in ms:
                    if h != t and (h, t) in facts:
                        if pairs >= max_pairs_per_doc:
                            left["pairs_over_max_per_doc"] += 1
                            continue
                        pairs += 1
                        out.append(TaskExample(
                            f"{d['id']}:{s1}-{e1}:{s2}-{e2}:{h}>{t}", d["id"], d["text"], ms,
                            ((s1, e1), (s2, e2)), (h, t), pair_key(h, t), facts[(h, t)]))
    return out, left, info


def fit_length(examples: Sequence[TaskExample], tokenizer: Any, max_length: int
               ) -> tuple[list[TaskExample], Counter]:
    """The examples whose every span has its first wordpiece inside ``max_length`` (special tokens
    included); the rest counted as ``span_beyond_max_length`` or ``span_without_wordpiece``.

    Every encoder truncates its text (K-BERT: its tree's trunk, after dropping every branch) to
    the same first ``max_length - specials`` wordpieces, so filtering once here gives all encoders
    the same examples. Each document is tokenised once, in batches (the KG tasks have one short
    text per example, hundreds of thousands of them).
    """
    from fusion.models.backbone import first_wordpieces

    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    texts = {ex.doc_id: ex.text for ex in examples}
    ids = list(texts)
    offsets: dict[str, list] = {}
    for i in range(0, len(ids), 4096):
        chunk = ids[i:i + 4096]
        enc = tokenizer([texts[d] for d in chunk], add_special_tokens=False,
                        return_offsets_mapping=True, verbose=False)["offset_mapping"]
        offsets.update(zip(chunk, enc))
    kept, left = [], Counter()
    for ex in examples:
        hits = first_wordpieces(offsets[ex.doc_id], ex.spans)
        if any(h is None for h in hits):
            left["examples_span_without_wordpiece"] += 1
        elif max(hits) >= budget:
            left["examples_span_beyond_max_length"] += 1
        else:
            kept.append(ex)
    return kept, left


# The last KG task built in this process, by (kg_key, task, split, max_length, tokenizer): a sweep
# fine-tunes every encoder on the same task, and Ray reuses its worker processes, so the next stage
# skips building and tokenising hundreds of thousands of examples. One entry bounds the memory.
_LAST_KG_TASK: dict[tuple, tuple[list[TaskExample], Counter, Counter]] = {}


def _fitted_examples(docs: Iterable[dict], kg: Any, task: str, tokenizer: Any, max_length: int,
                     test_share: float, split_seed: int, max_pairs_per_doc: int
                     ) -> tuple[list[TaskExample], Counter, Counter]:
    examples, left, info = build_examples(docs, kg, task, max_pairs_per_doc=max_pairs_per_doc,
                                          test_share=test_share, split_seed=split_seed)
    info["examples_found"] = len(examples)
    examples, too_long = fit_length(examples, tokenizer, max_length)
    left.update(too_long)
    return examples, left, info


def _reuse_kg_task(key: tuple, tokenizer: Any, build: Callable[[], tuple]
                   ) -> tuple[list[TaskExample], Counter, Counter]:
    """``build()`` (a KG task's fitted examples), or this process's last result for the same
    ``key`` and tokenizer; only fast tokenizers (their serialised state) are compared."""
    import hashlib

    state = getattr(getattr(tokenizer, "backend_tokenizer", None), "to_str", None)
    if state is None:
        return build()
    key = (*key, hashlib.sha256(state().encode()).hexdigest())
    if key not in _LAST_KG_TASK:
        _LAST_KG_TASK.clear()
        _LAST_KG_TASK[key] = build()
    examples, left, info = _LAST_KG_TASK[key]
    return list(examples), Counter(left), Counter(info)     # the caller's to change


def prepare_task(docs: Iterable[dict], kg: Any, task: str, tokenizer: Any, max_length: int, *,
                 test_share: float = 0.2, split_seed: int = 0, min_label_count: int = 2,
                 max_pairs_per_doc: int = 8, max_train: int | None = None,
                 max_test: int | None = None, kg_key: str | None = None) -> TaskData:
    """Examples, length filter, rare labels, held-out split, the caps (see the module docstring),
    then, for the lexical tasks, the linker's mentions (:func:`fusion.finetune.kg_tasks.link_examples`).
    The split comes first, so a cap never moves an entity (pair) across it; the label
    vocabulary is the *sampled* training set's, as that is all the model sees. ``kg_key``: what
    identifies the KG's content (its artifact's key and location), so that a task of the KG alone
    built by this process for an earlier stage is reused."""
    def build() -> tuple[list[TaskExample], Counter, Counter]:
        return _fitted_examples(docs, kg, task, tokenizer, max_length, test_share, split_seed,
                                max_pairs_per_doc)

    if task in KG_LEFT_OUT and kg_key is not None:
        examples, left, info = _reuse_kg_task((kg_key, task, test_share, split_seed, max_length),
                                              tokenizer, build)
    else:
        examples, left, info = build()
    counts = Counter(ex.label for ex in examples)
    rare = {label for label, c in counts.items() if c < min_label_count}
    left["examples_rare_label"] += sum(counts[label] for label in rare)
    examples = [ex for ex in examples if ex.label not in rare]
    sides = [ex.side or split_of(ex.key, test_share, split_seed) for ex in examples]
    train = [ex for ex, side in zip(examples, sides) if side == "train"]
    test = [ex for ex, side in zip(examples, sides) if side == "test"]
    available = {"train": len(train)}
    train, unsampled = sample_examples(train, max_train, split_seed)
    labels = sorted({ex.label for ex in train})
    known = set(labels)
    left["test_examples_label_not_in_train"] += sum(ex.label not in known for ex in test)
    test = [ex for ex in test if ex.label in known]
    available["test"] = len(test)
    test, test_unsampled = sample_examples(test, max_test, split_seed)
    if task in LINKED:      # after the caps: the examples they leave out reach no encoder
        linked = link_examples(kg, train + test, info)
        train, test = linked[:len(train)], linked[len(train):]
    return TaskData(train, test, labels, {k: v for k, v in sorted(left.items())},
                    {k: v for k, v in sorted(info.items())}, unsampled + test_unsampled, available)
