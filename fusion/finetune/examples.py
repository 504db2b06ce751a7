"""The examples every ``fusion.finetune`` task gives its encoders: a text, its linked mentions (the
encoder's knowledge context) and the spans the classifier reads, with the split unit and the label.
Built by :mod:`fusion.finetune.tasks` (from linked documents) and :mod:`fusion.finetune.kg_tasks`
(from the knowledge graph itself)."""

from __future__ import annotations

from dataclasses import dataclass, field

Span = tuple[int, int]                 # character offsets [start, end) into the text
Mention = tuple[int, int, str]         # (start, end, KG entity id)


@dataclass(frozen=True)
class TaskExample:
    id: str                          # unique (its document, spans and entities; a triple, a word pair)
    doc_id: str
    text: str
    mentions: tuple[Mention, ...]    # every usable linked mention of the text (encoder context)
    spans: tuple[Span, ...]          # (mention,) for typing, (head, tail) for relations
    entities: tuple[str, ...]        # the spans' KG entity ids (none where the task gives no entity)
    key: str                         # the split unit: entity id, the unordered entity pair, a word
    label: str
    # The example's side when its task decides it (a lexical split, where a pair's side follows
    # both its words'); None: ``split_of(key)``.
    side: str | None = None


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
