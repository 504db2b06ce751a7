"""The page model of a run report: what a report section builds and the template shows.

A stage of a run is a :class:`StageView`: its record (status, timing, metrics, error), its artifact
(read file by file through the store's filesystem, never whole) and what the report adds to it:
:class:`Figure` objects for the artifact's PNG files, each with the :class:`Table` objects of the
numbers it plots, and :class:`Section` objects of type-specific tables. The helpers below turn
what stages write (scalars, lists of records, JSON documents of any shape) into tables, so that a
section is a few lines; they know nothing about any stage type.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..store import ArtifactStore

MAX_ROWS = 200          # rows of one numbers table; longer ones are subsampled evenly (and say so)
MAX_FIGURE_BYTES = 20 << 20
MAX_JSON_BYTES = 16 << 20


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

    def cells(self) -> list[list[tuple[str, bool]]]:
        """Each row as the page shows it: (text, numeric) per cell, rounded by :func:`fmt_cell`.
        A name/value table names each row's value by its first cell, any other table by the
        column, so that a duration reads as one whichever way a table is laid out."""
        by_row = self.columns == ["name", "value"]
        out = []
        for row in self.rows:
            row = list(row)
            out.append([(fmt_cell(v, str(row[0]) if by_row and i == 1 else
                                  self.columns[i] if i < len(self.columns) else ""), is_number(v))
                        for i, v in enumerate(row)])
        return out


@dataclass
class Figure:
    """One PNG of an artifact, embedded, with the tables of the numbers it plots."""

    file: str
    src: str
    numbers: list[Table] = field(default_factory=list)
    numbers_note: str = ""


@dataclass
class Section:
    """A type-specific block of a stage: tables, optionally example queries with their results
    (``direction``, ``query`` and ``results``: ``{id, text, thumbnail}`` each, results also ``score``
    and ``correct``; thumbnails only as :func:`safe_image_uri` lets them through)."""

    title: str
    tables: list[Table] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""


@dataclass
class StageView:
    """One stage of a run as the report shows it; report sections read the artifact through it."""

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

    # -- what report sections add ---------------------------------------------------------------
    def figure(self, file: str) -> Figure | None:
        return next((f for f in self.figures if f.file == file), None)

    @property
    def artifact(self) -> str:
        """Where the artifact lies (its files keep the full precision the page rounds away)."""
        if self._store is None or self.manifest is None:
            return ""
        return self._store.artifact_path(self.key)

    @property
    def metrics_table(self) -> Table:
        """Every scalar metric of the manifest (the by-type table shows the headline ones)."""
        return kv_table("all metrics", scalars(self.metrics), "manifest.json")

    def explain(self, file: str, *tables: Table, note: str = "") -> None:
        """Attach the numbers behind figure ``file`` (no-op when the artifact has no such figure)."""
        fig = self.figure(file)
        if fig is not None:
            fig.numbers.extend(tables)
            if note:
                fig.numbers_note = note

    def add(self, section: Section) -> None:
        self.sections.append(section)


# ---------------------------------------------------------------------------------- formatting
def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """A value for reading: integers as integers (grouped in thousands), other floats to 4
    significant digits without trailing zeros, None as a dash. The artifact's files keep every
    digit; a table's caption names the file."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)  # nan, inf, -inf
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e9 or a < 1e-3:  # a count of digits or zeros would not read at a glance
            return f"{v:.3e}".replace(".000e", "e")
        if a >= 1000 or v == round(v):
            return fmt(int(round(v)))
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        v = json.dumps(v, default=str)
    s = str(v)
    return s if len(s) <= 300 else s[:299] + "…"


def is_seconds(name: str) -> bool:
    """A metric named as a duration in seconds (``wall_s``, ``eval_s``), not a rate (``tokens_per_s``)."""
    n = name.lower()
    return n.endswith(("_s", " s", "(s)")) and not n.endswith(("per_s", "per s", "/s"))


def fmt_cell(v: Any, name: str = "") -> str:
    """:func:`fmt`, with durations (by their name, :func:`is_seconds`) in minutes and hours."""
    if is_number(v) and name and is_seconds(name) and math.isfinite(v) and v >= 0:
        return fmt_seconds(v)
    return fmt(v)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 10:
        # Significant digits, not decimals: a 3 ms step is not "0.00 s".
        return "0 s" if s == 0 else f"{s:.3g} s"
    if s < 60:
        return f"{s:.1f} s"
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
