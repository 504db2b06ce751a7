"""A store on a filesystem that fills up mid-run: the stage ends with one line naming it and the
store, nothing is marked complete, and once space is freed the next run reuses what finished.
The store is a small tmpfs this test mounts (it skips where it cannot mount: not root, no tmpfs)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.store import ArtifactStore

from ..conftest import stele

BIG = "X" * 1000
PIPELINE = f"""\
name: fills
stages:
  small: {{uses: test.write, with: {{text: A, parts: 2}}}}
  big: {{uses: test.write, inputs: [small], with: {{text: {BIG}, parts: 40}}}}
"""  # big writes 40 x 100 kB into a 2 MB store


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "store"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip() or made.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _last_record(store_dir: Path) -> dict:
    return json.loads(sorted((store_dir / "runs").glob("*.json"),
                             key=lambda p: p.stat().st_mtime)[-1].read_text())


@pytest.mark.slow
def test_a_full_store_fails_the_stage_in_one_line_and_the_next_run_reuses_what_finished(
        small_fs: Path, tmp_path: Path, plugin_env: dict[str, str]) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPELINE)
    args = ["run", str(pipeline), "--store", str(small_fs), "--no-live"]
    first = stele(*args, env=plugin_env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "Traceback" not in first.stdout + first.stderr
    line = next(ln for ln in first.stdout.splitlines() if ln.startswith("✖ big"))
    assert "no space left on device" in line and f"store {small_fs}" in line and "'big'" in line
    statuses = {n: s["status"] for n, s in _last_record(small_fs)["stages"].items()}
    assert statuses == {"small": "ran", "big": "failed"}
    store = ArtifactStore(small_fs)
    complete = [k for k in store.keys() if store.is_complete(k)]
    assert [store.manifest(k)["stage"] for k in complete] == ["small"]  # nothing of big
    assert len(store.keys()) == 1 and not list((small_fs / "tmp").iterdir())  # space given back

    grown = subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], capture_output=True)
    assert grown.returncode == 0, grown.stderr
    again = stele(*args, env=plugin_env, check=True)
    statuses = {n: s["status"] for n, s in _last_record(small_fs)["stages"].items()}
    assert statuses == {"small": "cached", "big": "ran"}, again.stdout
    assert all(store.verify(k) == [] for k in store.keys())
