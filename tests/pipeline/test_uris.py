"""pipeline.uris: inputs on any fsspec URI read like local files, fingerprints (local ones exactly as
before), and the one-line error naming the extra when a protocol's package is missing."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import fsspec
import pytest
from fsspec.registry import known_implementations
from pydantic import BaseModel, ValidationError

from pipeline.fingerprint import files_fingerprint, tree_files
from pipeline.quarantine import Quarantine
from pipeline.readers import json_objects, read_lines
from pipeline.uris import (InputError, InputURI, ResolvedInput, URIPath, check_input, file_checker,
                           input_fingerprint, input_files, input_path, inputs_fingerprint,
                           is_uri, open_input, resolve_input)


def test_uri_or_local_path() -> None:
    assert is_uri("s3://bucket/x") and is_uri("memory://x") and is_uri("simplecache::s3://b/x")
    assert not is_uri("/tmp/x") and not is_uri("rel/x") and not is_uri("file:///tmp/x")
    assert not is_uri(Path("s3:/bucket/x"))  # a Path is local, whatever it is called
    assert input_path("rel/x.tsv") == Path("rel/x.tsv")
    assert input_path("file:///tmp/x.tsv") == Path("/tmp/x.tsv")
    assert isinstance(input_path("s3://bucket/x.tsv"), URIPath)


def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_input("docs.jsonl") == str(tmp_path / "docs.jsonl")
    assert resolve_input("file:///data/docs.jsonl") == "/data/docs.jsonl"
    assert resolve_input("memory://bucket/docs.jsonl") == "memory://bucket/docs.jsonl"
    assert resolve_input("s3://bucket/a//b.jsonl") == "s3://bucket/a//b.jsonl"  # as written
    assert check_input("rel/x.tsv") == "rel/x.tsv"  # sources keep relative paths as they always did

    class P(BaseModel):
        a: InputURI
        b: ResolvedInput

    p = P(a="memory://x/a.tsv", b="docs.jsonl")
    assert (p.a, p.b) == ("memory://x/a.tsv", str(tmp_path / "docs.jsonl"))


def test_missing_package_is_one_line_naming_the_extra(no_s3fs: None) -> None:
    with pytest.raises(InputError) as e:
        check_input("s3://bucket/x")
    assert str(e.value) == "s3://bucket/x: s3fs is not installed (pip install 'stele[s3]')"
    with pytest.raises(InputError, match=r"^s3://bucket/x\.tsv: s3fs is not installed"):
        list(read_lines("s3://bucket/x.tsv", Quarantine("t")))
    with pytest.raises(InputError, match=r"^nosuchproto://b/x: Protocol not known: nosuchproto$"):
        resolve_input("nosuchproto://b/x")

    class P(BaseModel):
        path: InputURI

    with pytest.raises(ValidationError) as v:
        P(path="s3://bucket/x")
    msg = v.value.errors()[0]["msg"]
    assert "\n" not in msg and "pip install 'stele[s3]'" in msg, msg


def test_a_protocol_without_a_stele_extra_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(known_implementations, "stelefake",
                        {"class": "stele_absent_pkg.FS", "err": "Install stele-absent-pkg to "
                                                                "access it"})
    with pytest.raises(InputError) as e:
        check_input("stelefake://b/x")
    assert str(e.value) == ("stelefake://b/x: stele-absent-pkg is not installed "
                            "(pip install stele-absent-pkg)")


def test_a_pipeline_naming_a_uri_whose_package_is_missing_stops_before_running(
        no_s3fs: None, plan_error) -> None:
    _, line = plan_error("stages:\n  snap:\n    uses: core.snapshot\n"
                         "    with: {path: s3://bucket/data}\n")
    assert line.startswith("error: ") and "p.yaml:4: stages.snap.with.path:" in line, line
    assert "s3://bucket/data: s3fs is not installed (pip install 'stele[s3]')" in line, line


def test_uripath_names_and_joins() -> None:
    p = URIPath("s3://bucket/a/b.tsv.gz")
    assert (p.name, p.suffix, p.suffixes, p.stem) == ("b.tsv.gz", ".gz", [".tsv", ".gz"], "b.tsv")
    assert str(p.parent) == "s3://bucket/a" and str(p.parent.parent) == "s3://bucket"
    assert str(p.parent.parent.parent) == "s3://bucket"
    assert str(URIPath("s3://bucket/a/") / "x" / "y.jpg") == "s3://bucket/a/x/y.jpg"
    assert (URIPath("s3://bucket/a") / "x/y.jpg").relative_to(URIPath("s3://bucket/a")) == "x/y.jpg"
    assert p.is_absolute() and p.resolve() is p and p.as_uri() == "s3://bucket/a/b.tsv.gz"
    assert not hasattr(p, "__fspath__")  # never opened as a local file by mistake
    assert pickle.loads(pickle.dumps(p)) == p


def test_files_and_reading_on_memory(memory_uri, tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("a\n")
    (tmp_path / "d" / "sub" / "b.txt").write_bytes(gzip.compress(b"b1\nb2\n"))
    uri = memory_uri(tmp_path / "d")
    root = input_path(uri)
    assert root.is_dir() and not root.is_file() and root.exists()
    assert [str(f) for f in input_files(uri)] == [f"{uri}/a.txt", f"{uri}/sub/b.txt"]
    assert [p.name for p in root.iterdir()] == ["a.txt", "sub"]
    assert (root / "a.txt").read_bytes() == b"a\n"
    with open_input(f"{uri}/sub/b.txt", "rt", compression="gzip", encoding="utf-8") as f:
        assert f.read() == "b1\nb2\n"
    with open_input(f"{uri}/a.txt", "r", encoding="utf-8") as f:
        assert f.read() == "a\n"
    exists = file_checker(root)
    assert exists("a.txt") and exists("./sub//b.txt") and not exists("c.txt")
    assert file_checker(tmp_path / "d")("sub/b.txt")


def test_read_lines_on_a_uri_is_read_lines_on_the_file(memory_uri, tmp_path: Path) -> None:
    """BOM, gzip, an undecodable line quarantined with file:line, the rest still read."""
    raw = b"\xef\xbb\xbfid\tname\n" + b"1\tcaf\xe9\n" + "2\tCôte\r\n".encode() + b"\n3\tend"
    for name, data in (("t.tsv", raw), ("t.tsv.gz", gzip.compress(raw))):
        local = tmp_path / name
        local.write_bytes(data)
        uri = memory_uri(local)
        got = {}
        for where in (local, uri):
            q = Quarantine("t", "skip")
            got[where] = (list(read_lines(where, q)), list(read_lines(where, q, keep_ends=True)),
                          [(e["where"], e["reason"]) for e in q.examples])
        assert got[local][:2] == got[uri][:2]
        assert got[local][0] == [(1, "id\tname"), (3, "2\tCôte"), (4, ""), (5, "3\tend")]
        assert got[uri][2] == [(f"{uri}:2", "undecodable bytes (invalid continuation byte at "
                                            "byte 5)")]
        assert [w for w, _ in got[local][2]] == [f"{local}:2"]
    with pytest.raises(Exception, match=r"memory://nowhere/x\.tsv: no such file"):
        list(read_lines("memory://nowhere/x.tsv", Quarantine("t")))
    js = tmp_path / "j.jsonl"
    js.write_text('{"a": 1}\n[1]\n{"a": 2}\n')
    q = Quarantine("t", "skip")
    uri = memory_uri(js)
    assert [r for _, r, _ in json_objects(uri, q)] == [{"a": 1}, {"a": 2}]
    assert q.examples[0]["where"] == f"{uri}:2"


def test_local_fingerprints_are_the_old_ones(tmp_path: Path) -> None:
    """Cache keys of local inputs must not change: the same hash as files_fingerprint gave."""
    (tmp_path / "d" / "s").mkdir(parents=True)
    files = [tmp_path / "d" / "a.tsv", tmp_path / "d" / "s" / "b.tsv", tmp_path / "d" / "a-b.tsv"]
    for f in files:
        f.write_text(f.name)
    missing = tmp_path / "gone.tsv"
    assert inputs_fingerprint(files + [missing]) == files_fingerprint(files + [missing])
    assert inputs_fingerprint([str(f) for f in files]) == files_fingerprint(files)
    root = tmp_path / "d"
    assert inputs_fingerprint(files, root=str(root)) == files_fingerprint(files, root=root)
    assert input_fingerprint(str(root)) == files_fingerprint(tree_files(root), root=root)
    assert input_fingerprint(str(files[0])) == files_fingerprint([files[0]], root=files[0])
    assert input_fingerprint(str(missing)) == files_fingerprint([missing], root=missing)


def test_remote_fingerprints_follow_the_content(memory_uri, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.tsv").write_text("a\tr\tb\n")
    uri = memory_uri(tmp_path / "d")
    fs = fsspec.filesystem("memory")
    path = fs._strip_protocol(f"{uri}/a.tsv")
    first = input_fingerprint(uri), inputs_fingerprint([f"{uri}/a.tsv"])
    assert first == (input_fingerprint(uri), inputs_fingerprint([f"{uri}/a.tsv"]))  # stable
    assert first[1] != files_fingerprint([tmp_path / "d" / "a.tsv"])
    fs.pipe_file(path, b"a\tr\tc\n")  # same size, new content (a new write)
    second = input_fingerprint(uri), inputs_fingerprint([f"{uri}/a.tsv"])
    assert second[0] != first[0] and second[1] != first[1]
    fs.pipe_file(fs._strip_protocol(f"{uri}/new.tsv"), b"x")  # a file added to the folder
    assert input_fingerprint(uri) != second[0]
    gone = inputs_fingerprint([f"{uri}/gone.tsv"])
    assert gone == inputs_fingerprint([f"{uri}/gone.tsv"])  # missing: stable, the stage then fails
    mixed = [tmp_path / "d" / "a.tsv", f"{uri}/a.tsv"]
    assert inputs_fingerprint(mixed) == inputs_fingerprint(mixed[::-1])


def test_snapshot_copies_a_uri_folder(memory_uri, tmp_path: Path) -> None:
    """core.snapshot reads a URI like a local folder: same listing, same checksums."""
    import json
    import logging

    from pipeline import Resources, StageContext
    from pipeline.stages import SnapshotParams, _fingerprint, snapshot

    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "s" / "b.csv").write_text("b,c")
    uri = memory_uri(tmp_path / "d")
    got = []
    for i, path in enumerate((str(tmp_path / "d"), uri)):
        for include in (["**/*"], ["*.txt"], ["s/*.csv"]):
            out = tmp_path / f"out{i}{include[0].replace('/', '_').replace('*', 'x')}"
            out.mkdir()
            ctx = StageContext(stage="s", key="k" * 64, out=out, inputs={}, resources=Resources(),
                               state_uri=str(tmp_path / "state"), log=logging.getLogger("t"))
            params = SnapshotParams(path=path, include=include)
            metrics = snapshot(ctx, params)
            got.append((include, metrics, json.loads((out / "checksums.json").read_text())))
            assert _fingerprint(params) == _fingerprint(params)
    assert got[:3] == got[3:]
    assert got[0][2].keys() == {"a.txt", os.path.join("s", "b.csv")}


def test_data_tag_under_a_uri_stele_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.spec import parse_pipeline

    text = "stages:\n  a:\n    uses: core.snapshot\n    with: {path: !data emoji/img}\n"
    monkeypatch.setenv("STELE_DATA", "memory://bucket/data/")
    assert parse_pipeline(text).stages["a"].params.path == "memory://bucket/data/emoji/img"


def test_a_package_that_is_there_but_cannot_be_imported_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(known_implementations, "stelefake",
                        {"class": "json.stele_absent_module.FS", "err": "Install json to use it"})
    with pytest.raises(InputError) as e:
        check_input("stelefake://b/x")
    assert str(e.value).startswith("stelefake://b/x: json cannot be imported (No module named "
                                   "'json.stele_absent_module'"), str(e.value)
