"""The `stele` console script as a user types it: run, plan, show, stages, errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import stele

PIPE = """\
name: cli
stages:
  a: {uses: test.write, with: {text: A}}
  b: {uses: test.write, inputs: [a], with: {text: B}}
  c: {uses: test.write, inputs: [a], with: {text: C, fail: true}}
"""


@pytest.mark.slow
def test_run_plan_show_roundtrip(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(PIPE)
    store = tmp_path / "store"

    plan = stele("plan", str(p), "--store", str(store), env=plugin_env, check=True).stdout
    assert plan.count(" run ") == 3 and "not in store" in plan
    assert not (store / "artifacts").exists()  # plan runs nothing

    run = stele("run", str(p), "--store", str(store), "--no-live", env=plugin_env)
    assert run.returncode == 1  # a stage failed
    assert "cli: 2 ran, 1 failed" in run.stdout
    assert "✖ c [test.write] ValueError: asked to fail (text='C')" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr  # the stage's error, not a wrapper dump

    plan = stele("plan", str(p), "--store", str(store), env=plugin_env, check=True).stdout
    assert plan.count("cached") == 2 and plan.count(" run ") == 1

    # STELE_STORE selects the store too; show prints the manifest by key prefix.
    env = dict(plugin_env, STELE_STORE=str(store))
    keys = sorted((store / "artifacts").iterdir())
    shown = stele("show", keys[0].name[:10], "--verify", env=env, check=True).stdout
    manifest = json.loads(shown[: shown.rindex("}") + 1])
    assert manifest["key"] == keys[0].name and "verified" in shown
    assert stele("show", "zzzzzzzz", env=env).returncode == 2

    stages = stele("stages", env=plugin_env, check=True).stdout
    assert "test.write" in stages and "core.snapshot" in stages and "sleep" in stages

    bad = stele("run", str(p), "--store", str(store), "--set", "a.nope=1", env=plugin_env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--set: a.nope=1: unknown parameter 'nope'" in bad.stderr
    bad = stele("run", str(p), "--store", str(store), "--force", "zz", env=plugin_env)
    assert bad.returncode == 2 and "unknown stage 'zz'" in bad.stderr


def test_snapshot_stage_tracks_file_content(tmp_path: Path, plugin_env: dict[str, str],
                                            ray_local: None) -> None:
    """core.snapshot: edited data re-runs the stage although no parameter changed."""
    from pipeline.errors import SpecError
    from pipeline.runner import run
    from pipeline.spec import parse_pipeline
    from pipeline.store import ArtifactStore

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "x.txt").write_text("one")
    (data / "sub" / "y.csv").write_text("a,b\n")
    spec = f"stages:\n  snap: {{uses: core.snapshot, with: {{path: {data}}}}}\n"
    store = ArtifactStore(tmp_path / "store")
    r1 = run(parse_pipeline(spec), store, live=False)
    art = store.open(r1.outcomes["snap"].key)
    assert (art / "files" / "sub" / "y.csv").read_text() == "a,b\n"
    checks = json.loads((art / "checksums.json").read_text())
    assert set(checks) == {"x.txt", "sub/y.csv"} and art.metrics == {"files": 2, "bytes": 7}
    assert run(parse_pipeline(spec), store, live=False).outcomes["snap"].status == "cached"
    (data / "x.txt").write_text("two!")
    r3 = run(parse_pipeline(spec), store, live=False)
    assert r3.outcomes["snap"].status == "ran" and r3.outcomes["snap"].key != r1.outcomes["snap"].key
    missing = f"stages:\n  snap: {{uses: core.snapshot, with: {{path: {tmp_path / 'nope'}}}}}\n"
    with pytest.raises(SpecError, match=r"<string>:2: stages.snap.with: .*nope does not exist"):
        run(parse_pipeline(missing), store, live=False)  # found while planning: nothing runs
