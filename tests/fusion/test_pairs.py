"""Text-media pairs from a feature artifact: the hash split, padding, and counts of what is missing."""

from __future__ import annotations

import numpy as np

from fusion.pairs import MediaBank, load_pairs

from .conftest import make_feature_artifact


def test_bank_pads_items_to_their_largest_region_count(tmp_path):
    bank = MediaBank(["a", "b"], np.arange(5 * 2, dtype=np.float16).reshape(5, 2),
                     np.zeros((5, 4), np.float32), np.array([0, 2, 5]))
    b = bank.batch([1, 0])
    assert b["features"].shape == (2, 3, 2) and b["region_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["features"][1, :2].tolist() == [[0, 1], [2, 3]] and b["features"][1, 2].abs().sum() == 0


def test_pairs_count_items_without_features_or_text(tmp_path):
    art = make_feature_artifact(tmp_path / "f", broken=("red-dog",),
                                captions={"red-cat": [], "blue-art": ["the blue art", "blue art"]})
    bank, caps, counts = load_pairs(art, "all")
    assert counts["items_listed"] == 42 and counts["items_without_features"] == 1
    assert "red-dog" not in bank.ids and len(bank) == 41
    assert counts["all_items_without_text"] == 1 and counts["all_texts"] == 41  # 41 items: one without text, one with two
    m = bank.ids.index("blue-art")
    assert [caps.texts[i] for i, x in enumerate(caps.media) if x == m] == ["the blue art", "blue art"]
    assert {caps.ids[i] for i, x in enumerate(caps.media) if x == m} == {"blue-art#0", "blue-art#1"}
    train, _, _ = load_pairs(art, "train", 0.3, 0)
    test, _, _ = load_pairs(art, "test", 0.3, 0)
    assert set(train.ids).isdisjoint(test.ids) and len(train) + len(test) == 41
    capped, _, _ = load_pairs(art, "all", max_regions=2, limit=5)
    assert len(capped) == 5 and capped.batch(range(5))["features"].shape[1] == 2


def test_bank_of_an_empty_selection(feature_artifact):
    bank = MediaBank.load(feature_artifact, ids=[])
    assert len(bank) == 0 and bank.dim == 16
    assert bank.batch([])["features"].shape == (0, 0, 16)


def test_pairs_follow_the_listing_not_the_order_features_were_written(tmp_path):
    """A feature stage's actors finish in any order, so its shards' row order differs between runs
    of the same items; the pairs (what trains, what is ranked) follow items.parquet."""
    import pyarrow.parquet as pq

    art = make_feature_artifact(tmp_path / "a")
    listed = pq.read_table(art / "items.parquet", columns=["id"])["id"].to_pylist()
    for shard in sorted((art / "features").glob("*.parquet")):  # rows written in reverse
        t = pq.read_table(shard)
        pq.write_table(t.take(list(range(t.num_rows))[::-1]), shard)
    bank, caps, _ = load_pairs(art, "all")
    assert bank.ids == listed
    assert caps.ids == [f"{i}#0" for i in listed]
    assert MediaBank.load(art, ids=listed[::-1][:3]).ids == listed[::-1][:3]     # the order asked for
    first = MediaBank.load(art, ids=listed[:1])
    assert np.array_equal(first.features, bank.features[: first.offsets[1]])     # same rows
