"""knowledge.ingest: namespacing, alignment, de-duplication, splits that keep held-out entities in
train, the sources' own splits, statistics, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knowledge.ingest import build_graph, normalise_name, split_random
from knowledge.kg import KnowledgeGraph
from knowledge.sources import SourceError, build_source


def tsv(path: Path, rows: list[str]) -> str:
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def chain_kg(n: int = 60) -> list[str]:
    rows = [f"e{i}\tnext\te{i + 1}" for i in range(n)]
    rows += [f"e{i}\tskip\te{(i + 2) % n}" for i in range(0, n, 2)]
    return rows


def test_random_split_keeps_heldout_entities_in_train_and_is_seeded(tmp_path: Path) -> None:
    src = build_source({"type": "triples", "path": tsv(tmp_path / "a.tsv", chain_kg())})
    g, rep = build_graph([src], split_mode="random", valid=0.1, test=0.1, seed=7)
    tr = g.split_array("train")
    known_e, known_r = set(tr[:, 0]) | set(tr[:, 2]), set(tr[:, 1])
    for split in ("valid", "test"):
        arr = g.split_array(split)
        assert len(arr) == 9  # round(0.1 * 90)
        assert set(arr[:, 0]) | set(arr[:, 2]) <= known_e and set(arr[:, 1]) <= known_r
    g2, _ = build_graph([src], split_mode="random", valid=0.1, test=0.1, seed=7)
    g3, _ = build_graph([src], split_mode="random", valid=0.1, test=0.1, seed=8)
    assert g.triples.equals(g2.triples) and not g.triples.equals(g3.triples)
    assert g.entity_ids()[:3] == ["triples:e0", "triples:e1", "triples:e10"]  # namespaced, sorted
    assert rep.stats["implied_entities"] == 61 and rep.stats["split_mode"] == "random"


def test_split_random_refuses_impossible_fractions() -> None:
    star = np.array([[0, 0, i] for i in range(1, 6)])  # every triple brings a new entity
    with pytest.raises(SourceError, match="cannot hold out"):
        split_random(star, 0.2, 0.2, 0)


def test_source_splits_and_unknown_entities_in_valid(tmp_path: Path) -> None:
    train = tsv(tmp_path / "train.tsv", ["a\tr\tb", "b\tr\tc"])
    valid = tsv(tmp_path / "valid.tsv", ["a\tr\tc", "a\tr\tzzz"])  # zzz never occurs in train
    spec = {"type": "triples", "splits": {"train": train, "valid": valid}}
    with pytest.raises(SourceError, match=r"valid.tsv:2: valid triple uses what train does not "
                                          r"contain: triples:zzz"):
        build_graph([build_source(spec)])
    g, rep = build_graph([build_source(spec)], on_error="skip")
    assert rep.stats["split_mode"] == "source" and rep.stats["splits"] == {"train": 2, "valid": 1,
                                                                          "test": 0}
    assert rep.quarantine["ingest"]["count"] == 1
    assert rep.quarantine["ingest"]["examples"][0]["where"].endswith("valid.tsv:2")


def test_duplicates_are_counted_or_refused(tmp_path: Path) -> None:
    rows = ["a\tr\tb", "b\tr\tc", "a\tr\tb", "c\tr\ta"]
    src = build_source({"type": "triples", "path": tsv(tmp_path / "d.tsv", rows)})
    g, rep = build_graph([src], split_mode="random", valid=0, test=0)
    assert g.triples.num_rows == 3
    assert rep.duplicates["count"] == 1 and rep.duplicates["examples"][0]["where"].endswith("d.tsv:3")
    with pytest.raises(SourceError, match=r"d.tsv:3: duplicate triple"):
        build_graph([src], split_mode="random", valid=0, test=0, duplicates="raise")


def test_align_by_names_and_by_file(tmp_path: Path) -> None:
    a = build_source({"type": "triples", "namespace": "wiki",
                      "path": tsv(tmp_path / "a.tsv", ["France\tcapital\tParis"])})
    b = build_source({"type": "triples", "namespace": "geo",
                      "path": tsv(tmp_path / "b.tsv", ["paris\tin\tfrance", "Côte_d'Ivoire\tin\tAfrica"]),
                      "entity_labels": tsv(tmp_path / "bl.tsv", ["paris\tParis, France"])})
    g, rep = build_graph([a, b], split_mode="random", valid=0, test=0, align_mode="names")
    ids = g.entity_ids()
    assert "geo:france" not in ids and "wiki:France" in ids  # same name, first source wins
    assert "geo:paris" in ids  # its label is "Paris, France": not the same name
    assert rep.stats["aligned"] == 1
    row = g.entities.to_pylist()[ids.index("wiki:France")]
    assert "france" in row["aliases"]  # the merged entity's name is kept as an alias
    mapping = tsv(tmp_path / "map.tsv", ["geo:paris\twiki:Paris", "geo:nowhere\twiki:Paris"])
    with pytest.raises(SourceError, match=r"map.tsv:2: unknown entity id\(s\): geo:nowhere"):
        build_graph([a, b], split_mode="random", valid=0, test=0, mapping_file=mapping)
    g, rep = build_graph([a, b], split_mode="random", valid=0, test=0, mapping_file=mapping,
                         on_error="skip")
    assert "geo:paris" not in g.entity_ids() and rep.stats["aligned"] == 1
    assert normalise_name("Côte_d'Ivoire ") == "cote d'ivoire"


def test_stats_are_right(tmp_path: Path) -> None:
    rows = ["a\tr\tb", "b\tr\tc", "x\tr\ty"]  # two components: {a,b,c} and {x,y}
    src = build_source({"type": "triples", "path": tsv(tmp_path / "s.tsv", rows)})
    g, rep = build_graph([src], split_mode="random", valid=0, test=0)
    s = rep.stats
    assert (s["entities"], s["relations"], s["triples"]) == (5, 1, 3)
    assert s["components"]["count"] == 2 and s["components"]["largest"] == 3
    assert s["degree"]["histogram"] == {"1": 4, "2": 1} and s["degree"]["max"] == 2


@pytest.mark.slow
def test_ingest_then_embed_one_and_two_workers(tmp_path: Path, ray_local: None) -> None:
    """Through the engine: ingest Nations, train TransE with 1 and 2 Ray Train workers (DDP over
    gloo); both reach the same validation MRR band, and the artifacts hold what ERNIE needs."""
    pytest.importorskip("pykeen")
    from safetensors.torch import load_file

    from knowledge.evaluate import rank_metrics
    from knowledge.models import load_model
    from pipeline.runner import run
    from pipeline.spec import parse_pipeline
    from pipeline.store import ArtifactStore

    spec = """
stages:
  kg: {uses: knowledge.ingest, with: {sources: [{type: pykeen, dataset: nations}]}}
  one: {uses: knowledge.embed, inputs: [kg],
        with: {model: transe, dim: 32, epochs: 30, eval_every: 10, patience: 0, lr: 0.02}}
  two: {uses: knowledge.embed, inputs: [kg],
        with: {model: transe, dim: 32, epochs: 30, eval_every: 10, patience: 0, lr: 0.02,
               scaling: {num_workers: 2}}}
"""
    store = ArtifactStore(tmp_path / "store")
    r = run(parse_pipeline(spec), store, live=False)
    assert r.ok, {n: (o.status, o.error, o.traceback[-2000:]) for n, o in r.outcomes.items()}
    kg_art = store.open(r.outcomes["kg"].key)
    assert kg_art.metrics["entities"] == 14 and kg_art.metrics["train_triples"] == 1592
    assert json.loads((kg_art / "stats.json").read_text())["components"]["count"] == 1
    kg = KnowledgeGraph.load(kg_art.path)
    mrr = {}
    for name in ("one", "two"):
        art = store.open(r.outcomes[name].key)
        m = art.metrics
        assert m["epochs"] == 30 and m["num_workers"] == (1 if name == "one" else 2)
        emb = load_file(str(art / "embeddings.safetensors"))
        assert emb["entity"].shape == (14, 32) and emb["relation"].shape == (55, 32)
        # The saved model is the best-validation one: evaluating it again gives that MRR.
        res = rank_metrics(load_model(art.path), kg.split_tensor("valid"), kg.split_tensor(),
                           kg.num_entities)
        assert res["filtered"]["both"]["mrr"] == pytest.approx(m["best_valid_mrr"], abs=1e-6)
        mrr[name] = m["best_valid_mrr"]
    # A random ranking of 14 entities gives MRR ~0.23; trained TransE on Nations gets ~0.45.
    assert mrr["one"] > 0.35 and mrr["two"] > 0.35
    assert abs(mrr["one"] - mrr["two"]) < 0.08, mrr


@pytest.mark.parametrize("content,header,why", [
    ("", False, "kg.tsv: file empty"),
    ("\n\n", False, "kg.tsv: file empty"),
    ("h\tr\tt\n", True, "kg.tsv: only a header"),
    ("a\tr\nb\t\tc\n", False,
     "kg.tsv: all 2 lines quarantined ('expected at least 3 columns, found 2' x1, "
     "'empty field(s): relation' x1)"),
])
def test_no_triples_at_all_fails_ingest_naming_the_source(tmp_path: Path, content: str,
                                                          header: bool, why: str) -> None:
    f = tmp_path / "kg.tsv"
    f.write_text(content)
    spec = {"type": "triples", "path": str(f), "header": header, "on_error": "skip",
            **({"columns": {"head": "h", "relation": "r", "tail": "t"}} if header else {})}
    with pytest.raises(SourceError) as e:
        build_graph([build_source(spec)], on_error="skip")
    msg = str(e.value)
    assert "\n" not in msg and "no triples" in msg, msg
    assert f"source 'triples': {tmp_path}/{why}" in msg, msg


def test_no_triples_names_every_empty_source_and_ingest_quarantine(tmp_path: Path) -> None:
    empty = tsv(tmp_path / "empty.tsv", [])
    spec_empty = {"type": "triples", "path": empty, "namespace": "one"}
    # the other source's triples are all valid ones that train does not know: ingest drops them
    train = tsv(tmp_path / "train.tsv", [])
    valid = tsv(tmp_path / "valid.tsv", ["a\tr\tb"])
    spec_split = {"type": "triples", "splits": {"train": train, "valid": valid}, "namespace": "two"}
    with pytest.raises(SourceError) as e:
        build_graph([build_source(spec_empty), build_source(spec_split)], on_error="skip")
    msg = str(e.value)
    assert "\n" not in msg and "source 'one'" in msg and "empty.tsv: file empty" in msg, msg
    assert "source 'two'" not in msg, msg  # it had triples: ingest's quarantine says where they went
    assert "ingest: all 1 triple(s) quarantined" in msg and "valid triple uses what train" in msg, msg


def test_one_empty_source_beside_others_is_fine(tmp_path: Path) -> None:
    a = build_source({"type": "triples", "path": tsv(tmp_path / "a.tsv", ["a\tr\tb"]),
                      "namespace": "a"})
    b = build_source({"type": "triples", "path": tsv(tmp_path / "b.tsv", []), "namespace": "b"})
    g, rep = build_graph([a, b], valid=0, test=0)
    assert rep.stats["triples"] == 1


def test_no_triples_from_a_plugin_source_names_it_and_its_quarantine(tmp_path: Path) -> None:
    from knowledge.sources import KnowledgeSource

    class Odd(KnowledgeSource):  # not registered: a source that quarantines everything it reads
        name = "odd"

        def triples(self, q):
            q.bad("odd:1", "not a triple", "x")
            yield from ()

    class Quiet(KnowledgeSource):
        name = "quiet"

        def triples(self, q):
            return iter(())

    with pytest.raises(SourceError) as e:
        build_graph([Odd(on_error="skip"), Quiet()])
    assert str(e.value) == ("the knowledge graph has no triples: source 'odd': no triples, 1 item(s) "
                            "quarantined ('not a triple' x1); source 'quiet': no triples")


def test_quarantine_reasons_from_object_reprs_are_the_same_on_every_run(tmp_path: Path) -> None:
    from knowledge.sources import KnowledgeSource, Triple

    class Split:  # a plugin's own split marker: its repr is Python's default, with an address
        pass

    class Marked(KnowledgeSource):  # not registered
        name = "marked"

        def triples(self, q):
            yield Triple("a", "r", "b")
            for i in range(2):
                yield Triple("a", "r", f"c{i}", split=Split(), where=f"m:{i + 1}")

    _, rep = build_graph([Marked(on_error="skip")], valid=0, test=0)
    by_reason = rep.quarantine["marked"]["by_reason"]
    assert len(by_reason) == 1 and list(by_reason.values()) == [2]  # one reason, counted twice
    assert "0x" not in next(iter(by_reason)) and "Split object>" in next(iter(by_reason))
