"""The pretraining corpus without Ray: units of a linked-text artifact, their documents, and each
worker's stream (every example once per epoch across the workers, exact resume)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion.pretrain.corpus import CORPUS_FILE, Corpus, CorpusStream, epoch_plan, read_linked_docs, text_units
from knowledge.stages.link import DOC_SCHEMA, MENTION_SCHEMA
from pipeline import StageFailed


def _linked(d: Path, n_docs: int, row_group: int = 3, n_mentions=lambda i: i % 3) -> Path:
    """A knowledge.link layout: doc i has ``n_mentions(i)`` mentions, written in document order."""
    d.mkdir()
    counts = [n_mentions(i) for i in range(n_docs)]
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(n_docs)],
                             "text": [f"text of document {i}" for i in range(n_docs)],
                             "n_mentions": counts}, schema=DOC_SCHEMA),
                   d / "docs.parquet", row_group_size=row_group)
    rows = [(f"d{i}", k, k + 1, f"e{i}.{k}") for i in range(n_docs) for k in range(counts[i])]
    pq.write_table(pa.table({"doc_id": [r[0] for r in rows], "start": [r[1] for r in rows],
                             "end": [r[2] for r in rows], "surface": ["x"] * len(rows),
                             "entity_idx": [0] * len(rows), "entity_id": [r[3] for r in rows],
                             "score": [1.0] * len(rows), "n_candidates": [1] * len(rows)},
                            schema=MENTION_SCHEMA), d / "mentions.parquet", row_group_size=2)
    return d


def test_units_cover_every_document_and_its_mentions_once(tmp_path):
    text = _linked(tmp_path / "link", 23)
    units = text_units(str(text), unit_docs=5)
    assert [(u["doc_start"], u["doc_end"]) for u in units] == [(0, 5), (5, 10), (10, 15), (15, 20),
                                                               (20, 23)]
    docs = [d for u in units for d in read_linked_docs(str(text), u)]
    assert [d["id"] for d in docs] == [f"d{i}" for i in range(23)]
    assert all(d["mentions"] == [(k, k + 1, f"e{i}.{k}") for k in range(i % 3)]
               for i, d in enumerate(docs))
    assert sum(u["doc_end"] - u["doc_start"] for u in text_units(str(text), limit=7, unit_docs=5)) == 7


def test_mentions_out_of_line_with_docs_are_a_clear_error(tmp_path):
    text = _linked(tmp_path / "link", 6)
    docs = pq.read_table(text / "docs.parquet")
    pq.write_table(docs.set_column(2, "n_mentions", pa.array([0] * 6, pa.int32())),
                   text / "docs.parquet")  # says no mentions, but mentions.parquet has some
    with pytest.raises(StageFailed, match="n_mentions add up to 0 but mentions.parquet has 6 rows"):
        text_units(str(text))
    # one document's count off: the unit that holds it names where
    pq.write_table(docs.set_column(2, "n_mentions", pa.array([0, 2, 1, 0, 1, 2], pa.int32())),
                   text / "docs.parquet")
    with pytest.raises(StageFailed, match="does not line up with docs.parquet's n_mentions near "
                                          "mention row 1"):
        read_linked_docs(str(text), text_units(str(text))[0])


def _corpus(tmp_path: Path, sizes: list[int]) -> Corpus:
    """Parts whose rows are ``{"id": "<part>.<row>"}``; a part of size 0 is not written."""
    d = tmp_path / "corpus"
    d.mkdir()
    c = Corpus(str(d), tuple(sizes))
    for p, n in enumerate(sizes):
        if n:
            pq.write_table(pa.table({"id": [f"{p}.{r}" for r in range(n)]}), c.part(p))
    (d / CORPUS_FILE).write_text(json.dumps({"sizes": sizes, "counts": {}}))
    return c


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_example_once_per_epoch_across_workers(tmp_path, world):
    corpus = _corpus(tmp_path, [7, 0, 5, 9, 1, 6])                   # 28 examples, uneven parts
    everything = sorted(f"{p}.{r}" for p, n in enumerate(corpus.sizes) for r in range(n))
    for epoch in range(3):
        seen = []
        for rank in range(world):
            plan = epoch_plan(corpus.sizes, epoch, seed=5, rank=rank, world=world)
            share = sum(b - a for _, a, b in plan)
            stream = CorpusStream(corpus, 5, rank, world, {"epoch": epoch, "cursor": 0})
            seen += [r["id"] for r in stream.batch(share)]
            assert stream.state == {"epoch": epoch, "cursor": share}
        assert sorted(seen) == everything                              # once each, none lost
    # the order differs from epoch to epoch and is the same for the same seed
    first = CorpusStream(corpus, 5, 0, 1, {"epoch": 0, "cursor": 0}).batch(28)
    assert first == CorpusStream(corpus, 5, 0, 1, {"epoch": 0, "cursor": 0}).batch(28)
    assert first != CorpusStream(corpus, 5, 0, 1, {"epoch": 1, "cursor": 0}).batch(28)


def test_the_stream_runs_on_across_epochs_and_resumes_exactly(tmp_path):
    corpus = _corpus(tmp_path, [7, 5, 9, 1, 6])
    whole = CorpusStream(corpus, 1, 1, 2, {"epoch": 0, "cursor": 0})
    batches = [whole.batch(4) for _ in range(12)]                      # 48 rows: past epoch 2
    assert whole.state["epoch"] == 3
    for k in (1, 3, 4, 7):                                            # resume after k batches
        state = {"epoch": 0, "cursor": 0}
        first = CorpusStream(corpus, 1, 1, 2, state)
        for _ in range(k):
            first.batch(4)
        saved = dict(state)                                            # what a checkpoint holds
        resumed = CorpusStream(corpus, 1, 1, 2, saved)
        assert [resumed.batch(4) for _ in range(12 - k)] == batches[k:]


def test_keep_filters_rows_but_they_count_as_read(tmp_path):
    corpus = _corpus(tmp_path, [4, 4])
    state = {"epoch": 0, "cursor": 0}
    rows = CorpusStream(corpus, 0, 0, 1, state, keep=lambda r: r["id"].startswith("1.")).batch(4)
    assert sorted(r["id"] for r in rows) == ["1.0", "1.1", "1.2", "1.3"]
    assert state["epoch"] * 8 + state["cursor"] >= 8


def test_a_corpus_is_complete_only_with_its_summary(tmp_path):
    corpus = _corpus(tmp_path, [2, 3])
    assert Corpus.load(corpus.uri) == Corpus(corpus.uri, (2, 3), {})
    (Path(corpus.uri) / CORPUS_FILE).unlink()
    assert Corpus.load(corpus.uri) is None


def test_length_bucketing_pads_less_and_still_sees_every_example_once(tmp_path):
    import numpy as np

    d = tmp_path / "corpus"
    d.mkdir()
    lengths = np.random.default_rng(0).integers(5, 120, 400)
    corpus = Corpus(str(d), (200, 200))
    for p in range(2):
        pq.write_table(pa.table({"id": [f"{p}.{r}" for r in range(200)],
                                 "n": lengths[200 * p:200 * (p + 1)].tolist()}), corpus.part(p))

    def padded(bucket: int) -> tuple[int, list[str]]:
        s = CorpusStream(corpus, 0, 0, 1, {"epoch": 0, "cursor": 0}, length=lambda r: r["n"],
                         batch=8, bucket=bucket)
        batches = [s.batch(8) for _ in range(50)]                      # the whole epoch
        return (sum(8 * max(r["n"] for r in b) for b in batches),
                sorted(r["id"] for b in batches for r in b))

    plain, seen_plain = padded(1)
    bucketed, seen = padded(8)
    assert seen == seen_plain == sorted(f"{p}.{r}" for p in range(2) for r in range(200))
    assert bucketed < 0.8 * plain  # sorted runs of 8 batches: far less padding


def test_grouped_batches_hold_whole_groups_in_a_seeded_order_and_resume(tmp_path):
    """With a group key, a window's rows come group by group (groups and members shuffled by the
    seed), so batches of 6 over groups of 3 hold two whole groups each; every row still comes once
    an epoch, and a stream resumed at its cursor goes on with the same rows."""
    import numpy as np

    from fusion.pretrain.corpus import grouped_order

    order = grouped_order(["a", "b", "a", "c", "b", "a"], np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(6))
    keys = ["abacba"[i] for i in order]
    assert sum(keys[i] != keys[i + 1] for i in range(5)) == 2        # three runs: contiguous groups
    orders = {tuple(grouped_order(list("aabbccdd"), np.random.default_rng(s))) for s in range(8)}
    assert len(orders) > 4                                            # the seed decides the order

    d = tmp_path / "corpus"
    d.mkdir()
    corpus = Corpus(str(d), (60,))
    ids = [f"r{k}" for k in range(60)]
    pq.write_table(pa.table({"id": ids, "g": [f"g{k % 20}" for k in range(60)]}), corpus.part(0))

    def stream(state):
        return CorpusStream(corpus, 3, 0, 1, state, length=lambda r: 0, batch=6, bucket=8,
                            group=lambda r: r["g"])

    s = stream({"epoch": 0, "cursor": 0})
    batches = [s.batch(6) for _ in range(10)]
    assert sorted(r["id"] for b in batches for r in b) == sorted(ids)
    for b in batches:
        assert sorted(Counter(r["g"] for r in b).values()) == [3, 3]  # two whole groups
    s = stream({"epoch": 0, "cursor": 0})
    first = [s.batch(6) for _ in range(4)]
    resumed = stream(dict(s.state))
    assert [resumed.batch(6) for _ in range(6)] == batches[4:] and first == batches[:4]


def test_a_share_with_nothing_kept_is_an_error_not_an_endless_loop(tmp_path):
    corpus = _corpus(tmp_path, [4, 4])
    stream = CorpusStream(corpus, 0, 1, 2, {"epoch": 0, "cursor": 0}, keep=lambda r: False)
    with pytest.raises(StageFailed, match="none of the 4 examples of its share is kept"):
        stream.batch(2)
