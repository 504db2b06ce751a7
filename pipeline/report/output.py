"""The run report as output: the HTML page (a jinja template), the plain-text summary, and the
``stele report`` command and the report ``stele run`` writes when it ends.

Self-contained: figures are embedded as ``data:`` URIs and the page carries a Content-Security-Policy
that forbids any other source, so it works offline and a stray external URL shows up as a console
error instead of a silent network request. A few lines of inline script check, once the page has
loaded, that every image decoded, that no script error happened and how wide the by-type tables
came out, and write the result into data attributes of a hidden element (``#page-check``), where a
headless browser can read it back and a reader never sees it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..store import ArtifactStore
from ..runs import read_run, resolve_run
from .assemble import RunReport, build_report, headline_keys
from .dag import STATUS_COLOURS
from .page import fmt, fmt_cell, fmt_seconds

log = logging.getLogger("stele.report")

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


def render_html(report: RunReport) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["seconds"] = fmt_seconds
    return env.get_template("report.html.j2").render(r=report, colours=STATUS_COLOURS)


def _headline_text(metrics: dict[str, Any], type_name: str = "") -> str:
    """The headline metrics as ``name=value`` pairs, rounded as the page shows them."""
    return ", ".join(f"{k}={fmt_cell(metrics[k], k)}" for k in headline_keys(metrics, type_name)
                     if metrics[k] is not None)


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
    from ..store import default_store_uri

    pipeline_file = name = None
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        from ..spec import load_pipeline

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

