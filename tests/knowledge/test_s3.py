"""Inputs and the store on S3, against a local S3 server (moto): knowledge.ingest from a triples TSV
on s3:// -> knowledge.link on a JSONL on s3://, and speech.features on an audio folder on s3://
(clips read by the Ray Data actors), store on s3://, give the artifacts of the same run on local
files; a changed remote file re-runs the stages that read it. Skips without moto or s3fs
(``pip install -e '.[dev]'`` brings both)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import stele
from tests.speech.test_datasets import wav_bytes

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

PIPE = """\
name: s3
stages:
  kg:
    uses: knowledge.ingest
    with:
      sources:
        - {{type: triples, path: "{kg}", entity_labels: "{labels}"}}
      split: {{valid: 0, test: 0}}
  link:
    uses: knowledge.link
    inputs: [kg]
    with: {{text: "{docs}"}}
  clips:
    uses: speech.features
    with:
      dataset: {{type: audio_folder, root: "{clips}", transcripts: meta.csv}}
      actors: 1
      batch_size: 2
"""
TRIPLES = "".join(f"{h}\t{r}\t{t}\n" for h, r, t in [
    ("paris", "capital_of", "france"), ("berlin", "capital_of", "germany"),
    ("france", "borders", "germany"), ("rome", "capital_of", "italy"),
    ("italy", "borders", "france"), ("madrid", "capital_of", "spain"),
    ("spain", "borders", "france"), ("lyon", "city_of", "france"),
    ("munich", "city_of", "germany"), ("milan", "city_of", "italy")])
LABELS = "".join(f"{i}\t{n}\n" for i, n in [("paris", "Paris"), ("france", "France"),
                                             ("germany", "Germany"), ("italy", "Italy"),
                                             ("berlin", "Berlin"), ("spain", "Spain")])
DOCS = "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate([
    "Paris is the capital of France.", "Berlin lies in Germany, Rome in Italy.",
    "Spain borders France.", "Nothing here."]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env() -> dict[str, str]:
    """A moto S3 server on a free port and the environment that points s3fs (and a stele
    subprocess with its Ray workers) at it: credentials as usual, the endpoint through fsspec's
    FSSPEC_S3_ENDPOINT_URL."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    yield env
    server.stop()


@pytest.fixture
def s3(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """An s3fs filesystem on the server, and this process's fsspec configured like the
    subprocess (fsspec reads FSSPEC_* variables at import, so its config is set directly)."""
    import fsspec
    import s3fs

    for k, v in s3_env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3",
                        {"endpoint_url": s3_env["FSSPEC_S3_ENDPOINT_URL"]})
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["FSSPEC_S3_ENDPOINT_URL"], key="testing",
                           secret="testing", skip_instance_cache=True)
    fs.mkdir("stele-test")
    yield fs
    fs.rm("stele-test", recursive=True)


def _swap(obj, old: str, new: str):
    """``obj`` with ``old`` replaced by ``new`` in every string (the input's location, which the
    records of rejected items name)."""
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, bytes):
        return obj.replace(old.encode(), new.encode())
    if isinstance(obj, dict):
        return {k: _swap(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_swap(v, old, new) for v in obj]
    return obj


def _artifact_files(store, key: str) -> dict[str, object]:
    """What a stage wrote: Parquet tables as rows, other files as bytes; the manifest and the log
    (which name the inputs and times) apart."""
    art = store.open(key)
    out: dict[str, object] = {}
    for f in sorted(p for p in art.path.rglob("*") if p.is_file()):
        rel = str(f.relative_to(art.path))
        if rel in ("manifest.json", "log.txt"):
            continue
        out[rel] = pq.read_table(f).to_pylist() if f.suffix == ".parquet" else f.read_bytes()
    return out


@pytest.mark.slow
def test_pipeline_on_s3_inputs_and_store_equals_the_local_run(
        tmp_path: Path, s3, s3_env: dict[str, str], plugin_env: dict[str, str]) -> None:
    from pipeline.store import ArtifactStore

    local = tmp_path / "data"
    local.mkdir()
    files = {"kg.tsv": TRIPLES.encode(), "labels.tsv": LABELS.encode(), "docs.jsonl": DOCS.encode(),
             "clips/meta.csv": b"file,text\na.wav,hello\nsub/b.wav,bye\ngone.wav,lost\n",
             "clips/a.wav": wav_bytes(freq=300), "clips/sub/b.wav": wav_bytes(0.3, freq=500)}
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
        s3.pipe_file(f"stele-test/data/{name}", data)
    env = {**plugin_env, **s3_env}
    env.pop("STELE_STORE", None)
    runs = {}
    for where, base, store in ((local, str(local), str(tmp_path / "store")),
                               ("s3", "s3://stele-test/data", "s3://stele-test/store")):
        p = tmp_path / f"{'local' if where == local else 's3'}.yaml"
        p.write_text(PIPE.format(kg=f"{base}/kg.tsv", labels=f"{base}/labels.tsv",
                                 docs=f"{base}/docs.jsonl", clips=f"{base}/clips"))
        r = stele("run", str(p), "--store", store, "--no-live", env=env, cwd=tmp_path,
                  timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "s3: 3 ran" in r.stdout, r.stdout
        runs[where] = (p, ArtifactStore(store))

    # Both runs wrote their artifacts; the s3 run's are on S3, not on this disk.
    assert s3.exists("stele-test/store/artifacts") and not (tmp_path / "s3").exists()
    got = {}
    for where, (_, store) in runs.items():
        keys = {store.manifest(k)["stage"]: k for k in store.keys()}
        assert set(keys) == {"kg", "link", "clips"}
        got[where] = {stage: _artifact_files(store, k) for stage, k in keys.items()}
        manifests = json.dumps([store.manifest(k) for k in keys.values()])
        if where == "s3":  # parameters name the s3:// inputs, never a path only this host reads
            assert str(tmp_path) not in manifests and "s3://stele-test/data/kg.tsv" in manifests
    assert got["s3"] == _swap(got[local], str(local), "s3://stele-test/data")
    assert got["s3"]["link"]["mentions.parquet"], "the corpus has mentions"
    assert [r["id"] for r in got["s3"]["clips"]["items.parquet"]] == ["a.wav", "sub/b.wav"]
    assert [r["reason"] for r in got["s3"]["clips"]["rejected.parquet"]] == [
        "audio file not found: 's3://stele-test/data/clips/gone.wav'"]
    assert {r["entity_id"] for r in got["s3"]["link"]["mentions.parquet"]} >= {
        "triples:paris", "triples:france"}

    # A changed remote file changes the plan: ingest and link re-run, nothing else is touched.
    p, _ = runs["s3"]
    plan = stele("plan", str(p), "--store", "s3://stele-test/store", env=env, check=True).stdout
    assert plan.count("cached") == 3, plan
    s3.pipe_file("stele-test/data/kg.tsv", (TRIPLES + "nice\tcity_of\tfrance\n").encode())
    plan = stele("plan", str(p), "--store", "s3://stele-test/store", env=env, check=True).stdout
    assert plan.count("cached") == 1 and plan.count(" run ") == 2, plan  # clips: cached
    assert os.environ.get("FSSPEC_S3_ENDPOINT_URL") is None  # nothing leaked into this process
