"""The one held-out split: a stable, seeded hash of the unit's key."""

from __future__ import annotations

import hashlib

from fusion.splits import hash_rank, in_split, pair_key, split_of


def test_split_is_a_stable_hash_of_the_key():
    ids = [f"item{i}" for i in range(4000)]
    test = [i for i in ids if split_of(i, 0.2, seed=0) == "test"]
    assert 0.18 < len(test) / len(ids) < 0.22                                   # the share holds
    assert test == [i for i in ids if split_of(i, 0.2, seed=0) == "test"]       # reproducible
    assert set(test) != {i for i in ids if split_of(i, 0.2, seed=1) == "test"}  # the seed matters
    # independent of which other keys exist: a subset splits the same way
    assert [i for i in ids[::7] if split_of(i, 0.2) == "test"] == [i for i in test if i in set(ids[::7])]
    assert all(split_of(i, 0.0) == "train" for i in ids)
    assert all(in_split(i, "train", 0.2, 0) != in_split(i, "test", 0.2, 0) for i in ids[:100])
    assert all(in_split(i, "all", 0.2, 0) for i in ids[:100])


def test_the_hash_is_blake2b_of_seed_and_key():
    digest = hashlib.blake2b("3\x1fdog.n.01".encode(), digest_size=8).digest()
    assert hash_rank("dog.n.01", 3) == int.from_bytes(digest, "big")
    assert split_of("dog.n.01", hash_rank("dog.n.01", 3) / 2.0**64 + 1e-9, 3) == "test"


def test_a_pair_and_its_reverse_are_one_unit():
    assert pair_key("b", "a") == pair_key("a", "b") != pair_key("a", "c")
