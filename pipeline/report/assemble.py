"""Assembling a run report: the run records of a store and everything the page shows, read from the
store (no HTML here).

:func:`build_report` reads each stage's manifest and log, embeds every PNG of its artifact, lets the
stage type's registered section (:mod:`.sections`) add its tables, gives every figure no section
explained the numbers of the artifact's JSON files, and shows each table once (a section's table
that explains a figure goes behind the figure). Per stage type, a table compares its stages on the
headline metrics the type names. Artifacts are read through the store's
filesystem, file by file, so a report on a remote store downloads the small JSON/PNG/CSV files it
shows, never model weights.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import StoreError
from ..registry import headline_keys
from ..runs import run_wall_s
from ..store import LOG, MANIFEST, ArtifactStore
from .dag import Dag, layout_dag, resolve_inputs, topological
from .page import MAX_FIGURE_BYTES, Figure, StageView, Table, data_uri, json_tables
from .sections import SECTIONS

log = logging.getLogger("stele.report")

LOG_TAIL_LINES = 40
MAX_TYPE_COLUMNS = 10   # metric columns of a by-type table at most (patterns can match many)


@dataclass
class RunReport:
    run_id: str
    pipeline: str
    pipeline_file: str | None
    store: str
    started_at: str
    finished_at: str
    stages: list[StageView]
    dag: Dag
    by_type: list[Table]
    generated_at: str = ""
    version: str = ""

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.stages)

    @property
    def counts(self) -> str:
        order = ("ran", "cached", "failed", "skipped", "interrupted", "excluded")
        return ", ".join(f"{self.count(s)} {s}" for s in order if self.count(s)) or "no stages"

    @property
    def wall_s(self) -> float | None:
        return run_wall_s({"started_at": self.started_at, "finished_at": self.finished_at})


# ---------------------------------------------------------------------------------- building
def build_report(store: ArtifactStore, record: dict[str, Any]) -> RunReport:
    """Everything the page shows, read from the store; no HTML yet."""
    stages: list[StageView] = []
    for name, o in record.get("stages", {}).items():
        sv = StageView(name=name, type=o.get("type", ""), key=o.get("key", ""),
                       status=o.get("status", ""), wall_s=o.get("wall_s"),
                       metrics=o.get("metrics") or {}, error_type=o.get("error_type", ""),
                       error=o.get("error", ""), traceback=o.get("traceback", ""),
                       log_path=o.get("log", ""), _store=store)
        if sv.status in ("ran", "cached") and sv.key:
            try:
                sv.manifest = store.manifest(sv.key)
            except StoreError:
                sv.notes.append("its artifact is no longer in the store (deleted after the run?)")
        if sv.manifest is not None:
            sv.metrics = sv.manifest.get("metrics", sv.metrics) or {}
        stages.append(sv)

    spec_inputs = _pipeline_file_inputs(record.get("pipeline_file"))
    resolve_inputs(stages, spec_inputs)
    stages = topological(stages, list(spec_inputs))
    SECTIONS.load_plugins()
    for plugin, error in SECTIONS.plugin_errors.items():
        log.warning("report: section plugin %s failed to load: %s", plugin, error)
    for sv in stages:
        _log_tail(sv, store)
        _figures(sv)
        fn = SECTIONS.types.get(sv.type)
        if fn is not None and sv.manifest is not None:
            try:
                fn(sv)
            except Exception as e:  # noqa: BLE001 - one odd artifact must not cost the whole page
                log.warning("report: %s section of stage %s failed: %s", sv.type, sv.name, e)
                sv.notes.append(f"the {sv.type} section could not be built: "
                                f"{type(e).__name__}: {e}")
        _fallback_numbers(sv)
        _once(sv)

    try:
        import importlib.metadata

        version = importlib.metadata.version("stele")
    except Exception:  # noqa: BLE001
        version = "unknown"
    return RunReport(
        run_id=record.get("run_id", "?"), pipeline=record.get("pipeline", "?"),
        pipeline_file=record.get("pipeline_file"), store=store.uri,
        started_at=record.get("started_at", ""), finished_at=record.get("finished_at", ""),
        stages=stages, dag=layout_dag(stages), by_type=_by_type(stages),
        generated_at=dt.datetime.now().astimezone().strftime("%Y-%m-%dT%H:%M:%S%z"),
        version=version)


def _pipeline_file_inputs(path: str | None) -> dict[str, dict[str, str]]:
    """Stage -> {role: upstream} from the pipeline file, in the file's order; empty when the file is
    gone or no longer valid (the report then relies on the manifests alone)."""
    if not path:
        return {}
    try:
        from ..spec import load_pipeline

        return {n: dict(s.inputs) for n, s in load_pipeline(path).stages.items()}
    except Exception as e:  # noqa: BLE001 - the DAG is still drawn, from the manifests
        log.info("report: pipeline file %s unreadable (%s)", path, e)
        return {}


def _log_tail(sv: StageView, store: ArtifactStore) -> None:
    path = None
    if sv.manifest is not None and sv.has(LOG):
        path = f"{store.artifact_path(sv.key)}/{LOG}"
    elif sv.log_path:
        path = sv.log_path
    if not path:
        return
    try:
        with store.fs.open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
        sv.log_tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
    except Exception as e:  # noqa: BLE001 - e.g. a failed attempt's folder was cleaned up
        sv.notes.append(f"log {path} unreadable: {e}")


def _figures(sv: StageView) -> None:
    for rel in sorted(sv.files):
        if not rel.lower().endswith(".png"):
            continue
        try:
            png = sv.read_bytes(rel, MAX_FIGURE_BYTES)
        except Exception as e:  # noqa: BLE001
            sv.notes.append(f"figure {rel} not embedded: {e}")
            continue
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            sv.notes.append(f"figure {rel} is not a PNG file; not embedded")
            continue
        sv.figures.append(Figure(rel, data_uri(png)))


def _fallback_numbers(sv: StageView) -> None:
    """Figures no renderer explained get every JSON file of the artifact (small enough to read) as
    tables: the numbers behind a plot are in the files the stage wrote beside it."""
    unexplained = [f for f in sv.figures if not f.numbers]
    if not unexplained:
        return
    tables: list[Table] = []
    for rel in sorted(sv.files):
        if rel.endswith(".json") and rel != MANIFEST:
            try:
                tables += json_tables(sv.read_json(rel), rel, rel)
            except Exception as e:  # noqa: BLE001
                sv.notes.append(f"{rel} unreadable: {e}")
    if not tables and sv.metrics:
        tables = json_tables(sv.metrics, "metrics (manifest)", "manifest.json")
    if not tables:
        for f in unexplained:
            f.numbers_note = "the artifact holds no JSON file with the numbers of this figure"
        return
    # The same files behind every such figure would show each table once per figure: the first
    # figure gets them, the others point there.
    first, *rest = unexplained
    first.numbers = list(tables)
    for f in rest:
        f.numbers_note = f"the artifact's JSON files, shown behind {first.file}"


def _once(sv: StageView) -> None:
    """A table a section both shows and attaches to a figure is shown behind the figure only,
    where it explains what is plotted; a section left with nothing to show goes."""
    behind = {id(t) for f in sv.figures for t in f.numbers}
    for sec in sv.sections:
        sec.tables = [t for t in sec.tables if id(t) not in behind]
    sv.sections = [sec for sec in sv.sections if sec.tables or sec.examples or sec.text]


def _by_type(stages: list[StageView]) -> list[Table]:
    """Per stage type, its stages side by side on their headline metrics (seed sweeps, model
    comparisons, downstream results). Only the headline: a type's every metric side by side is
    dozens of mostly empty columns; each stage's section keeps them all."""
    out: list[Table] = []
    types: dict[str, list[StageView]] = {}
    for sv in stages:
        if sv.metrics and sv.status in ("ran", "cached"):
            types.setdefault(sv.type, []).append(sv)
    for t, svs in types.items():
        cols: list[str] = []
        for sv in svs:
            cols += [k for k in headline_keys(sv.metrics, t) if k not in cols]
        # A column no stage of the type has a value for says nothing.
        cols = [c for c in cols if any(sv.metrics.get(c) is not None for sv in svs)]
        note = ""
        if len(cols) > MAX_TYPE_COLUMNS:
            note = (f"{len(cols) - MAX_TYPE_COLUMNS} more headline metrics in each stage's "
                    "section (all metrics)")
            cols = cols[:MAX_TYPE_COLUMNS]
        out.append(Table(t, ["stage", *cols],
                         [[sv.name, *[sv.metrics.get(c) for c in cols]] for sv in svs],
                         "each stage's manifest.json", note))
    return out
