"""The run report's section for ``fusion.finetune``: the test scores, the per-label table, what was
left out and why, with the training loss behind ``finetune.png``.

Registered through the ``stele.report`` entry-point group.
"""

from __future__ import annotations

from pipeline.report import (Section, StageView, Table, is_scalar, kv_table, records_table,
                             report_section)


@report_section("fusion.finetune")
def _finetune(sv: StageView) -> None:
    if not sv.has("metrics.json"):
        return
    m = sv.read_json("metrics.json")
    title = f"Downstream: {m.get('task', '?')} with {m.get('encoder', '?')}"
    head = {"task": m.get("task"), "encoder": m.get("encoder"),
            **{f"test {k}": v for k, v in (m.get("test") or {}).items() if is_scalar(v)},
            **{k: m.get(k) for k in ("train_examples", "test_examples", "num_labels") if k in m}}
    per_label = m.get("per_label") or {}
    per = Table("per label (test)", ["label", "support", "predicted", "correct", "precision",
                                     "recall", "F1"],
                [[lab, v.get("support"), v.get("predicted"), v.get("correct"), v.get("precision"),
                  v.get("recall"), v.get("f1")] for lab, v in per_label.items()], "metrics.json")
    tables = [kv_table("test scores", head, "metrics.json"), per]
    if m.get("left_out"):
        tables.append(kv_table("examples left out", m["left_out"], "metrics.json"))
    if m.get("warnings"):
        tables.append(Table("warnings", ["warning"], [[w] for w in m["warnings"]], "metrics.json"))
    sv.add(Section(title, tables))
    hist = sv.read_json("history.json") if sv.has("history.json") else []
    sv.explain("finetune.png", records_table("training loss per step", hist, "history.json"), per)
