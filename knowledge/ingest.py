"""Merge knowledge sources into one KnowledgeGraph: namespacing, alignment, de-duplication, splits,
statistics. No pipeline code here; ``knowledge.stages.ingest`` wraps it as a stage.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .kg import ENTITY_SCHEMA, RELATION_SCHEMA, TRIPLE_SCHEMA, KnowledgeGraph
from .sources.base import SPLITS, Entity, KnowledgeSource, Quarantine, Relation, SourceError

_SPACE = re.compile(r"\s+")


def normalise_name(name: str) -> str:
    """Case- and accent-insensitive form used to align entities by name across sources."""
    s = unicodedata.normalize("NFKD", name.casefold())
    s = "".join(c for c in s if not unicodedata.combining(c))
    return _SPACE.sub(" ", s.replace("_", " ")).strip()


@dataclass
class _Merged:
    """Accumulates records of all sources under namespaced ids (``ns:local``)."""

    entities: dict[str, Entity] = field(default_factory=dict)
    entity_source: dict[str, str] = field(default_factory=dict)
    relations: dict[str, Relation] = field(default_factory=dict)
    relation_source: dict[str, str] = field(default_factory=dict)
    triples: list[tuple[str, str, str, str | None, str]] = field(default_factory=list)
    implied_entities: int = 0
    implied_relations: int = 0
    triples_by_source: list[int] = field(default_factory=list)  # accepted, in the sources' order

    def add_entity(self, e: Entity, src: str) -> None:
        old = self.entities.get(e.id)
        if old is None:
            self.entities[e.id] = e
            self.entity_source[e.id] = src
            return
        # The same id declared twice: keep the first name, union the rest (nothing is lost).
        old.name = old.name or e.name
        old.description = old.description or e.description
        old.aliases = list(dict.fromkeys([*old.aliases, *e.aliases]))
        old.types = list(dict.fromkeys([*old.types, *e.types]))

    def add_relation(self, r: Relation, src: str) -> None:
        if r.id not in self.relations:
            self.relations[r.id] = r
            self.relation_source[r.id] = src
        elif not self.relations[r.id].name:
            self.relations[r.id].name = r.name


def read_sources(sources: list[KnowledgeSource]) -> tuple[_Merged, dict[str, Quarantine]]:
    merged, quarantines = _Merged(), {}
    for src in sources:
        ns = src.ns
        q = quarantines.setdefault(ns, Quarantine(ns, src.on_error))
        for e in src.entities(q):
            merged.add_entity(Entity(f"{ns}:{e.id}", e.name or e.id, list(e.aliases),
                                     e.description, list(e.types)), ns)
        for r in src.relations(q):
            merged.add_relation(Relation(f"{ns}:{r.id}", r.name or r.id), ns)
        n = len(merged.triples)
        for t in src.triples(q):
            if t.split is not None and t.split not in SPLITS:
                q.bad(t.where or t.head, f"unknown split {t.split!r} (expected one of {SPLITS})")
                continue
            h, r, tl = f"{ns}:{t.head}", f"{ns}:{t.relation}", f"{ns}:{t.tail}"
            for eid, local in ((h, t.head), (tl, t.tail)):
                if eid not in merged.entities:  # a bare triple file is a complete source
                    merged.add_entity(Entity(eid, name=local), ns)
                    merged.implied_entities += 1
            if r not in merged.relations:
                merged.add_relation(Relation(r, name=t.relation), ns)
                merged.implied_relations += 1
            merged.triples.append((h, r, tl, t.split, t.where))
        merged.triples_by_source.append(len(merged.triples) - n)
    return merged, quarantines


def no_triples_error(sources: list[KnowledgeSource], merged: _Merged,
                     quarantines: dict[str, Quarantine]) -> SourceError:
    """The error of an ingest whose graph has no triple at all, on one line: each source that gave
    none and why (its file is empty, holds only a header, every line was quarantined: with the
    reasons), and the triples ingest itself quarantined (held-out triples train does not know).
    Without it the empty graph would be a success, and the run fail later in a stage that cannot
    tell why."""
    why = []
    for src, n in zip(sources, merged.triples_by_source):
        if not n:
            why.append(f"source {src.ns!r}: {src.why_no_triples(quarantines[src.ns])}")
    q = quarantines.get("ingest")
    if q is not None and q.count:
        why.append(f"ingest: all {len(merged.triples)} triple(s) quarantined ({q.reasons()})")
    return SourceError("the knowledge graph has no triples: " + ("; ".join(why) or "no source "
                                                                 "gave any"))


def align(merged: _Merged, mode: str, mapping_file: str | None, q: Quarantine) -> dict[str, str]:
    """Map entity ids onto canonical ids: by an explicit TSV mapping (``id<TAB>canonical_id``), or
    by normalised names across different sources (the first source's entity wins). Merged entities
    keep every name as an alias. Returns the mapping (only ids that changed)."""
    mapping: dict[str, str] = {}
    if mapping_file:
        from .sources.base import read_lines

        for no, line in read_lines(mapping_file, q):
            if not line.strip() or line.startswith("#"):
                continue
            cols = line.split("\t")
            where = f"{mapping_file}:{no}"
            if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
                q.bad(where, "expected 'id<TAB>canonical_id'", line)
                continue
            a, b = cols[0].strip(), cols[1].strip()
            missing = [x for x in (a, b) if x not in merged.entities]
            if missing:
                q.bad(where, f"unknown entity id(s): {', '.join(missing)}", line)
                continue
            if a != b:
                mapping[a] = b
    if mode == "names":
        first: dict[str, str] = {}
        for eid, e in merged.entities.items():
            if eid in mapping:
                continue
            key = normalise_name(e.name)
            if not key:
                continue
            canon = first.get(key)
            if canon is None:
                first[key] = eid
            elif merged.entity_source[canon] != merged.entity_source[eid]:
                mapping[eid] = canon  # same name, different source: the same thing
    # Resolve chains (a -> b -> c) and fold the merged entities into their canonical one.
    for a in list(mapping):
        seen, b = {a}, mapping[a]
        while b in mapping and b not in seen:
            seen.add(b)
            b = mapping[b]
        mapping[a] = b
    for a, b in mapping.items():
        ea, eb = merged.entities[a], merged.entities[b]
        eb.aliases = list(dict.fromkeys([*eb.aliases, *( [ea.name] if ea.name != eb.name else []),
                                         *ea.aliases]))
        eb.types = list(dict.fromkeys([*eb.types, *ea.types]))
        eb.description = eb.description or ea.description
        del merged.entities[a]
    return mapping


def split_random(triples: np.ndarray, valid: float, test: float, seed: int) -> np.ndarray:
    """Seeded split that keeps every entity and relation of valid/test in train.

    Shuffle; the first triple seen of every entity and relation is forced into train (so each one
    appears there at least once); valid and test are then filled from the remaining triples in
    shuffled order. Returns split codes (0 train, 1 valid, 2 test).
    """
    n = len(triples)
    order = np.random.default_rng(seed).permutation(n)
    codes = np.zeros(n, dtype=np.int8)
    seen_e, seen_r = set(), set()
    candidates = []
    for i in order:
        h, r, t = triples[i]
        new = h not in seen_e or t not in seen_e or r not in seen_r
        seen_e.update((h, t))
        seen_r.add(r)
        if not new:
            candidates.append(i)
    n_valid, n_test = int(round(valid * n)), int(round(test * n))
    if n_valid + n_test > len(candidates):
        raise SourceError(f"cannot hold out {n_valid} valid + {n_test} test triples of {n} while "
                          f"keeping every entity in train (only {len(candidates)} are redundant); "
                          "lower split.valid / split.test")
    codes[np.asarray(candidates[:n_valid], dtype=np.int64)] = 1
    codes[np.asarray(candidates[n_valid:n_valid + n_test], dtype=np.int64)] = 2
    return codes


@dataclass
class IngestReport:
    stats: dict[str, Any]
    quarantine: dict[str, Any]
    duplicates: dict[str, Any]


def build_graph(sources: list[KnowledgeSource], *, split_mode: str = "auto", valid: float = 0.1,
                test: float = 0.1, seed: int = 0, align_mode: str = "none",
                mapping_file: str | None = None, duplicates: str = "drop",
                on_error: str = "raise") -> tuple[KnowledgeGraph, IngestReport]:
    merged, quarantines = read_sources(sources)
    q = quarantines.setdefault("ingest", Quarantine("ingest", on_error))
    mapping = align(merged, align_mode, mapping_file, q)

    # Indices: sorted ids, so the same input always gives the same tables.
    ent_ids = sorted(merged.entities)
    rel_ids = sorted(merged.relations)
    e_idx = {e: i for i, e in enumerate(ent_ids)}
    r_idx = {r: i for i, r in enumerate(rel_ids)}

    has_splits = any(s is not None for *_, s, _ in merged.triples)
    mode = ("source" if has_splits else "random") if split_mode == "auto" else split_mode
    prio = {"train": 0, "valid": 1, "test": 2, None: 0}
    best: dict[tuple[int, int, int], tuple[int, str]] = {}
    dup_count, dup_examples, cross_split = 0, [], 0
    for h, r, t, split, where in merged.triples:
        key = (e_idx[mapping.get(h, h)], r_idx[r], e_idx[mapping.get(t, t)])
        code = prio[split] if mode == "source" else 0
        if key in best:
            dup_count += 1
            if duplicates == "raise":
                q.bad(where or h, "duplicate triple", f"{h} {r} {t}")
            if len(dup_examples) < 20:
                dup_examples.append({"where": where, "triple": [h, r, t], "first": best[key][1]})
            if code != best[key][0]:
                cross_split += 1  # train wins over valid/test: a held-out copy would leak
            if code < best[key][0]:
                best[key] = (code, best[key][1])
            continue
        best[key] = (code, where)
    arr = np.array(list(best), dtype=np.int64).reshape(-1, 3)
    codes = np.array([c for c, _ in best.values()], dtype=np.int8)
    wheres = [w for _, w in best.values()]

    if mode == "random":
        codes = split_random(arr, valid, test, seed) if len(arr) else codes
    else:  # the sources' own splits: valid/test must only use what train knows
        train = arr[codes == 0]
        known_e = set(train[:, 0]) | set(train[:, 2])
        known_r = set(train[:, 1])
        keep = np.ones(len(arr), dtype=bool)
        for i in np.flatnonzero(codes > 0):
            h, r, t = arr[i]
            unknown = [ent_ids[x] for x in (h, t) if x not in known_e] + \
                      ([rel_ids[r]] if r not in known_r else [])
            if unknown:
                q.bad(wheres[i] or ent_ids[h],
                      f"{SPLITS[codes[i]]} triple uses what train does not contain: {', '.join(unknown)}",
                      f"{ent_ids[h]} {rel_ids[r]} {ent_ids[t]}")
                keep[i] = False
        arr, codes = arr[keep], codes[keep]
    if not len(arr):
        raise no_triples_error(sources, merged, quarantines)

    graph = KnowledgeGraph(
        entities=pa.table({
            "idx": pa.array(range(len(ent_ids)), pa.int32()),
            "id": ent_ids,
            "name": [merged.entities[e].name for e in ent_ids],
            "aliases": [merged.entities[e].aliases for e in ent_ids],
            "description": [merged.entities[e].description for e in ent_ids],
            "types": [merged.entities[e].types for e in ent_ids],
            "source": [merged.entity_source[e] for e in ent_ids],  # the namespace
        }, schema=ENTITY_SCHEMA),
        relations=pa.table({
            "idx": pa.array(range(len(rel_ids)), pa.int32()),
            "id": rel_ids,
            "name": [merged.relations[r].name for r in rel_ids],
            "source": [merged.relation_source[r] for r in rel_ids],
        }, schema=RELATION_SCHEMA),
        triples=pa.table({
            "head": pa.array(arr[:, 0], pa.int32()), "relation": pa.array(arr[:, 1], pa.int32()),
            "tail": pa.array(arr[:, 2], pa.int32()),
            "split": [SPLITS[c] for c in codes],
        }, schema=TRIPLE_SCHEMA),
    )
    stats = graph_stats(graph)
    stats.update(split_mode=mode, aligned=len(mapping), implied_entities=merged.implied_entities,
                 implied_relations=merged.implied_relations)
    report = IngestReport(
        stats=stats,
        quarantine={k: v.summary() for k, v in quarantines.items() if v.count},
        duplicates={"count": dup_count, "across_splits": cross_split, "examples": dup_examples},
    )
    return graph, report


def graph_stats(graph: KnowledgeGraph) -> dict[str, Any]:
    """Counts, degree distribution and connected components (networkx, undirected view)."""
    import networkx as nx

    arr = graph.split_array()
    splits = graph.triples["split"].to_pylist()
    deg = np.bincount(np.concatenate([arr[:, 0], arr[:, 2]]), minlength=graph.num_entities) \
        if len(arr) else np.zeros(graph.num_entities, dtype=np.int64)
    g = nx.Graph()
    g.add_nodes_from(range(graph.num_entities))
    g.add_edges_from(zip(arr[:, 0].tolist(), arr[:, 2].tolist()))
    comps = sorted((len(c) for c in nx.connected_components(g)), reverse=True)
    hist = Counter(deg.tolist())
    rel_counts = Counter(arr[:, 1].tolist())
    rel_ids = graph.relation_ids()
    src_counts = Counter(graph.entities["source"].to_pylist())
    return {
        "entities": graph.num_entities, "relations": graph.num_relations, "triples": len(arr),
        "splits": {s: splits.count(s) for s in SPLITS},
        "entities_by_source": dict(src_counts),
        "isolated_entities": int((deg == 0).sum()),
        "degree": {"mean": float(deg.mean()) if len(deg) else 0.0,
                   "median": float(np.median(deg)) if len(deg) else 0.0,
                   "max": int(deg.max()) if len(deg) else 0,
                   "histogram": {str(k): v for k, v in sorted(hist.items())}},
        "components": {"count": len(comps), "largest": comps[0] if comps else 0,
                       "largest_share": comps[0] / graph.num_entities if comps else 0.0,
                       "sizes_top10": comps[:10]},
        "triples_per_relation": {rel_ids[r]: c for r, c in rel_counts.most_common()},
    }


def plot_stats(stats: dict[str, Any], path: Path) -> None:
    """Degree distribution (log-log) and triples per relation, the numbers being in stats.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    hist = {int(k): v for k, v in stats["degree"]["histogram"].items() if int(k) > 0}
    if hist:
        a.loglog(list(hist), list(hist.values()), "o", ms=3)
    a.set_xlabel("degree")
    a.set_ylabel("entities")
    a.set_title(f"degree distribution ({stats['entities']} entities)")
    rels = list(stats["triples_per_relation"].items())[:20]
    b.barh([r for r, _ in rels][::-1], [c for _, c in rels][::-1])
    b.set_xlabel("triples")
    b.set_title(f"triples per relation (top {len(rels)} of {stats['relations']})")
    b.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["build_graph", "graph_stats", "normalise_name", "plot_stats", "split_random"]
