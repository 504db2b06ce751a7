"""Princeton WordNet, read straight from its database files (WNDB, wndb(5WN), wninput(5WN)).

Files: ``data.{noun,verb,adj,adv}`` (one synset a line: ``offset lex_filenum ss_type w_cnt(hex)
word lex_id(hex) ... p_cnt ptr... [frames] | gloss``; each pointer is ``symbol offset pos
source/target``), ``index.{noun,verb,adj,adv}`` (``lemma pos synset_cnt p_cnt ptr... sense_cnt
tagsense_cnt offset...``) and ``lexnames`` (``num name lexfile_num``). Lines that start with a space
are the licence header.

Mapping:

- Entities are synsets, ids NLTK-style ``dog.n.01``: the first lemma (lower-cased, with any adjective
  marker such as ``(a)``/``(ip)`` removed), the synset type (``s`` for adjective satellites, like NLTK),
  and the 1-based position of the synset's offset in that lemma's ``index.<pos>`` line (for ``s`` the
  ``index.adj`` line, as NLTK does). ``name`` = first lemma, ``aliases`` = the other lemmas
  (underscores -> spaces), ``description`` = the gloss, ``types`` = [the lexname, e.g.
  ``noun.animal``].
- Relations are pointer symbols (id ``@``, ``%m``, ...), named like NLTK's methods (``hypernym``).
- Triples: semantic pointers (source/target ``0000``) link the two synsets. Lexical pointers (between
  two words, e.g. ``+`` derivation, ``!`` antonym) are also kept, collapsed to the pair of synsets that
  hold the words, as WN18/WN18RR did (their ``_derivationally_related_form`` is lexical ``+``).
  Duplicates within a synset (several word pairs of one pair of synsets) are yielded once.
- ``relations: wn18rr`` keeps only WN18RR's 11 relations (Dettmers et al. 2018), in the direction the
  pointer is stored (WN18 named each pointer from its source synset; checked against WN18RR lines such as
  ``militia.n.01 _synset_domain_topic_of military.n.01`` = ``;c``), and names them with WN18RR's names.
  Ids stay the pointer symbols in both modes.

Malformed data lines and pointers to unknown synsets are quarantined with ``file:line``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, PrivateAttr

from pipeline.quarantine import describe
from pipeline.uris import InputURI, URIPath, input_path

from .base import (Entity, KnowledgeSource, Quarantine, Relation, SourceError, Triple, read_lines,
                   source)

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POINTER_NAMES = {
    "!": "antonym", "@": "hypernym", "@i": "instance_hypernym", "~": "hyponym",
    "~i": "instance_hyponym", "#m": "member_holonym", "#s": "substance_holonym",
    "#p": "part_holonym", "%m": "member_meronym", "%s": "substance_meronym", "%p": "part_meronym",
    "=": "attribute", "+": "derivationally_related_form", ";c": "topic_domain",
    "-c": "in_topic_domain", ";r": "region_domain", "-r": "in_region_domain", ";u": "usage_domain",
    "-u": "in_usage_domain", "*": "entailment", ">": "cause", "^": "also_see", "$": "verb_group",
    "&": "similar_to", "<": "participle", "\\": "pertainym",
}
WN18RR = {
    "@": "_hypernym", "@i": "_instance_hypernym", "%m": "_member_meronym", "%p": "_has_part",
    ";c": "_synset_domain_topic_of", "-u": "_member_of_domain_usage",
    "-r": "_member_of_domain_region", "+": "_derivationally_related_form", "^": "_also_see",
    "$": "_verb_group", "&": "_similar_to",
}
MARKER = re.compile(r"\(.*\)$")  # adjective position markers: (a), (p), (ip)


def default_path() -> Path | URIPath:
    """``$STELE_DATA/wordnet``, else NLTK's data folder, else the Debian/Ubuntu package's."""
    if os.environ.get("STELE_DATA"):
        return input_path(os.environ["STELE_DATA"]) / "wordnet"
    for p in (Path.home() / "nltk_data" / "corpora" / "wordnet", Path("/usr/share/wordnet")):
        if p.is_dir():
            return p
    raise SourceError("no WordNet folder: set path:, or STELE_DATA (uses $STELE_DATA/wordnet), or "
                      "install it at ~/nltk_data/corpora/wordnet or /usr/share/wordnet")


@source("wordnet")
class WordNetSource(KnowledgeSource):
    """Princeton WordNet from its database files (WNDB): synsets, their pointers, glosses."""

    path: InputURI | None = Field(default=None,
                                  description="WNDB folder, a path or a URI (default: "
                                              "$STELE_DATA/wordnet, NLTK's, /usr/share/wordnet)")
    # A field named `relations` would shadow the method, so it is `relations_` with that alias.
    relations_: Literal["all", "wn18rr"] = Field(
        default="all", alias="relations",
        description="all pointers, or exactly WN18RR's 11 relations with their names")

    model_config = ConfigDict(populate_by_name=True)
    _names: dict[tuple[str, int], str] | None = PrivateAttr(default=None)

    def folder(self) -> Path | URIPath:
        root = input_path(self.path) if self.path else default_path()
        if not root.is_dir():
            raise SourceError(f"{root}: WordNet folder does not exist")
        for f in self.files(root):
            if not f.is_file():
                raise SourceError(f"{root}: WordNet folder lacks {f.name} (expected the WNDB files "
                                  f"data.*, index.*, lexnames)")
        return root

    def files(self, root: Path | URIPath | None = None) -> list[Path | URIPath]:
        root = root or (input_path(self.path) if self.path else default_path())
        return ([root / f"data.{s}" for s in POS_FILES.values()]
                + [root / f"index.{s}" for s in POS_FILES.values()] + [root / "lexnames"])

    def _lexnames(self, root: Path | URIPath, q: Quarantine) -> dict[int, str]:
        out = {}
        for no, line in read_lines(root / "lexnames", q):
            parts = line.split()
            if len(parts) < 2 or not parts[0].isdigit():
                q.bad(f"{root / 'lexnames'}:{no}", "malformed lexnames line", line)
                continue
            out[int(parts[0])] = parts[1]
        return out

    def _index(self, root: Path | URIPath, q: Quarantine) -> dict[tuple[str, str], list[int]]:
        """``(lemma, pos letter) -> synset offsets`` in sense order."""
        out: dict[tuple[str, str], list[int]] = {}
        for pos, stem in POS_FILES.items():
            f = root / f"index.{stem}"
            for no, line in read_lines(f, q):
                if line.startswith(" ") or not line:
                    continue
                try:
                    tok = line.split()
                    n_synsets, n_ptrs = int(tok[2]), int(tok[3])
                    offsets = [int(x) for x in tok[6 + n_ptrs:6 + n_ptrs + n_synsets]]
                    if len(offsets) != n_synsets:
                        raise ValueError("fewer offsets than synset_cnt")
                except (ValueError, IndexError) as e:
                    q.bad(f"{f}:{no}", f"malformed index line ({describe(e)})", line)
                    continue
                out[(tok[0], pos)] = offsets
        return out

    def _synsets(self, q: Quarantine) -> Iterator[tuple[str, str, int, dict]]:
        """``(file, ss_type, line no, fields)`` of every well-formed data line."""
        root = self.folder()
        for stem in POS_FILES.values():
            f = root / f"data.{stem}"
            for no, line in read_lines(f, q):
                if line.startswith(" ") or not line:
                    continue
                try:
                    yield str(f), stem, no, _parse_data_line(line)
                except (ValueError, IndexError) as e:
                    q.bad(f"{f}:{no}", f"malformed data line ({describe(e)})", line)

    def _name_map(self, q: Quarantine) -> dict[tuple[str, int], str]:
        """``(pos letter of the data file, offset) -> NLTK name``; built once per source object."""
        if self._names is not None:
            return self._names
        root = self.folder()
        index = self._index(root, q)
        names: dict[tuple[str, int], str] = {}
        for f, _, no, s in self._synsets(q):
            lemma = s["lemmas"][0].lower()
            # Satellites are listed among the adjective offsets of index.adj (NLTK does the same).
            offsets = index.get((lemma, "a" if s["pos"] == "s" else s["pos"]), [])
            if s["offset"] not in offsets:
                q.bad(f"{f}:{no}", f"first lemma {lemma!r} has no index entry for this synset",
                      str(s["offset"]))
                continue
            names[(_file_pos(s["pos"]), s["offset"])] = (
                f"{lemma}.{s['pos']}.{offsets.index(s['offset']) + 1:02d}")
        self._names = names
        return names

    def entities(self, q: Quarantine) -> Iterator[Entity]:
        names = self._name_map(q)
        lexnames = self._lexnames(self.folder(), q)
        for _, _, _, s in self._synsets(_Silent()):  # bad lines were reported by _name_map
            name = names.get((_file_pos(s["pos"]), s["offset"]))
            if name is None:
                continue
            words = [w.replace("_", " ") for w in s["lemmas"]]
            yield Entity(name, name=words[0], aliases=words[1:], description=s["gloss"],
                         types=[lexnames[s["lex"]]] if s["lex"] in lexnames else [])

    def relations(self, q: Quarantine) -> Iterator[Relation]:
        table = WN18RR if self.relations_ == "wn18rr" else POINTER_NAMES
        for sym, name in table.items():
            yield Relation(sym, name=name)

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        names = self._name_map(q)
        keep = WN18RR if self.relations_ == "wn18rr" else None
        for f, _, no, s in self._synsets(_Silent()):
            head = names.get((_file_pos(s["pos"]), s["offset"]))
            if head is None:
                continue
            done = set()
            for sym, offset, pos in s["pointers"]:
                if keep is not None and sym not in keep:
                    continue
                tail = names.get((_file_pos(pos), offset))
                if tail is None:
                    q.bad(f"{f}:{no}", f"pointer {sym} to unknown synset {offset:08d} {pos}")
                    continue
                if (sym, tail) not in done:
                    done.add((sym, tail))
                    yield Triple(head, sym, tail, where=f"{f}:{no}")


class _Silent(Quarantine):
    """Second passes over data files: their bad lines were already reported on the first pass."""

    def __init__(self) -> None:
        super().__init__("wordnet", "skip")


def _file_pos(ss_type: str) -> str:
    return "a" if ss_type == "s" else ss_type


def _parse_data_line(line: str) -> dict:
    body, _, gloss = line.partition(" | ")
    tok = body.split()
    offset, lex, pos = int(tok[0]), int(tok[1]), tok[2]
    if pos not in ("n", "v", "a", "s", "r"):
        raise ValueError(f"unknown synset type {pos!r}")
    n_words = int(tok[3], 16)
    lemmas = [MARKER.sub("", tok[4 + 2 * i]) for i in range(n_words)]
    i = 4 + 2 * n_words
    n_ptrs = int(tok[i])
    pointers = []
    for j in range(i + 1, i + 1 + 4 * n_ptrs, 4):
        sym, target, tpos, st = tok[j:j + 4]
        if tpos not in ("n", "v", "a", "s", "r") or len(st) != 4:
            raise ValueError(f"malformed pointer {' '.join(tok[j:j + 4])!r}")
        pointers.append((sym, int(target), tpos))
    if not lemmas or len(pointers) != n_ptrs:
        raise ValueError("truncated line")
    return {"offset": offset, "lex": lex, "pos": pos, "lemmas": lemmas, "pointers": pointers,
            "gloss": gloss.strip()}
