"""``stele report RUN``: one self-contained HTML page for a pipeline run, plus a plain-text summary.

What the page shows, from the run record (``runs/<run-id>.json``) and each stage's artifact:

* the DAG as an inline SVG laid out by topological level, each stage coloured by its status;
* a table of every stage: type, status, wall time, key, and why a stage failed or was skipped;
  per stage type a table comparing the stages of that type on the metrics the type names as its
  headline (a seed sweep is one table);
* per stage: status, timing, inputs, the error and the log tail of a failed stage, the sections
  its stage type contributes, and *every* PNG the artifact holds, each with the numbers behind it
  (the JSON files the stage wrote) in a ``<details>`` table; all its metrics in another.

Numbers are rounded for reading (:func:`~.page.fmt`); the files a table names keep every digit.

The modules: :mod:`.page` (the page model and the table helpers sections use), :mod:`.sections` (the
registry of type-specific sections, filled through the ``stele.report`` entry-point group by the
packages that own the stage types), :mod:`.dag` (edges, order and layout of the DAG),
:mod:`.assemble` (run records, and the report read from the store) and :mod:`.output` (HTML, text
summary, the commands). Everything a section or a caller needs is importable from here.
"""

from __future__ import annotations

from ..runs import list_runs, read_run, resolve_run
from .assemble import LOG_TAIL_LINES, RunReport, build_report, headline_keys
from .dag import STATUS_COLOURS, Dag, DagNode, layout_dag
from .output import (TEMPLATE_DIR, default_out, render_html, report_after_run, report_command,
                     summary_text, write_report)
from .page import (MAX_FIGURE_BYTES, MAX_JSON_BYTES, MAX_ROWS, Figure, Section, StageView, Table,
                   data_uri, fmt, fmt_cell, fmt_seconds, is_number, is_scalar, is_seconds,
                   json_tables, kv_table, records_table, safe_image_uri, scalars)
from .sections import SECTIONS, Renderer, feature_items, report_section

__all__ = ["LOG_TAIL_LINES", "MAX_FIGURE_BYTES", "MAX_JSON_BYTES", "MAX_ROWS", "SECTIONS",
           "STATUS_COLOURS", "TEMPLATE_DIR", "Dag", "DagNode", "Figure", "Renderer", "RunReport",
           "Section", "StageView", "Table", "build_report", "data_uri", "default_out",
           "feature_items", "fmt", "fmt_cell", "fmt_seconds", "headline_keys", "is_number",
           "is_scalar", "is_seconds", "json_tables", "kv_table",
           "layout_dag", "list_runs", "read_run", "records_table", "render_html", "report_after_run",
           "report_command", "report_section", "resolve_run", "safe_image_uri", "scalars",
           "summary_text", "write_report"]
