"""Every knowledge input read from a URI (fsspec's memory://, the code path of s3://) gives what the
local file gives: each source type with file parameters, and knowledge.link's text corpus. The
`where` of each record names the URI, with the line, so quarantine messages point at it."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
from pathlib import Path

import datasets
import networkx as nx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from knowledge.sources import Quarantine, build_source
from tests.knowledge.test_link import _run_stage, tiny_kg
from tests.knowledge.test_source_rdf import TTL
from tests.knowledge.test_source_wikidata import write_dump
from tests.knowledge.test_source_wordnet import make_wndb


def _records(src, on_error: str = "raise"):
    """Entities, relations and triples as plain tuples, without `where` (it names the file)."""
    q = Quarantine(src.type, on_error)
    strip = lambda r: tuple(v for k, v in dataclasses.asdict(r).items() if k != "where")  # noqa: E731
    out = ([strip(e) for e in src.entities(q)], [strip(r) for r in src.relations(q)],
           [strip(t) for t in src.triples(q)])
    return out, q


def _same(spec: dict, files: dict[str, Path], memory_uri) -> None:
    """The source built from ``spec`` with each ``files`` key set to the local path, then to a
    memory:// copy, reads the same records (and something)."""
    local = build_source({**spec, **{k: str(v) for k, v in files.items()}})
    remote = build_source({**spec, **{k: memory_uri(v) for k, v in files.items()}})
    got_local, got_remote = _records(local)[0], _records(remote)[0]
    assert got_local[2], "the fixture gives triples"
    assert got_remote == got_local
    assert remote.fingerprint() == remote.fingerprint() != local.fingerprint()


def test_triples_tsv_gz_with_labels_and_splits(tmp_path: Path, memory_uri) -> None:
    kg = tmp_path / "kg.tsv.gz"
    kg.write_bytes(gzip.compress(b"\xef\xbb\xbfa\tlikes\tb\nb\tlikes\tc\n\nc\tknows\ta\n"))
    (tmp_path / "ent.tsv").write_text("a\tAlice\tAl\tAli\nb\tBob\n")
    (tmp_path / "rel.tsv").write_text("likes\tlikes (verb)\n")
    _same({"type": "triples"}, {"path": kg, "entity_labels": tmp_path / "ent.tsv",
                                "relation_labels": tmp_path / "rel.tsv"}, memory_uri)
    for split in ("train", "valid"):
        (tmp_path / f"{split}.csv").write_text(f's,p,o\n"x, y",rel,{split}\n')
    spec = {"type": "triples", "header": True, "columns": {"head": "s", "relation": "p",
                                                           "tail": "o"}}
    local = build_source({**spec, "splits": {s: str(tmp_path / f"{s}.csv")
                                             for s in ("train", "valid")}})
    remote = build_source({**spec, "splits": {s: memory_uri(tmp_path / f"{s}.csv")
                                              for s in ("train", "valid")}})
    assert _records(remote)[0] == _records(local)[0]
    (tmp_path / "kg.jsonl").write_text(json.dumps({"h": "a", "r": "r1", "t": "b"}) + "\n")
    _same({"type": "triples", "columns": {"head": "h", "relation": "r", "tail": "t"}},
          {"path": tmp_path / "kg.jsonl"}, memory_uri)


def test_triples_quarantine_names_the_uri_and_line(tmp_path: Path, memory_uri) -> None:
    f = tmp_path / "bad.tsv"
    f.write_bytes(b"a\tr\tb\nonly\ttwo\na\t\tb\n\xff\xfe\tr\tb\nc\tr\td\n")
    uri = memory_uri(f)
    (ents, rels, triples), q = _records(build_source({"type": "triples", "path": uri,
                                                      "on_error": "skip"}), "skip")
    assert [t[:3] for t in triples] == [("a", "r", "b"), ("c", "r", "d")]
    assert [e["where"] for e in q.examples] == [f"{uri}:{n}" for n in (2, 3, 4)]
    src = build_source({"type": "triples", "path": uri})
    assert [t.where for t in src.triples(Quarantine("t", "skip"))] == [f"{uri}:1", f"{uri}:5"]
    with pytest.raises(Exception, match=rf"source 'triples': {uri}:2: expected 3 columns"):
        _records(src)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    why = build_source({"type": "triples", "path": memory_uri(empty)})
    assert why.why_no_triples(Quarantine("t")).endswith("empty.tsv: file empty")


@pytest.mark.parametrize("name", ["kg.ttl", "kg.ttl.gz", "kg.nt"])
def test_rdf(tmp_path: Path, memory_uri, name: str) -> None:
    ttl = TTL.encode()
    if name.endswith(".nt"):
        from rdflib import Graph

        ttl = Graph().parse(data=TTL, format="turtle").serialize(format="nt").encode()
    f = tmp_path / name
    f.write_bytes(gzip.compress(ttl) if name.endswith(".gz") else ttl)
    _same({"type": "rdf"}, {"path": f}, memory_uri)


@pytest.mark.parametrize("suffix,opener", [("", open), (".gz", gzip.open), (".bz2", bz2.open)])
def test_wikidata(tmp_path: Path, memory_uri, suffix: str, opener) -> None:
    f = write_dump(tmp_path / f"dump.json{suffix}", opener=opener)
    _same({"type": "wikidata"}, {"path": f}, memory_uri)


@pytest.mark.parametrize("name", ["g.graphml", "g.gml", "g.edgelist"])
def test_networkx(tmp_path: Path, memory_uri, name: str) -> None:
    g = nx.MultiDiGraph()
    g.add_node("paris", name="Paris", type="city")
    g.add_edge("paris", "france", relation="capital_of")
    g.add_edge("france", "paris")
    f = tmp_path / name
    {"g.graphml": nx.write_graphml, "g.gml": nx.write_gml,
     "g.edgelist": nx.write_edgelist}[name](g, f)
    _same({"type": "networkx"}, {"path": f}, memory_uri)


def test_wordnet_folder(tmp_path: Path, memory_uri) -> None:
    _same({"type": "wordnet", "relations": "wn18rr"}, {"path": make_wndb(tmp_path / "wn")},
          memory_uri)


def test_hf_files_and_save_to_disk_folder(tmp_path: Path, memory_uri) -> None:
    rows = {"head": ["a", "b"], "relation": ["r", "r"], "tail": ["b", "c"],
            "split": ["train", "test"]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "kg.parquet")
    (tmp_path / "kg.jsonl").write_text("".join(json.dumps(dict(zip(rows, r))) + "\n"
                                               for r in zip(*rows.values())))
    one = lambda h: datasets.Dataset.from_dict({"head": [h], "relation": ["r"], "tail": ["t"]})  # noqa: E731
    datasets.DatasetDict({"train": one("a"), "validation": one("b")}).save_to_disk(tmp_path / "dd")
    for f in ("kg.parquet", "kg.jsonl", "dd"):
        _same({"type": "hf"}, {"path": tmp_path / f}, memory_uri)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.csv").write_text("head,relation,tail\na,r,b\n")
    with pytest.raises(Exception, match="a folder of data files is read from local disk only"):
        _records(build_source({"type": "hf", "path": memory_uri(tmp_path / "files")}))


def test_ingest_fingerprint_follows_a_remote_file(tmp_path: Path, memory_uri) -> None:
    import fsspec

    from knowledge.stages.ingest import IngestParams
    from pipeline.registry import REGISTRY

    f = tmp_path / "kg.tsv"
    f.write_text("a\tr\tb\n")
    uri = memory_uri(f)
    st = REGISTRY.get("knowledge.ingest")
    params = IngestParams(sources=[{"type": "triples", "path": uri}])
    assert params.model_dump(mode="json")["sources"][0]["path"] == uri  # kept as written
    before = st.fingerprint(params)
    assert st.fingerprint(params) == before
    fsspec.filesystem("memory").pipe_file(uri.removeprefix("memory:/"), b"a\tr\tc\n")
    assert st.fingerprint(params) != before


# -- knowledge.link ------------------------------------------------------------------------------
@pytest.fixture()
def kg_dir(tmp_path: Path) -> Path:
    d = tmp_path / "kg"
    d.mkdir()
    tiny_kg().save(d)
    return d


def _tables(out: Path) -> tuple[list, list]:
    return (pq.read_table(out / "docs.parquet").to_pylist(),
            pq.read_table(out / "mentions.parquet").to_pylist())


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.parquet", "hf"])
def test_link_reads_the_text_from_a_uri(tmp_path: Path, kg_dir: Path, memory_uri,
                                        name: str) -> None:
    docs = [{"id": "d1", "text": "Paris is the capital of France."},
            {"id": "d2", "text": "Troy and C\u00f4te d\u2019Ivoire, an inch from New York City."}]
    src = tmp_path / name
    if name == "hf":
        datasets.Dataset.from_list(docs).save_to_disk(str(src))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(docs), src)
    else:
        data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
        src.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    uri = memory_uri(src)
    out_local, m_local = _run_stage(tmp_path / "local", kg_dir, text=str(src))
    out_remote, m_remote = _run_stage(tmp_path / "remote", kg_dir, text=uri)
    assert _tables(out_remote) == _tables(out_local)
    assert _tables(out_local)[1], "the fixture has mentions"
    assert (out_remote / "top_entities.csv").read_text() == (out_local / "top_entities.csv").read_text()
    for k in ("documents", "mentions", "linked_entities", "ambiguous_share", "blank_lines"):
        assert m_remote[k] == m_local[k]


def test_link_quarantine_names_the_uri_and_line(tmp_path: Path, kg_dir: Path, memory_uri) -> None:
    from knowledge.stages.link import LinkParams, _fingerprint

    src = tmp_path / "docs.jsonl"
    src.write_bytes(b'{"id": "d1", "text": "Paris"}\n{"id": "d2", "text": "New\n'
                    b'{"id": "d3", "text": "caf\xe9 in Paris"}\n')
    uri = memory_uri(src)
    _, m = _run_stage(tmp_path, kg_dir, text=uri, on_error="skip")
    assert [e["where"] for e in m["quarantine"]["examples"]] == [f"{uri}:2", f"{uri}:3"]
    assert LinkParams(text=uri).text == uri
    assert _fingerprint(LinkParams(text=uri)) == _fingerprint(LinkParams(text=uri))
    with pytest.raises(Exception, match=r"text memory://.*/nope\.jsonl does not exist"):
        _run_stage(tmp_path / "x", kg_dir, text=uri.replace("docs.jsonl", "nope.jsonl"))


def test_a_source_uri_whose_package_is_missing_is_a_spec_error(no_s3fs: None, plan_error) -> None:
    _, line = plan_error("stages:\n  kg:\n    uses: knowledge.ingest\n    with:\n      sources:\n"
                         "        - {type: triples, path: s3://bucket/kg.tsv}\n")
    assert "p.yaml:6: stages.kg.with.sources[0].path:" in line, line
    assert "s3://bucket/kg.tsv: s3fs is not installed (pip install 'stele[s3]')" in line, line
