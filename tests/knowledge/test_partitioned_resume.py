"""Partitioned KG training killed and resumed (knowledge/partitioned_state.py; issue 23): a run
killed after some buckets, between a write-back and its progress record or half-way through a
promotion resumes bit-identical to an uninterrupted one; buckets are written once per state and
another run's state is refused; the knowledge.embed stage with ``partitions`` killed twice and run
again ends with an uninterrupted run's artifact."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from knowledge.partitioned import (RELATIONS, PartitionedJob, Partitioning, PartitionStore, part_file,
                                   write_buckets)
from knowledge.partitioned_state import train_bucket, train_partitioned
from tests.knowledge.test_embed import kg_of
from tests.knowledge.test_partitioned import _ctx, _grid, _job, _random, _saved, _uri


class Killed(RuntimeError):
    """What the test hooks raise: the process dies at that point."""


def _without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_s"} for row in history]


def _state(job: PartitionedJob, p: int) -> dict[str, dict[str, torch.Tensor]]:
    store = PartitionStore(job.state_uri)
    return {name: store.load(name) for name in [part_file(q) for q in range(p)] + [RELATIONS]}


def _assert_same_state(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)


def _kill_after(monkeypatch: pytest.MonkeyPatch, calls: int | None) -> list[tuple[int, int]]:
    """Bucket number ``calls + 1`` of this call dies before it trains (None: none dies); returns
    the list of buckets started, the dying one included."""
    import knowledge.partitioned_state as module

    started: list[tuple[int, int]] = []

    def hook(job, bucket, *args):  # noqa: ANN001, ANN002, ANN202
        started.append(bucket)
        if calls is not None and len(started) > calls:
            raise Killed(f"killed after {calls} buckets")
        return train_bucket(job, bucket, *args)  # the module's own, not an earlier hook

    monkeypatch.setattr(module, "train_bucket", hook)
    return started


class _Grid:
    """A 6 x 6 grid in 3 partitions, TransE jobs on fresh states; two workers run on local folders,
    their rounds in this process (the Ray path's results equal these:
    test_ray_workers_equal_the_in_process_rounds)."""

    def __init__(self, tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch):
        import knowledge.partitioned_state as module

        self.tmp, self.workers = tmp_path, workers
        kg = kg_of(_grid(6), 36, 2)
        self.kg_uri = _saved(kg)
        self.parts = Partitioning.by_hash(kg.entity_ids(), 3)
        if workers > 1:
            local = module.run_tasks
            monkeypatch.setattr(module, "run_tasks", lambda fn, calls, w, cpus=1.0: local(fn, calls, 1))

    def job(self, name: str) -> PartitionedJob:
        job = _job(str(self.tmp / name) if self.workers > 1 else f"memory://partitioned-test/{name}"
                   f"-{self.tmp.name}", 36, 2)
        self.counts = write_buckets(self.kg_uri, job.buckets_uri, self.parts)
        return job

    def train(self, job: PartitionedJob, epochs: int = 3) -> list[dict]:
        return train_partitioned(job, self.parts, self.counts, epochs, workers=self.workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_killed_after_k_buckets_resumes_bit_identical(workers: int, tmp_path: Path, one_thread: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Three epochs straight, or killed after 4 buckets (epoch 1; with two workers half-way into a
    round of two), resumed and killed again 7 buckets later (epoch 2), resumed to the end: the same
    partitions and relations bit for bit, the same history (losses, buckets, rounds), and each
    resumed call trains only the buckets after the last committed round (one worker: exactly the
    rest; two: the killed round's first bucket again at most). A finished state returns its
    history without training."""
    grid = _Grid(tmp_path, workers, monkeypatch)
    started = _kill_after(monkeypatch, None)
    job_a = grid.job("straight")
    hist_a = grid.train(job_a)
    total = len(started)
    assert total == sum(h["buckets"] for h in hist_a) and len(hist_a) == 3
    if workers > 1:
        assert max(h["rounds"] for h in hist_a[1:]) < hist_a[1]["buckets"]  # rounds of two buckets

    job_b = grid.job("killed")
    trained = 0
    for k in (4, 7):
        started = _kill_after(monkeypatch, k)
        with pytest.raises(Killed):
            grid.train(job_b)
        trained += k
    assert len(_state_history(job_b)) == 1  # the kills landed in epoch 2, after epoch 1's row
    started = _kill_after(monkeypatch, None)
    hist_b = grid.train(job_b)
    assert total <= trained + len(started) <= total + 2 * (workers - 1)
    assert _without_time(hist_b) == _without_time(hist_a)
    _assert_same_state(_state(job_b, 3), _state(job_a, 3))
    store = PartitionStore(job_b.state_uri)
    assert not store.exists("staging")
    started = _kill_after(monkeypatch, 0)  # nothing may train now
    assert _without_time(grid.train(job_b)) == _without_time(hist_a) and started == []


def _state_history(job: PartitionedJob) -> list[dict]:
    """The history in the state's progress record."""
    from knowledge.partitioned_state import PROGRESS, _metadata

    store = PartitionStore(job.state_uri)
    return json.loads(_metadata(store.fs.cat_file(store.path(PROGRESS)))["progress"])["history"]


@pytest.mark.parametrize("where", ["before_record", "mid_promotion"])
def test_a_kill_between_write_back_and_record_or_mid_promotion_stays_bit_identical(
        where: str, tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after round 5's partitions are written (staged) but before its progress record, or
    after the record while its two staged partitions are renamed into place, one renamed and one
    not: the resumed run ends with the uninterrupted run's partitions, relations and history."""
    from knowledge.partitioned_state import PROGRESS, STAGING

    grid = _Grid(tmp_path, 2, monkeypatch)
    job_a = grid.job("straight")
    hist_a = grid.train(job_a)
    job_b = grid.job("killed")
    store = PartitionStore(job_b.state_uri)
    records: list[int] = []
    real_save, real_mv = PartitionStore.save, store.fs.mv

    def save(self, name, tensors, metadata=None):  # noqa: ANN001, ANN202
        if name == PROGRESS:
            records.append(1)
            if where == "before_record" and len(records) == 6:  # the initial record, then rounds 1..5
                raise Killed("killed before the progress record")
        return real_save(self, name, tensors, metadata)

    moved: list[str] = []

    def mv(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if f"/{STAGING}/" in src and ".tmp-" not in src:
            moved.append(src)
            folder = src.rsplit("/", 1)[0]
            if where == "mid_promotion" and len(records) >= 6 and len(moved) > 1 \
                    and moved[-2].rsplit("/", 1)[0] == folder:
                raise Killed("killed between two renames of a promotion")
        return real_mv(src, dst, *args, **kwargs)

    monkeypatch.setattr(PartitionStore, "save", save)
    monkeypatch.setattr(store.fs, "mv", mv)
    with pytest.raises(Killed):
        grid.train(job_b)
    monkeypatch.setattr(PartitionStore, "save", real_save)
    monkeypatch.setattr(store.fs, "mv", real_mv)
    staged = store.fs.find(store.path(STAGING))
    assert [s for s in staged if ".tmp-" not in s], "the kill should leave staged partitions behind"
    started = _kill_after(monkeypatch, None)
    hist_b = grid.train(job_b)
    assert _without_time(hist_b) == _without_time(hist_a)
    _assert_same_state(_state(job_b, 3), _state(job_a, 3))
    assert len(started) < sum(h["buckets"] for h in hist_a)  # resumed, not started over


def test_buckets_are_written_once_per_state_and_another_runs_state_is_refused(
        one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """ensure_buckets writes the bucket files once: a second call reads the counts from the
    completion marker; a set without its marker (a killed write) or for another partitioning is
    written again. A state trained with other settings is refused in one line, not mixed in."""
    import knowledge.partitioned_state as module
    from knowledge.partitioned_state import BUCKETS_DONE, ensure_buckets

    kg = kg_of(_grid(6), 36, 2)
    kg_uri = _saved(kg)
    parts = Partitioning.by_hash(kg.entity_ids(), 3)
    out = _uri()
    calls: list[int] = []
    real = module.write_buckets

    def spy(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(module, "write_buckets", spy)
    first = ensure_buckets(kg_uri, out, parts)
    again = ensure_buckets(kg_uri, out, parts)
    assert len(calls) == 1 and (first == again).all() and first.sum() == len(_grid(6))
    PartitionStore(out).fs.rm(PartitionStore(out).path(BUCKETS_DONE))
    assert (ensure_buckets(kg_uri, out, parts) == first).all() and len(calls) == 2
    other = Partitioning.by_hash(kg.entity_ids(), 3, seed=1)
    ensure_buckets(kg_uri, out, other)
    assert len(calls) == 3
    root = _uri()
    job = _job(root, 36, 2)
    counts = write_buckets(kg_uri, job.buckets_uri, parts)
    train_partitioned(job, parts, counts, 1)
    with pytest.raises(ValueError, match="belongs to another run"):
        train_partitioned(dataclasses.replace(job, lr=0.1), parts, counts, 1)


def test_stage_with_partitions_resumes_a_killed_run(tmp_path: Path, one_thread: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``knowledge.embed`` with ``partitions: 3`` killed after 12 buckets (in epoch 2; memory://
    state), run again and killed in the last epoch's validation (every bucket trained and
    committed), run a third time: the buckets are written once, every bucket after the first kill's
    last committed one trains once, the third run trains none (it validates the last epoch again),
    and the artifact (tables, partition files, history with the validation MRR of every epoch,
    metrics) equals an uninterrupted run's, timings aside."""
    from safetensors.torch import load_file

    import knowledge.partitioned_eval as evaluation
    import knowledge.partitioned_state as module
    from knowledge.stages.embed import EmbedParams, embed

    n, r = 30, 3
    split = ["valid" if i % 10 == 0 else "train" for i in range(200)]
    kg = kg_of(_random(n, r, 200, seed=2), n, r, split)
    params = EmbedParams(model="distmult", dim=8, epochs=3, eval_every=1, patience=0, lr=0.1,
                         optimizer="rowwise_adagrad", partitions=3)
    straight = _ctx(tmp_path / "straight", kg, _uri())
    want = embed(straight, params)
    ctx = _ctx(tmp_path / "killed", kg, _uri())
    _kill_after(monkeypatch, 12)
    with pytest.raises(Killed):
        embed(ctx, params)
    writes: list[int] = []
    real = module.write_buckets
    monkeypatch.setattr(module, "write_buckets", lambda *a: writes.append(1) or real(*a))
    evaluated: list[int] = []
    real_eval = evaluation.sharded_rank_metrics

    def dies_at_the_second(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        evaluated.append(1)
        if len(evaluated) == 2:  # epoch 3's validation (epoch 2's is the first of this run)
            raise Killed("killed in the last validation")
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(evaluation, "sharded_rank_metrics", dies_at_the_second)
    started = _kill_after(monkeypatch, None)
    with pytest.raises(Killed):
        embed(ctx, params)
    assert len(started) == 3 * want["buckets"] - 12
    monkeypatch.setattr(evaluation, "sharded_rank_metrics", real_eval)
    started = _kill_after(monkeypatch, None)
    got = embed(ctx, params)
    assert writes == [] and started == []
    assert {k: v for k, v in got.items() if k != "train_loop_s"} == \
        {k: v for k, v in want.items() if k != "train_loop_s"}
    hist = json.loads((ctx.out / "history.json").read_text())
    assert _without_time(hist) == _without_time(json.loads((straight.out / "history.json").read_text()))
    assert all("valid_mrr" in h for h in hist)
    for name in ["embeddings.safetensors"] + [f"partitions/{part_file(p)}" for p in range(3)] + \
            [f"partitions/{RELATIONS}"]:
        a, b = load_file(str(ctx.out / name)), load_file(str(straight.out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
