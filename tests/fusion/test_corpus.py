"""The pretraining corpus without Ray: units of a linked-text artifact, their documents, and each
worker's stream (every example once per epoch across the workers, exact resume)."""

from __future__ import annotations

import json
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


def test_a_share_with_nothing_kept_is_an_error_not_an_endless_loop(tmp_path):
    corpus = _corpus(tmp_path, [4, 4])
    stream = CorpusStream(corpus, 0, 1, 2, {"epoch": 0, "cursor": 0}, keep=lambda r: False)
    with pytest.raises(StageFailed, match="none of the 4 examples of its share is kept"):
        stream.batch(2)
