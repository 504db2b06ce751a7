"""Entity-linking throughput of ``knowledge.link``'s Gazetteer, side by side with naive peers, in one run.

Corpus: the 10,033 Wikipedia lead paragraphs in ``$STELE_DATA/wiki/summaries_en.jsonl`` (text field
``extract``, id ``title``). Gazetteer, one of:

* ``--kg PATH``  a KnowledgeGraph artifact folder (entities.parquet, relations.parquet, triples.parquet),
  e.g. the output of ``knowledge.ingest`` over WordNet + countryinfo; names + aliases, degree prior.
* ``--titles``   the Wikipedia titles themselves, one entity per title, uniform prior (exact title
  matching finds about 25k mentions of other articles in the extracts).

Measured (one process, one core, wall clock):

* ``gazetteer``  :meth:`Gazetteer.link` over every document: normalisation with the offset map,
  Aho-Corasick (pyahocorasick), boundary checks, leftmost-longest choice, offset mapping.
* ``re peer``    what one writes without a matcher library: one compiled ``re`` alternation of the same
  normalised names, longest first, with the same word-boundary lookarounds (so it has the same
  leftmost-longest semantics), on the same normalised text with the same offset mapping.
* ``find peer``  per-name ``str.find`` loops over each normalised document, then the same boundary
  check and leftmost-longest choice.

Peers are slow, so each runs over the corpus in order until ``--peer-seconds`` is spent; MB/s is over
the documents it finished, and its mentions are checked against the gazetteer's on those documents
(they must agree exactly, else the comparison is void and the script says so).

    STELE_DATA=/path/to/data python bench/link_throughput.py --titles
    STELE_DATA=/path/to/data python bench/link_throughput.py --kg /path/to/store/artifacts/<key>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from knowledge.link import Gazetteer, Mention, is_word_char, normalize


def load_docs(path: Path, text_field: str, id_field: str) -> list[tuple[str, str]]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{no}: malformed JSON ({e.msg})")
            text = obj.get(text_field)
            if isinstance(text, str) and text.strip():
                docs.append((str(obj.get(id_field, no - 1)), text))
    return docs


def link_all(g: Gazetteer, docs: list[tuple[str, str]]) -> tuple[list[list[Mention]], float]:
    t = time.perf_counter()
    out = [g.link(text) for _, text in docs]
    return out, time.perf_counter() - t


def _key(ms: list[Mention]) -> list[tuple[int, int, int]]:
    return [(m.start, m.end, m.entity_idx) for m in ms]


def re_peer(g: Gazetteer, docs, budget: float):
    """A single ``re`` alternation, longest name first (re takes the first alternative that matches,
    so longest-first gives leftmost-longest), boundaries as lookarounds only on word-character edges."""
    t0 = time.perf_counter()
    keys = sorted(range(len(g.surfaces)), key=lambda i: -len(g.surfaces[i].key))
    alts = []
    for i in keys:
        k = g.surfaces[i].key
        alts.append(("(?<!\\w)" if is_word_char(k[0]) else "") + re.escape(k)
                    + ("(?!\\w)" if is_word_char(k[-1]) else ""))
    pattern = re.compile("|".join(alts))
    surface_of = {s.key: s for s in g.surfaces}
    compile_s = time.perf_counter() - t0
    out, t = [], time.perf_counter()
    for _, text in docs:
        nt = normalize(text, lowercase=g.lowercase, fold_quotes=g.fold_quotes)
        ms = []
        for m in pattern.finditer(nt.text):
            s = surface_of[m.group()]
            a, b = nt.span(m.start(), m.end())
            ms.append((a, b, s.candidates[s.best]))
        out.append(ms)
        if time.perf_counter() - t > budget:
            break
    return out, time.perf_counter() - t, compile_s


def find_peer(g: Gazetteer, docs, budget: float):
    """Per-name ``str.find`` over each normalised document, then boundaries and leftmost-longest."""
    keys = [(s.key, s.candidates[s.best]) for s in g.surfaces]
    out, t = [], time.perf_counter()
    for _, text in docs:
        nt = normalize(text, lowercase=g.lowercase, fold_quotes=g.fold_quotes)
        s, n = nt.text, len(nt.text)
        found = []
        for k, e in keys:
            i = s.find(k)
            while i >= 0:
                j = i + len(k)
                if not ((i > 0 and is_word_char(k[0]) and is_word_char(s[i - 1]))
                        or (j < n and is_word_char(k[-1]) and is_word_char(s[j]))):
                    found.append((i, j, e))
                i = s.find(k, i + 1)
        found.sort(key=lambda m: (m[0], -m[1]))
        ms, taken = [], 0
        for a, b, e in found:
            if a >= taken:
                taken = b
                ms.append((*nt.span(a, b), e))
        out.append(ms)
        if time.perf_counter() - t > budget:
            break
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--kg", type=Path, help="KnowledgeGraph artifact folder")
    src.add_argument("--titles", action="store_true", help="use the Wikipedia titles as gazetteer")
    ap.add_argument("--data", type=Path, default=None,
                    help="JSONL corpus (default $STELE_DATA/wiki/summaries_en.jsonl)")
    ap.add_argument("--text-field", default="extract")
    ap.add_argument("--id-field", default="title")
    ap.add_argument("--prior", choices=["degree", "uniform"], default=None,
                    help="default: degree with --kg, uniform with --titles")
    ap.add_argument("--min-length", type=int, default=3)
    ap.add_argument("--case-sensitive", action="store_true",
                    help="match case exactly (the '~25k title mentions' figure is case-sensitive)")
    ap.add_argument("--peer-seconds", type=float, default=20.0,
                    help="time budget of each naive peer (0 skips the peers)")
    args = ap.parse_args()

    data = args.data
    if data is None:
        root = os.environ.get("STELE_DATA")
        if not root:
            sys.exit("set STELE_DATA (the shared data folder) or pass --data")
        data = Path(root) / "wiki" / "summaries_en.jsonl"
    if not data.is_file():
        sys.exit(f"{data}: no such file")

    docs = load_docs(data, args.text_field, args.id_field)
    mb = sum(len(t.encode("utf-8")) for _, t in docs) / 1e6
    t = time.perf_counter()
    if args.kg:
        from knowledge.kg import KnowledgeGraph

        kg = KnowledgeGraph.load(args.kg)
        g = Gazetteer.from_kg(kg, prior=args.prior or "degree", min_length=args.min_length,
                              lowercase=not args.case_sensitive)
        what = f"KG {args.kg} ({kg.num_entities} entities)"
    else:
        titles = [d for d, _ in docs]
        g = Gazetteer.from_names(titles, prior=args.prior or "uniform", min_length=args.min_length,
                                 lowercase=not args.case_sensitive)
        what = f"{len(titles)} Wikipedia titles"
    what += ", case-sensitive" if args.case_sensitive else ", case-folded"
    build_s = time.perf_counter() - t
    print(f"corpus: {data} — {len(docs)} documents, {mb:.2f} MB of UTF-8 text")
    print(f"gazetteer: {what}: {len(g)} surfaces, {g.stats['ambiguous_surfaces']} ambiguous, "
          f"built in {build_s:.2f} s; {g.stats}")

    mentions, link_s = link_all(g, docs)
    flat = [m for ms in mentions for m in ms]
    other = sum(1 for (d, _), ms in zip(docs, mentions) for m in ms if m.entity_id != d) \
        if args.titles else None
    print(f"\ngazetteer  : {link_s:7.2f} s  {mb / link_s:8.2f} MB/s  {len(docs) / link_s:9.0f} docs/s  "
          f"{len(flat)} mentions in {sum(1 for ms in mentions if ms)} docs, "
          f"{len({m.entity_idx for m in flat})} distinct entities, "
          f"ambiguous share {sum(m.n_candidates > 1 for m in flat) / max(len(flat), 1):.3f}")
    if other is not None:
        print(f"             {other} mentions of OTHER articles (a document's own title excluded)")
    top = Counter(m.entity_id for m in flat).most_common(8)
    print("             most linked: " + ", ".join(f"{e} ({c})" for e, c in top))

    if args.peer_seconds <= 0:
        return
    ours = [_key(ms) for ms in mentions]
    for name, fn in (("re peer", re_peer), ("find peer", find_peer)):
        res = fn(g, docs, args.peer_seconds)
        out, secs = res[0], res[1]
        extra = f" (+{res[2]:.2f} s to compile the pattern)" if len(res) > 2 else ""
        n = len(out)
        pmb = sum(len(t.encode("utf-8")) for _, t in docs[:n]) / 1e6
        agree = all(a == b for a, b in zip(out, ours[:n]))
        _, ours_s = link_all(g, docs[:n])  # the gazetteer again, on exactly the peer's documents
        print(f"{name:11s}: {secs:7.2f} s  {pmb / secs:8.3f} MB/s  over the first {n} documents "
              f"({pmb:.2f} MB){extra}; mentions identical to the gazetteer's: {agree}")
        if not agree:
            bad = next(i for i, (a, b) in enumerate(zip(out, ours[:n])) if a != b)
            print(f"             first difference in document {docs[bad][0]!r}: peer "
                  f"{out[bad][:5]} vs gazetteer {ours[bad][:5]}")
        print(f"             gazetteer on the same documents: {ours_s:.2f} s, {pmb / ours_s:.2f} MB/s "
              f"-> gazetteer / {name} = {secs / ours_s:.1f}x")


if __name__ == "__main__":
    main()
