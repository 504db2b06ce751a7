"""Type-specific report sections: one function per stage type, contributed by the package that owns
the type.

A section is a function that takes a :class:`~pipeline.report.page.StageView` and adds
:class:`~pipeline.report.page.Section` objects to it and the numbers behind its figures::

    from pipeline.report import Section, StageView, kv_table, report_section

    @report_section("my.stage")
    def _my_stage(sv: StageView) -> None:
        if sv.has("stats.json"):
            sv.add(Section("Statistics", [kv_table("counts", sv.read_json("stats.json"),
                                                   "stats.json")]))

Packages make their sections known through the ``stele.report`` entry-point group (an entry point
names a module that registers its sections when imported), the way stage types come through
``stele.stages``: the engine names no stage type of its own. A stage type without a section still
gets the generic view (metrics, every figure, the numbers from its JSON files), and a plugin that
fails to import costs only its sections.

:func:`feature_items` is a section for any artifact in the feature layout of
:mod:`pipeline.features`; the packages whose stage types write that layout register it for them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ..registry import Registry
from .page import Section, StageView, Table, kv_table

Renderer = Callable[[StageView], None]

SECTIONS: Registry[Renderer] = Registry(
    group="stele.report", kind="report section",
    qualname=lambda fn: f"{fn.__module__}.{fn.__qualname__}")


def report_section(stage_type: str) -> Callable[[Renderer], Renderer]:
    """Register the type-specific part of the report for ``stage_type`` (one function per type)."""

    def deco(fn: Renderer) -> Renderer:
        SECTIONS.register(stage_type, fn)
        return fn

    return deco


def feature_items(sv: StageView) -> None:
    """Feature artifacts (the :mod:`pipeline.features` layout): items and why any were rejected."""
    tables = []
    if sv.has("rejected.parquet"):
        t = sv.read_parquet("rejected.parquet", ["kind", "reason"])
        counts = Counter(zip(t["kind"].to_pylist(), t["reason"].to_pylist()))
        # Rows, not items: an item can be rejected for its media and for a text (two rows).
        tables.append(Table(f"rejected rows ({t.num_rows})", ["kind", "reason", "rows"],
                            [[k, r, n] for (k, r), n in counts.most_common()], "rejected.parquet"))
    if sv.has("items.parquet"):
        n = sv.read_parquet("items.parquet", ["id"]).num_rows
        tables.insert(0, kv_table("items", {"listed items": n}, "items.parquet"))
    if tables:
        sv.add(Section("Items", tables))
