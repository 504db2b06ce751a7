"""The wordnet source on a tiny WNDB folder (and on real WordNet 3.0 when STELE_DATA is set)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import knowledge.sources.wordnet as wnmod
from knowledge.sources import SOURCES, Quarantine, SourceError, build_source

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
# Offsets are not byte offsets here: the reader parses lines and never seeks, unlike NLTK.
DATA = {
    "noun": [
        "00000001 03 n 01 entity 0 001 ~ 00000002 n 0000 | that which exists  ",
        "00000002 05 n 02 dog 0 domestic_dog 0 003 @ 00000001 n 0000 ;c 00000003 n 0000 "
        "+ 00000010 v 0101 | a domesticated canid  ",
        "00000003 09 n 01 zoology 0 001 -c 00000002 n 0000 | the study of animals  ",
        "00000004 18 n 01 dog 1 001 @ 00000001 n 0000 | a dull unattractive person  ",
    ],
    "verb": ["00000010 29 v 01 dog 0 001 + 00000002 n 0101 01 + 01 00 | follow closely  "],
    "adj": [
        "00000020 00 a 01 big 0 001 & 00000021 s 0000 | above average in size  ",
        "00000021 00 s 02 large(a) 0 huge 0 001 & 00000020 a 0000 | very big  ",
    ],
    "adv": ["00000030 02 r 01 quickly 0 000 | with speed  "],
}
INDEX = {
    # dog's sense order comes from here (the person first), not from the data file's order.
    "noun": ["dog n 2 3 @ ;c + 2 1 00000004 00000002", "domestic_dog n 1 3 @ ;c + 1 0 00000002",
             "entity n 1 1 ~ 1 1 00000001", "zoology n 1 1 -c 1 0 00000003"],
    "verb": ["dog v 1 1 + 1 0 00000010"],
    "adj": ["big a 1 1 & 1 0 00000020", "huge a 1 1 & 1 0 00000021",
            "large a 1 1 & 1 0 00000021"],
    "adv": ["quickly r 1 0 1 0 00000030"],
}
LEXNAMES = ("00\tadj.all\t3\n02\tadv.all\t4\n03\tnoun.Tops\t1\n05\tnoun.animal\t1\n"
            "09\tnoun.cognition\t1\n18\tnoun.person\t1\n29\tverb.body\t2\n")


def make_wndb(root: Path, data: dict | None = None, index: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, lines in (data or DATA).items():
        (root / f"data.{stem}").write_text(HEADER + "\n".join(lines) + "\n")
    for stem, lines in (index or INDEX).items():
        (root / f"index.{stem}").write_text(HEADER + "\n".join(lines) + "\n")
    (root / "lexnames").write_text(LEXNAMES)
    return root


def _triples(src, q=None):
    return [(t.head, t.relation, t.tail) for t in src.triples(q or Quarantine("wordnet"))]


def test_entities(tmp_path):
    src = SOURCES.get("wordnet")(path=str(make_wndb(tmp_path / "wn")))
    ents = {e.id: e for e in src.entities(Quarantine("wordnet"))}
    assert list(ents) == ["entity.n.01", "dog.n.02", "zoology.n.01", "dog.n.01", "dog.v.01",
                          "big.a.01", "large.s.01", "quickly.r.01"]
    dog = ents["dog.n.02"]
    assert (dog.name, dog.aliases, dog.description, dog.types) == (
        "dog", ["domestic dog"], "a domesticated canid", ["noun.animal"])
    # The adjective marker "(a)" is not part of the lemma; satellites are "s" like NLTK.
    assert (ents["large.s.01"].name, ents["large.s.01"].aliases) == ("large", ["huge"])
    assert ents["dog.n.01"].types == ["noun.person"]


def test_all_relations(tmp_path):
    src = build_source({"type": "wordnet", "path": str(make_wndb(tmp_path / "wn"))})
    assert _triples(src) == [
        ("entity.n.01", "~", "dog.n.02"),
        ("dog.n.02", "@", "entity.n.01"), ("dog.n.02", ";c", "zoology.n.01"),
        ("dog.n.02", "+", "dog.v.01"),  # lexical pointer, collapsed to the two synsets
        ("zoology.n.01", "-c", "dog.n.02"),
        ("dog.n.01", "@", "entity.n.01"),
        ("dog.v.01", "+", "dog.n.02"),
        ("big.a.01", "&", "large.s.01"), ("large.s.01", "&", "big.a.01"),
    ]
    rels = {r.id: r.name for r in src.relations(Quarantine("wordnet"))}
    assert rels["@"] == "hypernym" and rels["%m"] == "member_meronym" and len(rels) == 26


def test_wn18rr_relations(tmp_path):
    src = build_source({"type": "wordnet", "path": str(make_wndb(tmp_path / "wn")),
                        "relations": "wn18rr"})
    assert _triples(src) == [
        ("dog.n.02", "@", "entity.n.01"), ("dog.n.02", ";c", "zoology.n.01"),
        ("dog.n.02", "+", "dog.v.01"), ("dog.n.01", "@", "entity.n.01"),
        ("dog.v.01", "+", "dog.n.02"),
        ("big.a.01", "&", "large.s.01"), ("large.s.01", "&", "big.a.01"),
    ]
    rels = {r.id: r.name for r in src.relations(Quarantine("wordnet"))}
    assert rels == {"@": "_hypernym", "@i": "_instance_hypernym", "%m": "_member_meronym",
                    "%p": "_has_part", ";c": "_synset_domain_topic_of",
                    "-u": "_member_of_domain_usage", "-r": "_member_of_domain_region",
                    "+": "_derivationally_related_form", "^": "_also_see", "$": "_verb_group",
                    "&": "_similar_to"}


def test_missing_file_names_folder_and_file(tmp_path):
    root = make_wndb(tmp_path / "wn")
    (root / "index.verb").unlink()
    src = SOURCES.get("wordnet")(path=str(root))
    with pytest.raises(SourceError, match=rf"{root}: WordNet folder lacks index\.verb"):
        list(src.entities(Quarantine("wordnet")))
    with pytest.raises(SourceError, match="does not exist"):
        list(SOURCES.get("wordnet")(path=str(tmp_path / "nope")).triples(Quarantine("wordnet")))


def test_malformed_line_and_dangling_pointer(tmp_path):
    data = dict(DATA)
    data["adv"] = DATA["adv"] + ["00000031 02 r zz broken | x",
                                 "00000032 02 r 01 fast 0 001 ! 00000099 r 0101 | quickly"]
    index = {**INDEX, "adv": INDEX["adv"] + ["fast r 1 1 ! 1 0 00000032"]}
    root = make_wndb(tmp_path / "wn", data, index)
    with pytest.raises(SourceError, match=r"data\.adv:3: malformed data line"):
        list(SOURCES.get("wordnet")(path=str(root)).entities(Quarantine("wordnet")))

    src = SOURCES.get("wordnet")(path=str(root), on_error="skip")
    q = Quarantine("wordnet", "skip")
    ents = [e.id for e in src.entities(q)]
    triples = _triples(src, q)
    assert "fast.r.01" in ents and len(ents) == 9
    assert len(triples) == 9  # the dangling antonym is not a triple
    s = q.summary()
    assert s["count"] == 2
    assert [e["where"] for e in s["examples"]] == [f"{root}/data.adv:3", f"{root}/data.adv:4"]
    assert "unknown synset 00000099" in s["examples"][1]["reason"]


def test_default_path_from_stele_data(tmp_path, monkeypatch):
    make_wndb(tmp_path / "wordnet")
    monkeypatch.setenv("STELE_DATA", str(tmp_path))
    src = SOURCES.get("wordnet")()
    assert src.files()[0] == tmp_path / "wordnet" / "data.noun"
    assert len(list(src.entities(Quarantine("wordnet")))) == 8


def test_default_path_missing(tmp_path, monkeypatch):
    if Path("/usr/share/wordnet").is_dir():
        pytest.skip("/usr/share/wordnet exists on this machine")
    monkeypatch.delenv("STELE_DATA", raising=False)
    monkeypatch.setattr(wnmod.Path, "home", lambda: tmp_path)
    with pytest.raises(SourceError, match="no WordNet folder"):
        list(SOURCES.get("wordnet")().entities(Quarantine("wordnet")))


@pytest.mark.skipif(not os.environ.get("STELE_DATA"), reason="needs STELE_DATA with wordnet/")
def test_real_wordnet_counts():
    root = Path(os.environ["STELE_DATA"]) / "wordnet"
    if not (root / "data.noun").is_file():
        pytest.skip(f"{root} has no WordNet")
    q = Quarantine("wordnet")
    src = build_source({"type": "wordnet", "path": str(root), "relations": "wn18rr"})
    ents = [e.id for e in src.entities(q)]
    assert len(ents) == len(set(ents)) == 117_659  # WordNet 3.0
    assert {"dog.n.01", "sensual.s.02", "militia.n.01", "alcidae.n.01"} <= set(ents)
    triples = _triples(src, q)
    # WN18RR's 11 relations over all of WordNet: about 217k triples over about 112k synsets.
    assert len(triples) == 218_367
    assert len({h for h, _, _ in triples} | {t for _, _, t in triples}) == 112_199
    # Lines WN18RR holds (README of villmow/datasets_knowledge_embedding, in NLTK names).
    for t in [("militia.n.01", ";c", "military.n.01"), ("alcidae.n.01", "%m", "pinguinus.n.01"),
              ("sensual.s.02", "+", "sensuality.n.01"), ("clangor.v.01", "@", "sound.v.02")]:
        assert t in set(triples)
    all_src = build_source({"type": "wordnet", "path": str(root)})
    assert len(_triples(all_src, q)) == 364_552
    assert q.count == 0
