"""The one held-out split of stele's fusion stages, by a hash of the split unit's key.

A unit (a media item for the multimodal recipes and retrieval; an entity or an unordered entity
pair for fine-tuning and the K-Adapter recipe) is held out when ``blake2b(seed, key)``, read as a
fraction of 2^64, is below the share. The hash, not the listing order or which other units exist,
decides: the same unit is held out in pretraining and in evaluation, across processes, machines
and runs (Python's ``hash`` is salted per process), and independently of the model or the
training seed, so a seed sweep varies the initialisation and the data order only.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "test", "all"]


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
