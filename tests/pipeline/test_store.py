"""Artifact store: content keys, manifest-last commits, verification, remote (fsspec) stores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import StoreError
from pipeline.store import MANIFEST, ArtifactStore, artifact_key


def test_key_is_canonical_and_sensitive() -> None:
    k = artifact_key("t.x", "1", {"a": 1, "b": [1, 2]}, {"in": "k1"})
    assert k == artifact_key("t.x", "1", {"b": [1, 2], "a": 1}, {"in": "k1"})  # order-free
    others = [
        artifact_key("t.y", "1", {"a": 1, "b": [1, 2]}, {"in": "k1"}),
        artifact_key("t.x", "2", {"a": 1, "b": [1, 2]}, {"in": "k1"}),
        artifact_key("t.x", "1", {"a": 2, "b": [1, 2]}, {"in": "k1"}),
        artifact_key("t.x", "1", {"a": 1, "b": [2, 1]}, {"in": "k1"}),
        artifact_key("t.x", "1", {"a": 1, "b": [1, 2]}, {"in": "k2"}),
        artifact_key("t.x", "1", {"a": 1, "b": [1, 2]}, {"in": "k1"}, fingerprint="f"),
    ]
    assert len({k, *others}) == 7
    assert len(k) == 64


def _work(store: ArtifactStore, key: str) -> Path:
    w = store.new_work_dir(key)
    (w / "sub").mkdir()
    (w / "a.txt").write_text("hello")
    (w / "sub" / "b.bin").write_bytes(b"\0" * 100)
    return w


def test_commit_moves_into_place_manifest_last(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    key = "ab" * 32
    assert not store.is_complete(key)
    w = _work(store, key)
    assert store.commit(key, w, {"stage": "x", "metrics": {"m": 1}})
    assert not w.exists()
    art = store.open(key)
    assert (art / "a.txt").read_text() == "hello"
    assert art.manifest["files"] == {"a.txt": 5, "sub/b.bin": 100}
    assert art.metrics == {"m": 1} and art.manifest["key"] == key
    assert store.verify(key) == []
    assert store.resolve(key[:8]) == key and store.resolve(str(art.path)) == key
    # A second commit of the same key (a concurrent run) is discarded, the first one stays.
    w2 = _work(store, key)
    assert not store.commit(key, w2, {"stage": "y"})
    assert store.manifest(key)["stage"] == "x" and not w2.exists()


def test_folder_without_manifest_is_not_complete_and_is_replaced(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    key = "cd" * 32
    final = Path(store.artifact_path(key))
    final.mkdir(parents=True)
    (final / "half.txt").write_text("killed between rename and manifest")
    assert not store.is_complete(key)
    assert store.commit(key, _work(store, key), {"stage": "x"})
    assert not (final / "half.txt").exists() and store.is_complete(key)


def test_verify_detects_damage(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    key = "ef" * 32
    store.commit(key, _work(store, key), {})
    art = store.open(key)
    (art / "sub" / "b.bin").write_bytes(b"\0" * 10)
    (art / "a.txt").unlink()
    assert sorted(store.verify(key)) == ["a.txt: missing", "sub/b.bin: 10 bytes, manifest says 100"]


def test_clean_tmp_removes_only_dead_processes_work(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    mine = store.new_work_dir("11" * 32)
    dead = mine.parent / mine.name.replace(f".{os.getpid()}.", ".999999999.")
    dead.mkdir()
    assert store.clean_tmp() == 1
    assert mine.exists() and not dead.exists()


def test_resolve_errors(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    for key in ("abcdef1" + "0" * 57, "abcdef2" + "0" * 57):
        store.commit(key, _work(store, key), {})
    with pytest.raises(StoreError, match="ambiguous"):
        store.resolve("abcdef")
    with pytest.raises(StoreError, match="too short"):
        store.resolve("abc")
    with pytest.raises(StoreError, match="no artifact"):
        store.resolve("ffffff")
    with pytest.raises(StoreError, match="no complete artifact"):
        store.manifest("f" * 64)


def test_remote_fsspec_store_roundtrip(tmp_path: Path) -> None:
    """Any fsspec URI works: memory:// stands in for s3:// here (same code path: put, then manifest)."""
    store = ArtifactStore("memory://stele-test-store")
    assert not store.local
    key = "12" * 32
    store.commit(key, _work(store, key), {"stage": "remote"})
    assert store.is_complete(key)
    assert store.fs.exists(f"{store.artifact_path(key)}/{MANIFEST}")
    art = store.open(key, cache_dir=str(tmp_path / "cache"))  # downloaded once into a local cache
    assert art.path == tmp_path / "cache" / key
    assert (art / "sub" / "b.bin").read_bytes() == b"\0" * 100
    assert store.verify(key) == []
    assert store.keys() == [key]
    run = store.record_run({"run_id": "r1", "stages": {}})
    assert json.loads(store.fs.cat(run)) == {"run_id": "r1", "stages": {}}


def test_check_writable_says_why_a_store_cannot_be_used(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for root, why in ((afile, "exists and is not a directory"),
                      (afile / "store", "cannot create it"),
                      (Path("/proc/stele-no-such/store"), "cannot create it")):
        with pytest.raises(StoreError) as e:
            ArtifactStore(root).check_writable()
        assert str(e.value).startswith(f"store {root}: {why}"), str(e.value)
        assert "\n" not in str(e.value)
    assert afile.read_text() == "x"
    # A store that does not exist yet but can be created passes, and the check leaves nothing.
    fresh = tmp_path / "new" / "deeper" / "store"
    ArtifactStore(fresh).check_writable()
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    ArtifactStore(existing).check_writable()
    assert list(existing.iterdir()) == []
    ArtifactStore("memory://stele-check").check_writable()  # remote stores are not probed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_refuses_a_read_only_store(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match=f"store {ro}: cannot write in it"):
            ArtifactStore(ro).check_writable()
        with pytest.raises(StoreError, match=f"store {ro / 'sub'}: cannot create it"):
            ArtifactStore(ro / "sub").check_writable()
    finally:
        ro.chmod(0o700)


def test_a_filesystem_whose_package_is_missing_is_a_store_error(no_s3fs: None) -> None:
    with pytest.raises(StoreError, match=r"^store nosuchproto://b/x: Protocol not known: "
                                         r"nosuchproto$"):
        ArtifactStore("nosuchproto://b/x")
    with pytest.raises(StoreError, match=r"^store s3://bucket/x: s3fs is not installed "
                                         r"\(pip install 'stele\[s3\]'\)$"):
        ArtifactStore("s3://bucket/x")
