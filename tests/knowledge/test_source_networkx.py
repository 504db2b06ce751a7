"""The networkx source on tiny GraphML, GML and edge-list files and on a user function."""

from __future__ import annotations

import sys

import networkx as nx
import pytest
from pydantic import ValidationError

import knowledge.sources.graph  # noqa: F401 - registers "networkx"
from knowledge.sources import SOURCES, Quarantine, SourceError, build_source


def _read(src, on_error="raise"):
    q = Quarantine("networkx", on_error)
    ents = {e.id: e for e in src.entities(q)}
    rels = {r.id: r.name for r in src.relations(q)}
    return ents, rels, [(t.head, t.relation, t.tail) for t in src.triples(q)], q


def _kg() -> nx.MultiDiGraph:
    g = nx.MultiDiGraph()
    g.add_node("paris", name="Paris", description="capital of France", type="city")
    g.add_node("france", label="France")
    g.add_node("alone")
    g.add_edge("paris", "france", relation="capital_of")
    g.add_edge("paris", "france", relation="located_in")
    g.add_edge("france", "paris")  # no relation attribute
    return g


def test_graphml_multidigraph(tmp_path):
    p = tmp_path / "g.graphml"
    nx.write_graphml(_kg(), p)
    src = SOURCES.get("networkx")(path=str(p))
    ents, rels, triples, q = _read(src)
    assert triples == [("paris", "capital_of", "france"), ("paris", "located_in", "france"),
                       ("france", "related_to", "paris")]
    assert set(ents) == {"paris", "france", "alone"}
    assert (ents["paris"].name, ents["paris"].description, ents["paris"].types) == (
        "Paris", "capital of France", ["city"])
    assert ents["france"].name == "France"  # falls back to "label"
    assert rels == {"capital_of": "capital of", "located_in": "located in",
                    "related_to": "related to"}
    assert src.files() == [p] and q.count == 0


def test_gml_undirected_one_triple_per_edge(tmp_path):
    g = nx.Graph()
    g.add_edge("a", "b", relation="sibling")
    g.add_edge("b", "c")
    p = tmp_path / "g.gml"
    nx.write_gml(g, p)
    _, _, triples, _ = _read(build_source({"type": "networkx", "path": str(p)}))
    assert triples == [("a", "sibling", "b"), ("b", "related_to", "c")]


def test_edgelist_forms_and_attrs(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text("# head tail relation\n"
                 "a b {'relation': 'likes', 'weight': 2}\n"
                 "b c knows well\n"
                 "c a\n"
                 "\n"
                 "a b {'relation': 'likes'}\n")  # same triple again: yielded once
    src = SOURCES.get("networkx")(path=str(p), relation_attr="relation")
    _, rels, triples, _ = _read(src)
    assert triples == [("a", "likes", "b"), ("b", "knows well", "c"), ("c", "related_to", "a")]
    where = [t.where for t in src.triples(Quarantine("networkx"))]
    assert where == [f"{p}:2", f"{p}:3", f"{p}:4"]


def test_edgelist_bad_lines(tmp_path):
    p = tmp_path / "g.edgelist"
    p.write_text("a b\nlonely\nb c {'relation': oops}\nc d\n")
    with pytest.raises(SourceError, match=r"g\.edgelist:2: edge line needs"):
        list(SOURCES.get("networkx")(path=str(p)).triples(Quarantine("networkx")))
    _, _, triples, q = _read(SOURCES.get("networkx")(path=str(p), on_error="skip"), "skip")
    assert triples == [("a", "related_to", "b"), ("c", "related_to", "d")]
    s = q.summary()
    assert s["count"] == 2 and [e["where"] for e in s["examples"]] == [f"{p}:2", f"{p}:3"]


def test_broken_files_name_file_and_line(tmp_path):
    p = tmp_path / "bad.graphml"
    p.write_text('<?xml version="1.0"?>\n<graphml>\n<graph edgedefault="directed">\n'
                 '<node id="a"/>\n<edge source="a" </graph></graphml>\n')
    with pytest.raises(SourceError, match=r"bad\.graphml:5: GraphML is not well-formed"):
        list(SOURCES.get("networkx")(path=str(p)).triples(Quarantine("networkx")))
    p = tmp_path / "bad.gml"
    p.write_text('graph [\n node [ id 0 label "a" ]\n edge [ source 0 target ]\n]\n')
    with pytest.raises(SourceError, match=r"bad\.gml: cannot read gml: .*\(5, 1\)"):
        list(SOURCES.get("networkx")(path=str(p)).triples(Quarantine("networkx")))
    p = tmp_path / "g.dot"
    p.write_text("digraph {}")
    with pytest.raises(SourceError, match="format"):
        list(SOURCES.get("networkx")(path=str(p)).triples(Quarantine("networkx")))


def test_callable(tmp_path, monkeypatch):
    (tmp_path / "my_graphs.py").write_text(
        "import networkx as nx\n"
        "def build():\n"
        "    g = nx.DiGraph()\n"
        "    g.add_edge(1, 2, rel='r')\n"
        "    return g\n"
        "def not_a_graph():\n"
        "    return [1, 2]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    src = SOURCES.get("networkx")(callable="my_graphs:build", relation_attr="rel")
    ents, _, triples, _ = _read(src)
    assert triples == [("1", "r", "2")] and set(ents) == {"1", "2"}
    assert src.files() == [tmp_path / "my_graphs.py"]
    with pytest.raises(SourceError, match="not a networkx graph"):
        list(SOURCES.get("networkx")(callable="my_graphs:not_a_graph").triples(Quarantine("x")))
    with pytest.raises(SourceError, match="cannot import"):
        list(SOURCES.get("networkx")(callable="my_graphs:nope").triples(Quarantine("x")))
    sys.modules.pop("my_graphs", None)


def test_needs_exactly_one_input(tmp_path):
    with pytest.raises(ValidationError, match="exactly one"):
        SOURCES.get("networkx")()
    with pytest.raises(ValidationError, match="exactly one"):
        SOURCES.get("networkx")(path="a.gml", callable="m:f")
