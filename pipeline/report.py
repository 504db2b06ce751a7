"""``stele report RUN``: one self-contained HTML page for a pipeline run, plus a plain-text summary.

What the page shows, from the run record (``runs/<run-id>.json``) and each stage's artifact:

* the DAG as an inline SVG laid out by topological level, each stage coloured by its status;
* a table of every stage: type, status, wall time, key, headline (scalar) metrics, and per stage
  type a table comparing the stages of that type (a seed sweep of ``fusion.finetune`` is one table);
* per stage: status, timing, inputs, the error and the log tail of a failed stage, the headline
  metrics, type-specific sections (KG statistics, link-prediction metrics, pretraining losses per
  objective, downstream scores, retrieval recall and example queries with thumbnails), and *every*
  PNG the artifact holds, each with the numbers behind it (the JSON files the stage wrote) in a
  ``<details>`` table.

Self-contained: figures are embedded as ``data:`` URIs and the page carries a Content-Security-Policy
that forbids any other source, so it works offline and a stray external URL shows up as a console
error instead of a silent network request. A few lines of inline script check, once the page has
loaded, that every image decoded and that no script error happened, and write the result into the
page footer (``#page-check``); the headless-Chromium test reads that back.

Type-specific sections come from a small registry: ``@renderer("my.stage")`` on a function that takes
a :class:`StageView` and adds :class:`Section` objects and figure numbers. A stage type without one
still gets the generic view (metrics, every figure, numbers from its JSON files).

Artifacts are read through the store's filesystem (``fsspec``), file by file, so a report on a remote
store downloads the small JSON/PNG/CSV files it shows, never model weights.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import logging
import math
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreError
from .store import LOG, MANIFEST, ArtifactStore

log = logging.getLogger("stele.report")

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
MAX_ROWS = 200          # rows of one numbers table; longer ones are subsampled evenly (and say so)
MAX_FIGURE_BYTES = 20 << 20
MAX_JSON_BYTES = 16 << 20
LOG_TAIL_LINES = 40
STATUS_COLOURS = {  # fill colours of the DAG nodes and status badges
    "ran": "#2e9d5b", "cached": "#3a78c2", "failed": "#c8372d", "skipped": "#d49a1c",
    "interrupted": "#d46a1c", "excluded": "#9aa0a6", "pending": "#9aa0a6", "running": "#7b5cc4",
}


# ---------------------------------------------------------------------------------- data model
@dataclass
class Table:
    """A table of numbers as the page shows it; ``source`` names the file the numbers come from."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    source: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        total = len(self.rows)
        if total > MAX_ROWS:  # keep the first and last rows, evenly spaced ones in between
            step = (total - 1) / (MAX_ROWS - 1)
            keep = sorted({round(i * step) for i in range(MAX_ROWS)})
            self.rows = [self.rows[i] for i in keep]
            where = f"; all of them are in {self.source}" if self.source else ""
            self.note = (f"{len(self.rows)} of {total} rows shown, evenly spaced{where}. "
                         + self.note).strip()


@dataclass
class Figure:
    """One PNG of an artifact, embedded, with the tables of the numbers it plots."""

    file: str
    src: str
    numbers: list[Table] = field(default_factory=list)
    numbers_note: str = ""


@dataclass
class Section:
    """A type-specific block of a stage: tables, optionally retrieval examples."""

    title: str
    tables: list[Table] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""


@dataclass
class StageView:
    """One stage of a run as the report shows it; renderers read the artifact through it."""

    name: str
    type: str
    key: str
    status: str
    wall_s: float | None
    metrics: dict[str, Any]
    error_type: str = ""
    error: str = ""
    traceback: str = ""
    log_path: str = ""
    manifest: dict[str, Any] | None = None
    inputs: dict[str, str] = field(default_factory=dict)   # role -> upstream stage name
    figures: list[Figure] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log_tail: str = ""
    _store: ArtifactStore | None = None

    # -- reading the artifact -------------------------------------------------------------------
    @property
    def files(self) -> dict[str, int]:
        """Every file of the artifact (path -> bytes), from its manifest; empty without one."""
        return dict((self.manifest or {}).get("files", {}))

    def has(self, rel: str) -> bool:
        return rel in self.files

    def read_bytes(self, rel: str, limit: int = MAX_JSON_BYTES) -> bytes:
        if self._store is None or self.manifest is None:
            raise FileNotFoundError(rel)
        size = self.files.get(rel)
        if size is None:
            raise FileNotFoundError(f"{rel} is not in the artifact")
        if size > limit:
            raise ValueError(f"{rel} is {size} bytes, more than the report reads ({limit})")
        with self._store.fs.open(f"{self._store.artifact_path(self.key)}/{rel}", "rb") as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_csv(self, rel: str) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(self.read_bytes(rel).decode())))

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> Any:
        import pyarrow.parquet as pq

        with self._store.fs.open(f"{self._store.artifact_path(self.key)}/{rel}", "rb") as f:  # type: ignore[union-attr]
            return pq.read_table(f, columns=columns)

    # -- what renderers add ---------------------------------------------------------------------
    def figure(self, file: str) -> Figure | None:
        return next((f for f in self.figures if f.file == file), None)

    def explain(self, file: str, *tables: Table, note: str = "") -> None:
        """Attach the numbers behind figure ``file`` (no-op when the artifact has no such figure)."""
        fig = self.figure(file)
        if fig is not None:
            fig.numbers.extend(tables)
            if note:
                fig.numbers_note = note

    def add(self, section: Section) -> None:
        self.sections.append(section)


@dataclass
class DagNode:
    name: str
    type: str
    status: str
    x: float
    y: float
    colour: str


@dataclass
class Dag:
    nodes: list[DagNode]
    edges: list[dict[str, Any]]   # {"from", "to", "role", "d": SVG path}
    width: float
    height: float
    node_w: float
    node_h: float
    note: str = ""


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
        try:
            fmt = "%Y-%m-%dT%H:%M:%S%z"
            return (dt.datetime.strptime(self.finished_at, fmt)
                    - dt.datetime.strptime(self.started_at, fmt)).total_seconds()
        except (TypeError, ValueError):
            return None


# ---------------------------------------------------------------------------------- renderers
Renderer = Callable[[StageView], None]
RENDERERS: dict[str, Renderer] = {}


def renderer(stage_type: str) -> Callable[[Renderer], Renderer]:
    """Register the type-specific part of the report for ``stage_type`` (one function per type)."""

    def deco(fn: Renderer) -> Renderer:
        RENDERERS[stage_type] = fn
        return fn

    return deco


# ---------------------------------------------------------------------------------- formatting
def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def fmt(v: Any) -> str:
    """A table cell: floats to 6 significant digits (enough to read a curve back), None as a dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        v = json.dumps(v, default=str)
    s = str(v)
    return s if len(s) <= 300 else s[:299] + "…"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} m {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} m"


def scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if is_scalar(v)}


def kv_table(title: str, d: dict[str, Any], source: str = "") -> Table:
    return Table(title, ["name", "value"], [[k, v] for k, v in d.items()], source)


def records_table(title: str, rows: list[dict[str, Any]], source: str = "",
                  first: Iterable[str] = ("step",)) -> Table:
    """A table from a list of dicts; columns are the union of keys, ``first`` ones leading."""
    cols: list[str] = [c for c in first if any(c in r for r in rows)]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return Table(title, cols, [[r.get(c) for c in cols] for r in rows], source)


def json_tables(obj: Any, title: str, source: str, depth: int = 0, limit: int = 40) -> list[Table]:
    """Every number of a JSON document as tables, whatever its shape: scalars as name/value rows,
    a list of records or a dict of records as one table, a dict of equal-length lists as columns
    (a curve), anything deeper recursively. At most ``limit`` tables."""
    out: list[Table] = []
    if isinstance(obj, list):
        if obj and all(isinstance(r, dict) for r in obj):
            out.append(records_table(title, obj, source))
        elif all(is_scalar(v) for v in obj):
            out.append(Table(title, ["value"], [[v] for v in obj], source))
        else:
            out.append(Table(title, ["value"], [[v] for v in obj], source))
        return out
    if not isinstance(obj, dict):
        return [kv_table(title, {"value": obj}, source)]
    flat = scalars(obj)
    if flat:
        out.append(kv_table(title, flat, source))
    for k, v in obj.items():
        if is_scalar(v) or len(out) >= limit:
            continue
        sub = f"{title} › {k}"
        if isinstance(v, dict) and v and all(isinstance(x, dict) and all(is_scalar(y) for y in x.values())
                                             for x in v.values()):
            cols: list[str] = []
            for x in v.values():
                cols += [c for c in x if c not in cols]
            out.append(Table(sub, ["", *cols], [[name, *[x.get(c) for c in cols]]
                                                for name, x in v.items()], source))
        elif isinstance(v, dict) and v and all(isinstance(x, list) and all(is_scalar(y) for y in x)
                                               for x in v.values()) \
                and len({len(x) for x in v.values()}) == 1:
            cols = list(v)
            out.append(Table(sub, cols, [list(r) for r in zip(*v.values())], source))
        elif depth < 4:
            out.extend(json_tables(v, sub, source, depth + 1, limit - len(out)))
    return out[:limit]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def safe_image_uri(v: Any) -> str | None:
    """A thumbnail the page can show offline: an embedded raster image, nothing else (an http URL
    would break the page's no-network promise, so it is dropped, not fetched)."""
    if isinstance(v, str) and v.startswith(("data:image/png;base64,", "data:image/jpeg;base64,",
                                            "data:image/gif;base64,", "data:image/webp;base64,")):
        return v
    return None


# ---------------------------------------------------------------------------------- run records
def list_runs(store: ArtifactStore) -> list[str]:
    """Run ids in the store, oldest first (ids start with the start time, so they sort by it)."""
    base = store._join("runs")
    if not store.fs.exists(base):
        return []
    return sorted(posixpath.basename(p)[:-5] for p in store.fs.ls(base, detail=False)
                  if p.endswith(".json"))


def read_run(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    with store.fs.open(store._join("runs", f"{run_id}.json"), "r") as f:
        return json.load(f)


def resolve_run(store: ArtifactStore, ref: str, pipeline_file: Path | None = None,
                pipeline_name: str | None = None) -> dict[str, Any]:
    """The run record for ``ref``: ``latest``, a run id or a unique prefix of one; with
    ``pipeline_file`` (and its name), the latest run of that pipeline."""
    runs = list_runs(store)
    if not runs:
        raise StoreError(f"no runs recorded in {store.uri}")
    if pipeline_file is not None:
        want = str(pipeline_file.resolve())
        by_name = None
        for rid in reversed(runs):
            rec = read_run(store, rid)
            f = rec.get("pipeline_file")
            if f and str(Path(f).resolve()) == want:
                return rec
            if by_name is None and pipeline_name and rec.get("pipeline") == pipeline_name:
                by_name = rec
        if by_name is not None:  # run from another working directory: same pipeline name
            return by_name
        raise StoreError(f"no run of {pipeline_file} in {store.uri}")
    if ref == "latest":
        return read_run(store, runs[-1])
    hits = [r for r in runs if r.startswith(ref)]
    if ref in runs:
        hits = [ref]
    if not hits:
        raise StoreError(f"no run {ref!r} in {store.uri} (latest: {runs[-1]})")
    if len(hits) > 1:
        raise StoreError(f"run {ref!r} is ambiguous in {store.uri}: {', '.join(hits[:8])}")
    return read_run(store, hits[0])


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
    _resolve_inputs(stages, spec_inputs)
    stages = _topological(stages, list(spec_inputs))
    for sv in stages:
        _log_tail(sv, store)
        _figures(sv)
        fn = RENDERERS.get(sv.type)
        if fn is not None and sv.manifest is not None:
            try:
                fn(sv)
            except Exception as e:  # noqa: BLE001 - one odd artifact must not cost the whole page
                log.warning("report: %s section of stage %s failed: %s", sv.type, sv.name, e)
                sv.notes.append(f"the {sv.type} section could not be built: "
                                f"{type(e).__name__}: {e}")
        _fallback_numbers(sv)

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
        from .spec import load_pipeline

        return {n: dict(s.inputs) for n, s in load_pipeline(path).stages.items()}
    except Exception as e:  # noqa: BLE001 - the DAG is still drawn, from the manifests
        log.info("report: pipeline file %s unreadable (%s)", path, e)
        return {}


def _resolve_inputs(stages: list[StageView], spec_inputs: dict[str, dict[str, str]]) -> None:
    """Edges of the DAG. An artifact's manifest names its inputs by key, which is exact for what
    ran or was cached; stages without an artifact (failed, skipped, excluded) take theirs from the
    pipeline file, which may have been edited since the run."""
    by_key: dict[str, list[str]] = {}
    for sv in stages:
        by_key.setdefault(sv.key, []).append(sv.name)
    names = {sv.name for sv in stages}
    for sv in stages:
        if sv.manifest is not None:
            for role, key in sv.manifest.get("inputs", {}).items():
                ups = [u for u in by_key.get(key, []) if u != sv.name]
                for up in ups:  # two stages of identical type, parameters and inputs share a key
                    sv.inputs[role if len(ups) == 1 else f"{role} ({up})"] = up
        elif sv.name in spec_inputs:
            sv.inputs = {r: up for r, up in spec_inputs[sv.name].items() if up in names}
        else:
            sv.notes.append("its inputs are unknown: it left no artifact and the pipeline file "
                            "could not be read")


def _topological(stages: list[StageView], file_order: list[str]) -> list[StageView]:
    """Stages in dependency order, ties in the pipeline file's order (the run record's stages are
    stored sorted by name, which says nothing about the pipeline), else by name."""
    import networkx as nx

    rank = {n: i for i, n in enumerate(file_order)}
    by_name = {sv.name: sv for sv in stages}
    g = nx.DiGraph()
    g.add_nodes_from(by_name)
    g.add_edges_from((up, sv.name) for sv in stages for up in sv.inputs.values() if up in by_name)
    try:
        order = list(nx.lexicographical_topological_sort(
            g, key=lambda n: (rank.get(n, len(rank)), n)))
    except nx.NetworkXUnfeasible:
        order = sorted(by_name, key=lambda n: (rank.get(n, len(rank)), n))
    return [by_name[n] for n in order]


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
    for f in unexplained:
        f.numbers = list(tables)
        if not tables:
            f.numbers_note = "the artifact holds no JSON file with the numbers of this figure"


def _by_type(stages: list[StageView]) -> list[Table]:
    """Per stage type, its stages side by side on their scalar metrics (seed sweeps, model
    comparisons, downstream results)."""
    out: list[Table] = []
    types: dict[str, list[StageView]] = {}
    for sv in stages:
        if sv.metrics and sv.status in ("ran", "cached"):
            types.setdefault(sv.type, []).append(sv)
    for t, svs in types.items():
        cols: list[str] = []
        for sv in svs:
            cols += [k for k, v in sv.metrics.items() if is_scalar(v) and k not in cols]
        out.append(Table(t, ["stage", *cols],
                         [[sv.name, *[sv.metrics.get(c) for c in cols]] for sv in svs],
                         "each stage's manifest.json"))
    return out


# ---------------------------------------------------------------------------------- the DAG
def layout_dag(stages: list[StageView], node_w: float = 190, node_h: float = 44,
               gap_x: float = 60, gap_y: float = 18, pad: float = 10) -> Dag:
    """Left-to-right layout by topological level (longest path from a source), nodes of a level
    ordered by the mean position of their inputs so that edges cross less; edges are cubic curves."""
    import networkx as nx

    g = nx.DiGraph()
    order = {sv.name: i for i, sv in enumerate(stages)}
    g.add_nodes_from(order)
    for sv in stages:
        for up in sv.inputs.values():
            if up in order:
                g.add_edge(up, sv.name)
    note = ""
    try:
        levels = [sorted(gen, key=order.__getitem__) for gen in nx.topological_generations(g)]
    except nx.NetworkXUnfeasible:  # cannot happen for a validated pipeline; draw one column
        levels, note = [list(order)], "the recorded inputs form a cycle; edges drawn as recorded"
    pos: dict[str, tuple[float, float]] = {}
    for li, level in enumerate(levels):
        if li:
            def bary(n: str) -> float:
                ps = [pos[p][1] for p in g.predecessors(n) if p in pos]
                return sum(ps) / len(ps) if ps else float(order[n])
            level.sort(key=lambda n: (bary(n), order[n]))
        for i, n in enumerate(level):
            pos[n] = (pad + li * (node_w + gap_x), pad + i * (node_h + gap_y))
    by_name = {sv.name: sv for sv in stages}
    nodes = [DagNode(n, by_name[n].type, by_name[n].status, x, y,
                     STATUS_COLOURS.get(by_name[n].status, "#9aa0a6")) for n, (x, y) in pos.items()]
    edges = []
    for sv in stages:
        for role, up in sv.inputs.items():
            if up not in pos:
                continue
            x1, y1 = pos[up][0] + node_w, pos[up][1] + node_h / 2
            x2, y2 = pos[sv.name][0] - 6, pos[sv.name][1] + node_h / 2  # room for the arrowhead
            mid = (x1 + x2) / 2
            edges.append({"from": up, "to": sv.name, "role": role,
                          "d": f"M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} "
                               f"{x2:.1f},{y2:.1f}"})
    width = pad * 2 + max(1, len(levels)) * (node_w + gap_x) - gap_x
    height = pad * 2 + max((len(lv) for lv in levels), default=1) * (node_h + gap_y) - gap_y
    return Dag(nodes, edges, width, height, node_w, node_h, note)


# ---------------------------------------------------------------------------------- type sections
@renderer("knowledge.ingest")
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


@renderer("knowledge.embed")
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


@renderer("knowledge.evaluate")
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


@renderer("knowledge.link")
def _link(sv: StageView) -> None:
    if sv.has("top_entities.csv"):
        rows = sv.read_csv("top_entities.csv")
        if rows:
            cols = list(rows[0])
            sv.add(Section("Most linked entities", [Table(
                "top entities", cols, [[r[c] for c in cols] for r in rows[:50]],
                "top_entities.csv")]))


def _features(sv: StageView) -> None:
    """Feature artifacts (pipeline/features.py layout): items and why any were rejected."""
    tables = []
    if sv.has("rejected.parquet"):
        t = sv.read_parquet("rejected.parquet", ["kind", "reason"])
        counts = Counter(zip(t["kind"].to_pylist(), t["reason"].to_pylist()))
        tables.append(Table(f"rejected items ({t.num_rows})", ["kind", "reason", "items"],
                            [[k, r, n] for (k, r), n in counts.most_common()], "rejected.parquet"))
    if sv.has("items.parquet"):
        n = sv.read_parquet("items.parquet", ["id"]).num_rows
        tables.insert(0, kv_table("items", {"listed items": n}, "items.parquet"))
    if tables:
        sv.add(Section("Items", tables))


renderer("vision.features")(_features)
renderer("speech.features")(_features)


@renderer("fusion.pretrain")
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


@renderer("fusion.finetune")
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


RANK_BINS = ((1, 1), (2, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, None))


@renderer("fusion.retrieval")
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
    setting = {k: m.get(k) for k in ("mode", "k", "first_stage", "split", "rsum", "first_stage_rsum")
               if k in m}
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


# ---------------------------------------------------------------------------------- output
def render_html(report: RunReport) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["seconds"] = fmt_seconds
    env.filters["scalars"] = scalars
    return env.get_template("report.html.j2").render(
        r=report, colours=STATUS_COLOURS, headline=_headline_text)


def _headline_text(metrics: dict[str, Any], type_name: str = "") -> str:
    from .runner import _headline  # the run summary's own choice of headline metrics

    return _headline(metrics, type_name)


def summary_text(report: RunReport) -> str:
    """The console summary: the run, then one line per stage (status, wall time, headline)."""
    lines = [f"{report.pipeline}: run {report.run_id} ({report.counts}), "
             f"{fmt_seconds(report.wall_s)} wall, store {report.store}"]
    w_name = max([len("stage"), *(len(s.name) for s in report.stages)])
    w_type = max([len("type"), *(len(s.type) for s in report.stages)])
    lines.append(f"  {'stage':<{w_name}}  {'type':<{w_type}}  {'status':<11}  {'wall':>9}  metrics")
    for s in report.stages:
        extra = _headline_text(s.metrics, s.type) if s.metrics else (
            f"{s.error_type}: {s.error}" if s.status == "failed" else s.error)
        lines.append(f"  {s.name:<{w_name}}  {s.type:<{w_type}}  {s.status:<11}  "
                     f"{fmt_seconds(s.wall_s):>9}  {extra}".rstrip())
    return "\n".join(lines)


def default_out(store: ArtifactStore, run_id: str) -> str:
    return store._join("reports", f"{run_id}.html")


def write_report(store: ArtifactStore, record: dict[str, Any], out: str | Path | None = None
                 ) -> tuple[str, RunReport]:
    """Build and write the page; returns where it went (``<store>/reports/<run-id>.html`` by
    default, through the store's filesystem so remote stores work) and the report itself."""
    report = build_report(store, record)
    page = render_html(report)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
        return str(path.resolve()), report
    dest = default_out(store, report.run_id)
    if store.local:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(page, encoding="utf-8")
    else:
        with store.fs.open(dest, "w") as f:
            f.write(page)
    return dest, report


def report_command(ref: str, store_uri: str | None, out: str | None, console: Any) -> int:
    """``stele report RUN``: RUN is ``latest``, a run id (or a unique prefix) or a pipeline YAML."""
    from .store import default_store_uri

    pipeline_file = name = None
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        from .spec import load_pipeline

        pipe = load_pipeline(p)  # for its store: and name; a broken file is a SpecError (exit 2)
        pipeline_file, name = p, pipe.name
        store = ArtifactStore(store_uri or default_store_uri(pipe.store))
    else:
        store = ArtifactStore(store_uri or default_store_uri())
    record = resolve_run(store, ref, pipeline_file, name)
    dest, report = write_report(store, record, out)
    console.print(summary_text(report), markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {dest}", markup=False, highlight=False, soft_wrap=True)
    return 0


def report_after_run(store: ArtifactStore, run_id: str, console: Any) -> str | None:
    """The report ``stele run`` writes when it ends. Never raises: a report is not worth failing a
    run for, so a problem is a warning."""
    try:
        dest, _ = write_report(store, read_run(store, run_id))
    except Exception as e:  # noqa: BLE001
        log.warning("report for run %s not written: %s", run_id, e)
        console.print(f"warning: report not written: {type(e).__name__}: {e}", style="yellow",
                      markup=False, highlight=False)
        return None
    console.print(f"report: {dest}", markup=False, highlight=False)
    return dest


__all__ = ["RENDERERS", "Figure", "RunReport", "Section", "StageView", "Table", "build_report",
           "json_tables", "layout_dag", "list_runs", "render_html", "renderer", "report_after_run",
           "report_command", "resolve_run", "summary_text", "write_report"]
