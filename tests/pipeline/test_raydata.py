"""pipeline.raydata.stream_map: every row through the actors once, one model call at a time."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest


class Recorder:
    """An actor that notices when two of its calls overlap (the stage's featurizers are not
    thread-safe: one torch model, one set of buffers)."""

    def __init__(self) -> None:
        self.busy = threading.Lock()

    def __call__(self, batch: pa.Table) -> pa.Table:
        alone = self.busy.acquire(blocking=False)
        time.sleep(0.05)  # long enough for a second call in flight to start, were it allowed
        if alone:
            self.busy.release()
        return pa.table({"id": batch["id"], "alone": [alone] * batch.num_rows})


@pytest.fixture
def asked(monkeypatch) -> dict:
    """The keyword arguments stream_map passes to Ray Data's actor pool (filled when it runs)."""
    import ray.data

    kwargs: dict = {}
    pool = ray.data.ActorPoolStrategy

    def spy(**kw):
        kwargs.update(kw)
        return pool(**kw)

    monkeypatch.setattr(ray.data, "ActorPoolStrategy", spy)
    return kwargs


def test_stream_map_returns_every_row_once_and_never_runs_two_calls_at_once(
        ray_local: None, asked: dict) -> None:
    """With two Ray tasks per actor (asked of Ray Data's actor pool), the rows all come back once
    and no call overlaps another."""
    from pipeline.raydata import stream_map

    ids = [f"item{i}" for i in range(40)]
    tables = [pa.table({"id": ids[i:i + 8]}) for i in range(0, 40, 8)]
    out = pa.concat_tables(stream_map(iter(tables), Recorder, actors=1, batch_size=4,
                                      calls_per_actor=2))
    assert asked["max_concurrent_calls_per_actor"] == asked["max_tasks_in_flight_per_actor"] == 2
    assert sorted(out["id"].to_pylist()) == sorted(ids)
    assert all(out["alone"].to_pylist()), "two calls of one actor ran at once"


def test_stream_map_starts_no_more_actors_than_there_are_blocks(ray_local: None, asked: dict) -> None:
    """Two blocks, four actors asked: two start (a third would only pay its start-up)."""
    from pipeline.raydata import stream_map

    tables = [pa.table({"id": ["a", "b"]}), pa.table({"id": ["c"]})]
    out = pa.concat_tables(stream_map(iter(tables), Recorder, actors=4, batch_size=2))
    assert asked["size"] == 2
    assert sorted(out["id"].to_pylist()) == ["a", "b", "c"]



class SlowFirst:
    """An actor whose call on the first block waits until the consumer has received an output
    (a file is the signal), or at most ``guard`` seconds: in completion order the second block's
    output is received first; in input order nothing is received before the guard runs out."""

    def __init__(self, gate: str, guard: float) -> None:
        self.gate, self.guard = gate, guard

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pathlib import Path

        if batch["id"][0].as_py() == "a0":
            deadline = time.monotonic() + self.guard
            while not Path(self.gate).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return pa.table({"id": batch["id"]})


def test_stream_map_yields_in_input_order_when_a_later_block_finishes_first(
        ray_local: None, tmp_path) -> None:
    """Two actors, one block each, the first block's call held back until an output has been
    received: the output still comes in the input order (feature shards are then the same file on
    every run; in completion order their rows, and so a model's batches, changed from run to run).
    The guard only bounds the test's time: input order holds however long it is."""
    from pipeline.raydata import stream_map

    tables = [pa.table({"id": ["a0", "a1"]}), pa.table({"id": ["b0", "b1"]})]
    gate = tmp_path / "received"
    ids: list[str] = []
    for out in stream_map(iter(tables), SlowFirst, fn_kwargs={"gate": str(gate), "guard": 20.0},
                          actors=2, cpus_per_actor=0.5, batch_size=2, calls_per_actor=1):
        ids += out["id"].to_pylist()
        gate.touch()
    assert ids == ["a0", "a1", "b0", "b1"]
