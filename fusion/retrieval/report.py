"""The run report's section for ``fusion.retrieval``: recall in both directions, the recall@K curve,
example queries with their top results and thumbnails, and the ranks behind ``rank_hist.png``.

Registered through the ``stele.report`` entry-point group.
"""

from __future__ import annotations

from pipeline.report import (Section, StageView, Table, is_scalar, kv_table, report_section,
                             safe_image_uri, scalars)


RANK_BINS = ((1, 1), (2, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, None))


@report_section("fusion.retrieval")
def _retrieval(sv: StageView) -> None:
    """Both directions' recall, the recall@K curve, and example queries with their top results
    (``examples.json``: direction, query {id, text|thumbnail}, results [{id, score, correct,
    text|thumbnail}], thumbnails as data URIs or null)."""
    m = sv.read_json("metrics.json") if sv.has("metrics.json") else {}
    tables = []
    dirs = {k: v for k, v in m.items() if isinstance(v, dict) and any(c.startswith("R@") for c in v)}
    if dirs:
        cols: list[str] = []
        for v in dirs.values():
            cols += [c for c, x in v.items() if is_scalar(x) and c not in cols]
        tables.append(Table("recall by direction (%)", ["direction", *cols],
                            [[d, *[v.get(c) for c in cols]] for d, v in dirs.items()],
                            "metrics.json"))
    setting = {k: m.get(k) for k in ("model", "mode", "k", "first_stage", "split", "relevance", "rsum",
                                     "first_stage_rsum") if k in m}
    if isinstance(m.get("counts"), dict):
        setting.update(scalars(m["counts"]))
    if setting:
        tables.append(kv_table("setting", setting, "metrics.json"))
    curve = m.get("recall_curve")
    curve_table = None
    if isinstance(curve, dict) and curve:
        curve_table = Table("recall@K (%)", list(curve), [list(r) for r in zip(*curve.values())],
                            "metrics.json")
        tables.append(curve_table)
    examples = []
    if sv.has("examples.json"):
        for ex in sv.read_json("examples.json"):
            q = ex.get("query") or {}
            res = [{"id": r.get("id"), "text": r.get("text"), "score": r.get("score"),
                    "correct": bool(r.get("correct")), "thumbnail": safe_image_uri(r.get("thumbnail"))}
                   for r in ex.get("results", [])]
            examples.append({"direction": ex.get("direction", ""), "results": res, "query": {
                "id": q.get("id"), "text": q.get("text"),
                "thumbnail": safe_image_uri(q.get("thumbnail"))}})
    sv.add(Section("Retrieval", tables, examples))
    if curve_table is not None:
        sv.explain("recall_at_k.png", curve_table)
    if sv.has("ranks.parquet"):
        t = sv.read_parquet("ranks.parquet", ["direction", "rank"])
        by_dir: dict[str, list[float | None]] = {}
        for d, r in zip(t["direction"].to_pylist(), t["rank"].to_pylist()):
            by_dir.setdefault(d, []).append(r)
        rows = []
        for lo, hi in RANK_BINS:
            label = str(lo) if lo == hi else (f"{lo}–{hi}" if hi else f"> {lo - 1}")
            rows.append([label, *[sum(1 for r in rs if r is not None and r >= lo - 0.5
                                      and (hi is None or r < hi + 0.5)) for rs in by_dir.values()]])
        rows.append(["no correct item", *[sum(r is None for r in rs) for rs in by_dir.values()]])
        sv.explain("rank_hist.png", Table("queries by rank of the first correct item",
                                          ["rank", *by_dir], rows, "ranks.parquet"))
