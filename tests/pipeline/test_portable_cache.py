"""A portable cache: keys name paths relative to the pipeline, $STELE_DATA or the working directory,
and local files by content, so two clones of one commit share every cache entry."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from pipeline.fingerprint import files_fingerprint, path_roots, portable

from ..conftest import stele


def test_portable_writes_paths_under_the_roots_relative_to_them(tmp_path: Path) -> None:
    pipe, data = tmp_path / "clone" / "pipelines", tmp_path / "data"
    params = {"sources": [{"path": f"{pipe}/data/kg.tsv"}, {"path": f"{data}/wn"}],
              "other": f"{tmp_path}/elsewhere", "name": "clone", "n": 3, "sub": str(pipe)}
    with path_roots({"pipeline": pipe, "data": data, "cwd": None}):
        got = portable(params)
    assert got == {"sources": [{"path": "{pipeline}/data/kg.tsv"}, {"path": "{data}/wn"}],
                   "other": f"{tmp_path}/elsewhere", "name": "clone", "n": 3, "sub": "{pipeline}"}
    with path_roots({"data": tmp_path, "pipeline": pipe}):  # the longest root wins
        assert portable(f"{pipe}/x") == "{pipeline}/x"
    assert portable(f"{pipe}/x") == f"{pipe}/x"  # outside the block: as written
    assert portable(f"{pipe}x/y") == f"{pipe}x/y"  # a sibling folder is not under the root


def test_files_are_fingerprinted_by_content_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x.tsv").write_text("h\tr\tt\n")
    shutil.copytree(a, b)
    os.utime(b / "x.tsv", (1_000_000, 1_000_000))  # another modification time, same content
    assert files_fingerprint([a / "x.tsv"], root=a) == files_fingerprint([b / "x.tsv"], root=b)
    rows = sqlite3.connect(tmp_path / "cache" / "stele" / "file-hashes.sqlite").execute(
        "SELECT path FROM hashes").fetchall()
    assert sorted(r[0] for r in rows) == [str(a / "x.tsv"), str(b / "x.tsv")]  # read once each
    (b / "x.tsv").write_text("h\tr\tT\n")  # same size, other content
    assert files_fingerprint([a / "x.tsv"], root=a) != files_fingerprint([b / "x.tsv"], root=b)


PIPELINE = """\
name: portable
stages:
  snap: {uses: core.snapshot, with: {path: !path data}}
  kg:
    uses: knowledge.ingest
    with: {sources: [{type: triples, path: !path data/kg.tsv}]}
  w: {uses: test.write, with: {text: W}}
"""


@pytest.mark.slow
def test_two_clones_of_one_commit_share_every_cache_entry(tmp_path: Path,
                                                          plugin_env: dict[str, str]) -> None:
    a = tmp_path / "clone-a"
    (a / "pipelines" / "data").mkdir(parents=True)
    (a / "pipelines" / "p.yaml").write_text(PIPELINE)
    (a / "pipelines" / "data" / "kg.tsv").write_text(
        "".join(f"e{i}\tr{i % 2}\te{(i * 7 + 1) % 13}\n" for i in range(30)))
    b = tmp_path / "clone-b"
    shutil.copytree(a, b)  # a fresh checkout: same bytes, new paths, new modification times
    for f in (b / "pipelines" / "data").iterdir():
        os.utime(f, (2_000_000, 2_000_000))
    env = dict(plugin_env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    store = tmp_path / "store"
    stele("run", "pipelines/p.yaml", "--store", str(store), "--no-live", env=env, cwd=a, check=True)
    plan = stele("plan", "pipelines/p.yaml", "--store", str(store), env=env, cwd=b, check=True).stdout
    assert plan.count("cached") == 3 and " run " not in plan, plan
    (b / "pipelines" / "data" / "kg.tsv").write_text("x\tr0\ty\n" * 30)  # edited in clone b only
    plan = stele("plan", "pipelines/p.yaml", "--store", str(store), env=env, cwd=b, check=True).stdout
    assert plan.count(" run ") == 2 and plan.count("cached") == 1, plan  # snapshot and graph


def test_files_a_package_ships_key_the_same_from_any_venv(tmp_path: Path) -> None:
    """A venv inside the clone (the README's .venv) or elsewhere, Python 3.11 or 3.12: a file that an
    installed package ships is keyed relative to site-packages, not to the working directory."""
    import sysconfig

    import pytest as pkg

    from pipeline.runner import key_roots
    from pipeline.spec import Pipeline

    roots = key_roots(Pipeline(path=None, source="<string>", name="p", store=None, stages={}))
    assert roots["packages"] == sysconfig.get_paths()["purelib"]
    shipped = str(Path(pkg.__file__).resolve())
    with path_roots(roots):
        key = portable({"path": shipped})
    assert key["path"].startswith(("{packages}/", "{platpackages}/")), key
    assert key["path"].endswith("/pytest/__init__.py")
    # two venvs, one inside a clone (under cwd) and one elsewhere with another Python
    a = tmp_path / "clone" / ".venv" / "lib" / "python3.11" / "site-packages"
    b = tmp_path / "venvs" / "py312" / "lib" / "python3.12" / "site-packages"
    with path_roots({"cwd": tmp_path / "clone", "packages": a}):
        in_a = portable(f"{a}/countryinfo/data/france.json")
    with path_roots({"cwd": tmp_path / "other", "packages": b}):
        in_b = portable(f"{b}/countryinfo/data/france.json")
    assert in_a == in_b == "{packages}/countryinfo/data/france.json"
