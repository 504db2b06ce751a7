"""A store shared by several runs at once: one maker per artifact, the others wait and reuse it."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from pipeline.store import ArtifactStore

from ..conftest import STELE
from .test_kill import PIPELINE, check_store, expected_outputs


def test_lock_makes_a_second_maker_wait_until_the_first_is_done(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    key = "ab" * 32
    holding, waited, release = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with store.lock(key):
            holding.set()
            release.wait()
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    holding.wait()

    def on_wait() -> None:  # the second maker found the lock held: let the first one finish
        waited.set()
        release.set()

    with store.lock(key, on_wait=on_wait):
        order.append("second in")
    t.join()
    assert waited.is_set() and order == ["first done", "second in"]
    with store.lock(key, on_wait=lambda: pytest.fail("nobody holds it now")):
        pass


@pytest.mark.slow
def test_two_runs_of_one_pipeline_on_one_store_at_once(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPELINE.replace("sleep: 0.1}", "sleep: 0.5}"))
    store_dir = tmp_path / "store"
    args = [STELE, "run", str(pipeline), "--store", str(store_dir), "--set", "a.text=S", "--no-live"]
    procs = [subprocess.Popen(args, env=plugin_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    records = [json.loads(p.read_text()) for p in (store_dir / "runs").glob("*.json")]
    assert len(records) == 2
    for name in "abcdef":
        statuses = sorted(r["stages"][name]["status"] for r in records)
        # Made by exactly one run; the other reused it (seen at planning, or after waiting).
        assert statuses == ["cached", "ran"], (name, statuses, outs)
    complete = check_store(ArtifactStore(store_dir), expected_outputs("S"))  # whole and right
    assert set(complete) == set("abcdef")
    assert len(ArtifactStore(store_dir).keys()) == 6  # written once each: no second copy
    assert not list((store_dir / "tmp").glob("*")) and not (store_dir / "failed").exists()
