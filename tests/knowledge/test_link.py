"""knowledge.link: gazetteer matching rules, offsets into the original text, priors, bad input."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from knowledge.kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from knowledge.link import Gazetteer, Mention, normalize
from knowledge.sources.base import SourceError
from pipeline import Artifact, Resources, StageContext, StageFailed

ENTITIES = [
    # idx, id, name, aliases
    (0, "geo:paris", "Paris", ["City of Light"]),
    (1, "myth:paris", "Paris", []),
    (2, "geo:france", "France", []),
    (3, "geo:new_york", "New York", ["NY"]),
    (4, "geo:nyc", "New York City", ["NYC"]),
    (5, "geo:civ", "Côte d'Ivoire", ["Ivory Coast"]),
    (6, "unit:inch", "inch", ["in"]),
    (7, "geo:troy", "Troy", []),
]


def tiny_kg() -> KnowledgeGraph:
    ents = pa.table({
        "idx": [e[0] for e in ENTITIES], "id": [e[1] for e in ENTITIES],
        "name": [e[2] for e in ENTITIES], "aliases": [e[3] for e in ENTITIES],
        "description": [""] * len(ENTITIES), "types": [[] for _ in ENTITIES],
        "source": ["test"] * len(ENTITIES),
    }, schema=ENTITY_SCHEMA)
    rels = pa.table({"idx": [0, 1], "id": ["r:capital", "r:near"], "name": ["capital", "near"],
                     "source": ["test"] * 2}, schema=RELATION_SCHEMA)
    # Train degrees: geo:paris 3, myth:paris 1. The valid/test triples would make myth:paris the
    # best connected if they counted; they must not (no leakage from evaluation splits).
    triples = [(0, 0, 2, "train"), (2, 0, 0, "train"), (0, 1, 3, "train"), (1, 1, 7, "train"),
               (1, 1, 7, "valid"), (7, 1, 1, "test"), (1, 1, 2, "test"), (1, 1, 3, "test")]
    tri = pa.table({"head": [t[0] for t in triples], "relation": [t[1] for t in triples],
                    "tail": [t[2] for t in triples], "split": [t[3] for t in triples]},
                   schema=TRIPLE_SCHEMA)
    return KnowledgeGraph(ents, rels, tri)


@pytest.fixture(scope="module")
def gaz() -> Gazetteer:
    return Gazetteer.from_kg(tiny_kg())


def spans(ms: list[Mention]) -> list[tuple[int, int, str, str]]:
    return [(m.start, m.end, m.surface, m.entity_id) for m in ms]


def at(text: str, sub: str, nth: int = 0) -> tuple[int, int]:
    i = -1
    for _ in range(nth + 1):
        i = text.index(sub, i + 1)
    return i, i + len(sub)


# -- offsets ---------------------------------------------------------------------------------------
def test_exact_spans_in_original_text(gaz: Gazetteer) -> None:
    # Mixed case, a whitespace run with a newline, a typographic apostrophe, a ligature that NFKC
    # expands to two characters ("ﬁ" -> "fi") and a decomposed "ô" before the mentions: every one
    # shifts normalised offsets against original ones.
    text = "Ölstadt ﬁrst:  trade with   CÔTE\n D’IVOIRE,\tthen Co\u0302te d'Ivoire and ivory   COAST."
    ms = gaz.link(text)
    assert spans(ms) == [
        (*at(text, "CÔTE\n D’IVOIRE"), "CÔTE\n D’IVOIRE", "geo:civ"),
        (*at(text, "Co\u0302te d'Ivoire"), "Co\u0302te d'Ivoire", "geo:civ"),
        (*at(text, "ivory   COAST"), "ivory   COAST", "geo:civ"),
    ]
    for m in ms:
        assert text[m.start:m.end] == m.surface


def test_normalize_maps_every_character_back() -> None:
    text = "A\u00a0 b\tﬁ  Ç\u0327x\ne\u0301É"
    nt = normalize(text)
    assert nt.text == "a b fi ç̧x éé"
    # Each normalised character maps to the original characters it came from.
    assert nt.span(0, 1) == (0, 1)
    assert nt.span(1, 2) == (1, 3)                      # NBSP + space -> one space
    assert nt.span(4, 6) == (5, 6)                      # "fi" <- the one ligature character
    assert text[slice(*nt.span(7, 9))] == "Ç\u0327"     # casefolded, composed where possible
    assert text[slice(*nt.span(11, 13))] == "e\u0301É"


def test_random_texts_find_every_inserted_name_at_its_offsets() -> None:
    names = ["New York City", "Côte d'Ivoire", "France", "Troy", "Ivory Coast"]
    g = Gazetteer.from_names(names)
    rng = random.Random(7)
    seps = [" ", "  ", "\n", "\t ", "\u00a0", ", ", " — ", " (", ") ", " ﬁ ", " ß "]
    variants = {
        "New York City": ["NEW  YORK\ncity", "new york city", "New\u00a0York City"],
        "Côte d'Ivoire": ["CÔTE D’IVOIRE", "Co\u0302te d'ivoire", "côte  d'Ivoire"],
        "France": ["FRANCE", "france", "Ｆｒａｎｃｅ"],  # fullwidth letters: NFKC folds them
        "Troy": ["TROY", "troy"],
        "Ivory Coast": ["IVORY\tCOAST", "Ivory coast"],
    }
    for _ in range(200):
        parts, expected, pos = [], [], 0
        for _ in range(rng.randint(1, 6)):
            sep = rng.choice(seps)
            name = rng.choice(names)
            surface = rng.choice(variants[name])
            parts += [sep, surface]
            pos += len(sep)
            expected.append((pos, pos + len(surface), surface, name))
            pos += len(surface)
        text = "".join(parts) + rng.choice(seps)
        assert spans(g.link(text)) == expected, text


# -- matching rules --------------------------------------------------------------------------------
def test_word_boundaries(gaz: Gazetteer) -> None:
    text = "Parisian cafés and Troyes are not Paris or Troy; xParis, Paris_ neither."
    assert [m.surface for m in gaz.link(text)] == ["Paris", "Troy"]
    assert gaz.link(text)[0].start == text.index(" Paris ") + 1


def test_boundary_only_where_the_name_has_a_word_character() -> None:
    g = Gazetteer.from_names(["C++", "Plan 9"], min_length=1)
    text = "C++11 and Plan 9s, but C++ and Plan 9."
    assert [(m.start, m.surface) for m in g.link(text)] == [(0, "C++"), (23, "C++"), (31, "Plan 9")]


def test_longest_match_wins(gaz: Gazetteer) -> None:
    text = "She moved to New York City, then New York."
    assert spans(gaz.link(text)) == [(*at(text, "New York City"), "New York City", "geo:nyc"),
                                     (*at(text, "New York", 1), "New York", "geo:new_york")]


def test_longer_name_failing_its_boundary_falls_back_to_shorter(gaz: Gazetteer) -> None:
    # "New York City" ends inside "Cityscape"; "New York" is still a whole-word mention.
    assert [m.entity_id for m in gaz.link("the New York Cityscape")] == ["geo:new_york"]


def test_non_overlapping_leftmost_first() -> None:
    g = Gazetteer.from_names(["New York", "York City", "City Hall"])
    ms = g.link("New York City Hall")
    assert [m.surface for m in ms] == ["New York", "City Hall"]
    assert all(a.end <= b.start for a, b in zip(ms, ms[1:]))


# -- ambiguity -------------------------------------------------------------------------------------
def test_ambiguity_resolved_by_train_degree(gaz: Gazetteer) -> None:
    (m,) = gaz.link("Paris")
    # Candidates geo:paris (train degree 3) and myth:paris (train degree 1; 3 more in valid/test).
    assert m.entity_id == "geo:paris" and m.entity_idx == 0
    assert m.n_candidates == 2
    assert m.score == pytest.approx((3 + 1) / ((3 + 1) + (1 + 1)))
    assert gaz.candidates("PARIS") == [(0, "geo:paris", pytest.approx(4 / 6)),
                                       (1, "myth:paris", pytest.approx(2 / 6))]
    (u,) = Gazetteer.from_kg(tiny_kg(), prior="uniform").link("Paris")
    assert (u.entity_idx, u.score, u.n_candidates) == (0, 0.5, 2)


def test_degree_prior_follows_the_graph() -> None:
    kg = tiny_kg()
    # Make myth:paris the better-connected one in train: the choice must follow.
    extra = pa.table({"head": [1] * 5, "relation": [1] * 5, "tail": [7] * 5, "split": ["train"] * 5},
                     schema=TRIPLE_SCHEMA)
    kg = KnowledgeGraph(kg.entities, kg.relations, pa.concat_tables([kg.triples, extra]))
    (m,) = Gazetteer.from_kg(kg).link("Paris")
    assert m.entity_id == "myth:paris"
    assert m.score == pytest.approx(7 / (7 + 4))


# -- noise control ---------------------------------------------------------------------------------
def test_stop_list_and_min_length() -> None:
    text = "I ran an inch in NY."
    g = Gazetteer.from_kg(tiny_kg())
    assert [m.surface for m in g.link(text)] == ["inch"]  # "in" is short and a stop word; "NY" short
    assert g.stats["dropped_short"] == 2  # "NY", "in"
    loose = Gazetteer.from_kg(tiny_kg(), min_length=1, stopwords=None)
    assert [m.surface for m in loose.link(text)] == ["inch", "in", "NY"]
    stop_only = Gazetteer.from_kg(tiny_kg(), min_length=1)
    assert [m.surface for m in stop_only.link(text)] == ["inch", "NY"]
    assert stop_only.stats["dropped_stopword"] == 1


def test_case_sensitive_option() -> None:
    g = Gazetteer.from_kg(tiny_kg(), lowercase=False)
    assert [m.surface for m in g.link("troy and Troy")] == ["Troy"]


# -- the stage -------------------------------------------------------------------------------------
def _ctx(tmp: Path, kg_dir: Path) -> StageContext:
    out = tmp / "out"
    out.mkdir(parents=True)
    return StageContext(stage="link", key="k" * 64, out=out,
                        inputs={"kg": Artifact("g" * 64, kg_dir, {})}, resources=Resources(),
                        state_uri=str(tmp / "state"), log=logging.getLogger("test.link"))


@pytest.fixture()
def kg_dir(tmp_path: Path) -> Path:
    d = tmp_path / "kg"
    d.mkdir()
    tiny_kg().save(d)
    return d


def _run_stage(tmp: Path, kg_dir: Path, **params):
    from knowledge.stages.link import LinkParams, link

    ctx = _ctx(tmp, kg_dir)
    metrics = link(ctx, LinkParams(**params))
    return ctx.out, metrics


def _write_bad_jsonl(path: Path) -> None:
    lines = [
        json.dumps({"id": "d1", "text": "Paris is the capital of France."}).encode(),
        b'{"id": "d2", "text": "New York',                                 # 2: malformed JSON
        json.dumps({"id": "d3", "body": "no text field"}).encode(),         # 3: missing field
        json.dumps({"id": "d4", "text": "   "}).encode(),                   # 4: empty text
        b'{"id": "d5", "text": "caf\xe9 in Paris"}',                        # 5: Latin-1, not UTF-8
        b"",                                                                # 6: blank line
        json.dumps({"text": "Troy  and  C\u00f4te d\u2019Ivoire"}, ensure_ascii=False).encode(),
        json.dumps({"id": "d1", "text": "again Paris"}).encode(),           # 8: duplicate id
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_line_raises_with_file_and_line(tmp_path: Path, kg_dir: Path) -> None:
    src = tmp_path / "docs.jsonl"
    _write_bad_jsonl(src)
    with pytest.raises(SourceError, match=rf"{src}:2: malformed JSON") as e:
        _run_stage(tmp_path, kg_dir, text=str(src))
    assert isinstance(e.value, StageFailed)


def test_stage_skip_mode_counts_bad_lines_and_writes_tables(tmp_path: Path, kg_dir: Path) -> None:
    src = tmp_path / "docs.jsonl"
    _write_bad_jsonl(src)
    out, m = _run_stage(tmp_path, kg_dir, text=str(src), on_error="skip")
    q = m["quarantine"]
    assert q["count"] == 5
    assert {ex["where"] for ex in q["examples"]} == {f"{src}:{n}" for n in (2, 3, 4, 5, 8)}
    assert q["by_reason"]["missing text field 'text'"] == 1
    assert q["by_reason"]["empty text field 'text'"] == 1
    assert q["by_reason"]["duplicate document id 'd1'"] == 1
    assert json.loads((out / "quarantine.json").read_text())["count"] == 5
    assert m["blank_lines"] == 1

    docs = pq.read_table(out / "docs.parquet").to_pylist()
    assert [d["doc_id"] for d in docs] == ["d1", "6"]  # line 7 has no id: its 0-based row number
    mentions = pq.read_table(out / "mentions.parquet").to_pylist()
    text = {d["doc_id"]: d["text"] for d in docs}
    got = [(r["doc_id"], r["surface"], r["entity_id"]) for r in mentions]
    assert got == [("d1", "Paris", "geo:paris"), ("d1", "France", "geo:france"),
                   ("6", "Troy", "geo:troy"), ("6", "Côte d\u2019Ivoire", "geo:civ")]
    for r in mentions:
        assert text[r["doc_id"]][r["start"]:r["end"]] == r["surface"]
    assert mentions[0]["n_candidates"] == 2
    assert mentions[0]["score"] == pytest.approx(4 / 6)
    assert [d["n_mentions"] for d in docs] == [2, 2]
    assert (m["documents"], m["mentions"], m["linked_entities"]) == (2, 4, 4)
    assert m["ambiguous_share"] == pytest.approx(0.25)
    assert m["mb_per_s"] > 0
    assert "geo:paris" in (out / "top_entities.csv").read_text()


def test_stage_reads_parquet_and_hf_dataset(tmp_path: Path, kg_dir: Path) -> None:
    rows = {"body": ["Troy fell.", None, "New York City"], "key": ["a", "b", "c"]}
    pq.write_table(pa.table(rows), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match=r"t\.parquet:row 1: missing text field 'body'"):
        _run_stage(tmp_path / "p0", kg_dir, text=str(tmp_path / "t.parquet"), text_field="body",
                   id_field="key")
    _, m = _run_stage(tmp_path / "p1", kg_dir, text=str(tmp_path / "t.parquet"), text_field="body",
                      id_field="key", on_error="skip")
    assert (m["documents"], m["mentions"], m["quarantine"]["count"]) == (2, 2, 1)

    import datasets

    datasets.Dataset.from_dict({"text": ["Paris, France", "an inch"]}).save_to_disk(
        str(tmp_path / "hf"))
    out, m = _run_stage(tmp_path / "h", kg_dir, text=str(tmp_path / "hf"))
    assert pq.read_table(out / "docs.parquet")["doc_id"].to_pylist() == ["0", "1"]
    assert pq.read_table(out / "mentions.parquet")["surface"].to_pylist() == ["Paris", "France",
                                                                              "inch"]
    with pytest.raises(StageFailed, match="no column 'txt'"):
        _run_stage(tmp_path / "h2", kg_dir, text=str(tmp_path / "hf"), text_field="txt")


def test_stage_is_registered_and_fingerprints_the_text_file(tmp_path: Path) -> None:
    from knowledge.stages.link import LinkParams
    from pipeline.registry import REGISTRY

    st = REGISTRY.get("knowledge.link")
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "Paris"}\n')
    params = LinkParams(text=str(src))
    before = st.fingerprint(params)
    assert st.fingerprint(params) == before
    src.write_text('{"text": "Paris!"}\n')
    os.utime(src, ns=(0, 0))  # a different size and mtime: edited text must change the key
    assert st.fingerprint(params) != before
