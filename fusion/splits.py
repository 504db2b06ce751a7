"""The one held-out split of stele's fusion stages, by a hash of the split unit's key, and the
datasets' own splits, which win over it for media items that carry one.

A unit (a media item for the multimodal recipes and retrieval; an entity or an unordered entity
pair for fine-tuning and the K-Adapter recipe) is held out when ``blake2b(seed, key)``, read as a
fraction of 2^64, is below the share. The hash, not the listing order or which other units exist,
decides: the same unit is held out in pretraining and in evaluation, across processes, machines
and runs (Python's ``hash`` is salted per process), and independently of the model or the
training seed, so a seed sweep varies the initialisation and the data order only.

Media items whose dataset defines a split (Karpathy's ``train``/``val``/``test``/``restval``, a
COCO annotation file's split, a ``split`` column of an image or audio folder's captions file) keep
it in ``meta["split"]`` of the feature artifact's ``items.parquet``: :class:`MediaSplit` then uses
that split, the one papers report on, and the hash split only for artifacts whose items carry none.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "test", "all"]
SplitSource = Literal["dataset", "hash"]


def hash_rank(key: str, seed: int = 0) -> int:
    """``blake2b(f"{seed}\\x1f{key}")`` as a 64-bit integer: the unit's place in a seeded random
    order (sort by it to sample), and with :func:`split_of` its side of the split."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_of(key: str, test_share: float, seed: int = 0) -> Literal["train", "test"]:
    """``"test"`` for the ``test_share`` of keys whose hash is smallest, else ``"train"``."""
    return "test" if hash_rank(key, seed) / 2.0**64 < test_share else "train"


def in_split(key: str, split: Split, test_share: float, seed: int = 0) -> bool:
    """Whether ``key`` belongs to ``split`` (``"all"``: every key)."""
    return split == "all" or split_of(key, test_share, seed) == split


def pair_key(head: str, tail: str) -> str:
    """The split unit of a relation example: the unordered entity pair, so a pair and its reverse
    land on the same side."""
    a, b = sorted((head, tail))
    return f"{a}\x1f{b}"


# ----------------------------------------------------------------------------- media items
def own_split(meta: str | dict | None) -> str | None:
    """An item's split as its dataset gave it: ``meta["split"]`` (``meta`` as ``items.parquet``
    stores it, a JSON object, or already decoded), stripped; None when absent or empty."""
    if isinstance(meta, str):
        meta = json.loads(meta or "{}")
    value = meta.get("split") if isinstance(meta, dict) else None
    if value is None:
        return None
    return str(value).strip() or None


@dataclass
class MediaSplit:
    """Which side of the split each media item of a feature artifact is on.

    ``source == "dataset"``: the items' own splits (``own``: id -> split name, None for an item that
    carries none: it is in no split but ``all``); ``"hash"``: :func:`split_of` of the item id with
    ``held_out_share`` and ``seed`` (splits ``train`` and ``test`` only). Built by
    :meth:`of_listing`."""

    source: SplitSource
    held_out_share: float = 0.0
    seed: int = 0
    own: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def of_listing(cls, ids: Sequence[str], metas: Iterable[str | None], held_out_share: float = 0.0,
                   seed: int = 0, source: SplitSource = "dataset") -> MediaSplit:
        """The split of the listed items ``ids`` (``metas``: their ``items.parquet`` meta, in the
        same order): the dataset's own where ``source`` is ``"dataset"`` and at least one item
        carries a split, else the hash split."""
        if source == "dataset":
            own = {i: own_split(m) for i, m in zip(ids, metas)}
            if any(s is not None for s in own.values()):
                return cls("dataset", held_out_share, seed, own)
        return cls("hash", held_out_share, seed)

    @property
    def label(self) -> str:
        """What the manifests say: ``dataset`` or ``hash(held_out_share=0.2, seed=0)``."""
        if self.source == "dataset":
            return "dataset"
        return f"hash(held_out_share={self.held_out_share}, seed={self.seed})"

    def names(self) -> dict[str, int]:
        """Items per split name, the dataset's (``""``: items without one) or the hash split's."""
        if self.source == "dataset":
            return dict(sorted(Counter(s or "" for s in self.own.values()).items()))
        return {}

    def contains(self, item: str, split: str) -> bool:
        """Whether ``item`` belongs to ``split`` (``"all"``: every item)."""
        if split == "all":
            return True
        if self.source == "dataset":
            return self.own.get(item) == split
        return split_of(item, self.held_out_share, self.seed) == split

    def check(self, split: str, where: str) -> None:
        """A ``ValueError`` when ``split`` can select nothing by construction: a name the dataset's
        own split does not have, or another name than train / test for the hash split."""
        if split == "all":
            return
        if self.source == "dataset":
            have = {k: v for k, v in self.names().items() if k}
            if split not in have:
                raise ValueError(f"{where}: no item of split {split!r}; the dataset's own splits "
                                 f"here: {', '.join(f'{k} ({v} items)' for k, v in have.items())}; "
                                 f"choose one of them or all")
        elif split not in ("train", "test"):
            raise ValueError(f"{where}: split {split!r} needs the dataset's own split, and its items "
                             f"carry none (no meta 'split'); stele's hash split has train and test")

    def counts(self) -> dict[str, object]:
        """For the manifests: the source, and the items per split of the dataset's own."""
        out: dict[str, object] = {"split_source": self.label}
        if self.source == "dataset":
            names = self.names()
            out["dataset_splits"] = {k: v for k, v in names.items() if k}
            if "" in names:
                out["items_without_split"] = names[""]
        return out
