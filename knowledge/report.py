"""The run report's sections for the knowledge stage types: graph statistics of ``knowledge.ingest``,
the validation curve of ``knowledge.embed``, link-prediction metrics of ``knowledge.evaluate`` and the
most linked entities of ``knowledge.link``, each with the numbers behind the stage's figures.

Registered through the ``stele.report`` entry-point group; the report imports this module only
when it builds a page, never a stage.
"""

from __future__ import annotations

from pipeline.report import (Section, StageView, Table, is_scalar, kv_table, records_table,
                             report_section)


@report_section("knowledge.ingest")
def _ingest(sv: StageView) -> None:
    if not sv.has("stats.json"):
        return
    s = sv.read_json("stats.json")
    counts = {"entities": s.get("entities"), "relations": s.get("relations"),
              "triples": s.get("triples"),
              **{f"{k} triples": v for k, v in (s.get("splits") or {}).items()},
              "isolated entities": s.get("isolated_entities"),
              **{f"degree {k}": v for k, v in (s.get("degree") or {}).items() if is_scalar(v)},
              **{f"components {k}": v for k, v in (s.get("components") or {}).items()
                 if is_scalar(v)}}
    tables = [kv_table("graph", counts, "stats.json")]
    if s.get("entities_by_source"):
        tables.append(Table("entities by source", ["source", "entities"],
                            [[k, v] for k, v in s["entities_by_source"].items()], "stats.json"))
    sv.add(Section("Knowledge graph statistics", tables))
    hist = (s.get("degree") or {}).get("histogram") or {}
    rels = s.get("triples_per_relation") or {}
    sv.explain("stats.png",
               Table("degree distribution", ["degree", "entities"],
                     [[int(k), v] for k, v in hist.items()], "stats.json"),
               Table("triples per relation", ["relation", "triples"],
                     [[k, v] for k, v in rels.items()], "stats.json"))


@report_section("knowledge.embed")
def _embed(sv: StageView) -> None:
    if sv.has("history.json"):
        hist = sv.read_json("history.json")
        table = records_table("per epoch", hist, "history.json")
        sv.explain("training.png", table)
        evals = [h for h in hist if "valid_mrr" in h]
        if evals:
            sv.add(Section("KGE training: validation MRR", [records_table(
                "evaluations", [{k: h.get(k) for k in ("step", "loss", "valid_mrr")} for h in evals],
                "history.json")]))


@report_section("knowledge.evaluate")
def _evaluate(sv: StageView) -> None:
    if not sv.has("metrics.json"):
        return
    m = sv.read_json("metrics.json")
    rows = []
    for setting in ("filtered", "raw"):
        for side, vals in (m.get(setting) or {}).items():
            rows.append([setting, side, *[vals.get(k) for k in ("mrr", "mr", "hits@1", "hits@3",
                                                                "hits@10", "count")]])
    tables = [Table(f"link prediction on {m.get('split', '?')} "
                    f"({m.get('num_triples', '?')} triples, {m.get('num_entities', '?')} entities)",
                    ["setting", "side", "MRR", "MR", "Hits@1", "Hits@3", "Hits@10", "rankings"],
                    rows, "metrics.json")]
    if sv.has("per_relation.csv"):
        per = sv.read_csv("per_relation.csv")
        per.sort(key=lambda r: -int(r.get("count") or 0))
        tables.append(Table("per relation (filtered, most frequent first)",
                            ["relation", "count", "MRR", "Hits@10"],
                            [[r["relation_id"], int(r["count"]), float(r["filtered_mrr"]),
                              float(r["filtered_hits@10"])] for r in per], "per_relation.csv"))
    if m.get("protocol"):
        tables.append(kv_table("protocol", m["protocol"], "metrics.json"))
    sv.add(Section("Link-prediction metrics", tables))
    curve = m.get("hits_at_k")
    if curve:
        sv.explain("hits_at_k.png", Table("filtered Hits@k", list(curve),
                                          [list(r) for r in zip(*curve.values())], "metrics.json"))


@report_section("knowledge.link")
def _link(sv: StageView) -> None:
    if sv.has("top_entities.csv"):
        rows = sv.read_csv("top_entities.csv")
        if rows:
            cols = list(rows[0])
            sv.add(Section("Most linked entities", [Table(
                "top entities", cols, [[r[c] for c in cols] for r in rows[:50]],
                "top_entities.csv")]))
