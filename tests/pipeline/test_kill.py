"""kill -9 of the runner at many moments: finished stages are reused, interrupted ones re-run, and no
artifact is ever half-written yet marked complete."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.store import ArtifactStore

from ..conftest import STELE, stele

# Every wait below is for a state (stages committed, processes gone); this bound only turns a hang
# into a failure, and is generous because a loaded 2-core machine stretches Ray's start and stop.
PATIENCE = 600.0  # seconds

PIPELINE = """\
name: killme
stages:
  a: {uses: test.write, with: {text: A, parts: 4, sleep: 0.15}}
  b: {uses: test.write, with: {text: B, parts: 4, sleep: 0.2}}
  c: {uses: test.write, inputs: [a, b], with: {text: C, parts: 3, sleep: 0.1}}
  d: {uses: test.write, inputs: [c], with: {text: D, parts: 3, sleep: 0.1}}
  e: {uses: test.write, inputs: [a], with: {text: E, parts: 2, sleep: 0.1}}
  f: {uses: test.write, inputs: [d, e], with: {text: F, parts: 2, sleep: 0.1}}
"""
INPUTS = {"a": [], "b": [], "c": ["a", "b"], "d": ["c"], "e": ["a"], "f": ["d", "e"]}


def expected_outputs(root: str) -> dict[str, str]:
    """What each stage's out.txt must hold (mirrors stele_testplugin.expected)."""
    out: dict[str, str] = {}
    for name in "abcdef":
        text = root if name == "a" else name.upper()
        out[name] = text + "".join(f"<{out[u]}>" for u in sorted(INPUTS[name]))
    return out


def check_store(store: ArtifactStore, expected: dict[str, str]) -> dict[str, str]:
    """Every artifact that looks complete is whole and right (its out.txt follows from its own
    parameters and its inputs' out.txt). Returns stage -> key of this round's complete ones."""
    complete = {}
    for key in store.keys():
        if not store.is_complete(key):
            continue  # a folder without manifest is an unfinished commit: never used as an input
        assert store.verify(key) == [], key
        m = store.manifest(key)
        art = store.open(key)
        upstream = "".join(f"<{(store.open(k) / 'out.txt').read_text()}>"
                           for _, k in sorted(m["inputs"].items()))
        out = (art / "out.txt").read_text()
        assert out == m["params"]["text"] + upstream, m["stage"]
        for i in range(m["params"]["parts"]):
            assert (art / f"part{i}.txt").stat().st_size == 100 * len(m["params"]["text"])
        if out == expected[m["stage"]]:
            complete[m["stage"]] = key
    return complete


def _session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session: the runner and every Ray process it started,
    workers included (they get process groups of their own, but keep the session)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill what the killed runner left (Ray's agents can outlive it) and wait until it is gone,
    so that no stray worker commits after we looked."""
    proc.wait()
    deadline = time.monotonic() + PATIENCE
    while (pids := _session_processes(proc.pid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert not _session_processes(proc.pid)


@pytest.mark.slow
def test_kill_minus_9_at_random_moments(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    rng = random.Random(1234)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPELINE)
    store_dir = tmp_path / "store"
    store = ArtifactStore(store_dir)
    kills = 0
    # 6 rounds, each with a fresh root text (so every stage has work again), 4 kills per round
    # at growing random moments, then an uninterrupted run that must finish the round.
    for rnd in range(6):
        root = f"R{rnd}"
        expected = expected_outputs(root)
        args = ["run", str(pipeline), "--store", str(store_dir), "--set", f"a.text={root}",
                "--no-live"]
        for k in range(4):
            delay = rng.uniform(0.5, 3.0) + 1.2 * k
            proc = subprocess.Popen([STELE, *args], env=plugin_env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the runner itself
                kills += 1
            check_store(store, expected)  # right after the kill...
            _kill_session(proc)
            check_store(store, expected)  # ...and once stray workers are gone
        before = check_store(store, expected)
        proc = stele(*args, env=plugin_env, check=True)
        record = json.loads(sorted((store_dir / "runs").glob("*.json"),
                                   key=lambda p: p.stat().st_mtime)[-1].read_text())
        after = check_store(store, expected)
        assert set(after) == set("abcdef"), proc.stdout
        for name, st in record["stages"].items():
            # Completed before: reused (cached). Not completed: run now.
            assert st["status"] == ("cached" if name in before else "ran"), (name, proc.stdout)
            assert before.get(name, after[name]) == after[name]
    assert kills >= 20


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    pipeline = tmp_path / "p.yaml"
    gate = tmp_path / "gate"  # f finishes only once it exists: the run cannot end before Ctrl-C
    pipeline.write_text(PIPELINE.replace("sleep: 0.1}", "sleep: 0.6}")  # c, d, e, f: seconds each
                        .replace("text: F, parts: 2,", f"text: F, parts: 2, wait_for: {gate},"))
    store_dir = tmp_path / "store"
    store = ArtifactStore(store_dir)
    args = ["run", str(pipeline), "--store", str(store_dir), "--set", "a.text=C1", "--no-live"]
    # SIGINT as a terminal leaves it: a test run in a background job (`nohup pytest &`) inherits
    # SIGINT ignored, and a runner that ignores it would never see the Ctrl-C.
    proc = subprocess.Popen([STELE, *args], env=plugin_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + PATIENCE
    while not (store_dir / "artifacts").exists() or len(check_store(store, expected_outputs("C1"))) < 2:
        if proc.poll() is not None:  # say why: its own output
            pytest.fail(f"the run ended before Ctrl-C (exit {proc.returncode}): {proc.communicate()}")
        assert time.monotonic() < deadline, "no two stages finished in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130, (out, err)
    assert "interrupted: finished stages are kept" in err
    record = json.loads(sorted((store_dir / "runs").glob("*.json"),
                               key=lambda p: p.stat().st_mtime)[-1].read_text())
    statuses = {n: s["status"] for n, s in record["stages"].items()}
    assert "interrupted" in statuses.values(), statuses
    before = check_store(store, expected_outputs("C1"))
    # What the record calls ran is complete (a stage may also have committed just as Ctrl-C came).
    assert {n for n, s in statuses.items() if s == "ran"} <= set(before), (statuses, before)
    # Ctrl-C takes Ray down with the runner: nothing of the run is left behind.
    deadline = time.monotonic() + PATIENCE
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session_processes(proc.pid)

    gate.touch()
    again = stele(*args, env=plugin_env, check=True)
    record = json.loads(sorted((store_dir / "runs").glob("*.json"),
                               key=lambda p: p.stat().st_mtime)[-1].read_text())
    after = check_store(store, expected_outputs("C1"))
    assert set(after) == set("abcdef"), again.stdout
    for name, st in record["stages"].items():
        assert st["status"] == ("cached" if name in before else "ran"), (name, again.stdout)


@pytest.mark.slow
def test_kill_minus_9_takes_ray_down_with_the_runner(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    """No process of a run outlives a kill -9 of its runner: before pipeline.reaper, Ray's
    DashboardAgent and RuntimeEnvAgent lived on for ever."""
    pipeline = tmp_path / "p.yaml"
    # f waits for a file that never comes: the run is still going when it is killed.
    pipeline.write_text(PIPELINE.replace("text: F, parts: 2,", f"text: F, parts: 2, wait_for: "
                                         f"{tmp_path / 'never'},"))
    store_dir = tmp_path / "store"
    output = tmp_path / "output.txt"
    with open(output, "w") as out:
        proc = subprocess.Popen([STELE, "run", str(pipeline), "--store", str(store_dir), "--no-live"],
                                env=plugin_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + PATIENCE
    # Wait until stages run: Ray, its agents and stage workers are all up by then.
    while not list((store_dir / "tmp").glob("*")) or len(ArtifactStore(store_dir).keys()) < 2:
        assert proc.poll() is None, f"the run ended before the kill: {output.read_text()}"
        assert time.monotonic() < deadline, f"no two stages finished in time: {output.read_text()}"
        time.sleep(0.05)
    assert len(_session_processes(proc.pid)) > 3  # the runner and Ray's processes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # A state, not a time: wait (with a generous bound for a loaded machine) until all are gone.
    deadline = time.monotonic() + PATIENCE
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = [Path(f"/proc/{p}/comm").read_text().strip() for p in left if Path(f"/proc/{p}").exists()]
    _kill_session(proc)
    assert not left, names
