"""The run report's section for ``fusion.pretrain``: the recipe, and the loss of every objective
(steps, first, minimum, mean of the last ten) with the per-step history behind ``losses.png``.

Registered through the ``stele.report`` entry-point group.
"""

from __future__ import annotations

import json

from pipeline.report import (Section, StageView, Table, is_scalar, kv_table, records_table,
                             report_section)


@report_section("fusion.pretrain")
def _pretrain(sv: StageView) -> None:
    tables = []
    if sv.has("recipe.json"):
        tables.append(kv_table("recipe", {k: v if is_scalar(v) else json.dumps(v)
                                          for k, v in sv.read_json("recipe.json").items()},
                               "recipe.json"))
    if sv.has("history.json"):
        hist = sv.read_json("history.json")
        objectives = []
        for h in hist:
            objectives += [k for k in h if k.startswith("loss_") and k not in objectives]
        rows = []
        for k in objectives:
            vals = [h[k] for h in hist if k in h and h[k] is not None]
            if vals:
                last = vals[-10:]
                rows.append([k[5:], len(vals), vals[0], min(vals), sum(last) / len(last)])
        tables.insert(0, Table("loss per objective", ["objective", "steps", "first", "min",
                                                      "mean of last 10"], rows, "history.json"))
        sv.explain("losses.png", records_table("per step", hist, "history.json"))
    if tables:
        sv.add(Section("Pretraining", tables))
