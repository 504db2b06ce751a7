"""``stele`` command line: run, plan, stages, datasets, show, ls, report, demo, and packages' commands.

Packages contribute commands (stele's own ``eval``) through the ``stele.commands`` entry points.
Every parser, theirs included, shows each option's default in its ``--help``.

Exit codes: 0 success; 1 a stage failed; 2 bad input (spec, override, unknown artifact), nothing ran;
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from .errors import SteleError, SpecError

if TYPE_CHECKING:
    from .store import ArtifactStore

DEMO = Path(__file__).resolve().parent.parent / "pipelines" / "demo.yaml"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an argument's help where X tells something: not for flags, nor
    for options that default to nothing (their help says what happens then), nor where the help
    already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in text
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subparsers (those of packages' commands included: ``add_subparsers``
    makes them of the parent's class) all show defaults."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stele")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                   help="override a stage parameter (value read as YAML); repeatable")
    p.add_argument("--store", help="artifact store folder or fsspec URI "
                   "(default: $STELE_STORE, the pipeline's store:, or ./stele-store)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="re-run STAGE (and its descendants) even if cached; repeatable")
    p.add_argument("--until", metavar="STAGE", help="run only STAGE and what it needs")
    p.add_argument("--verify", action="store_true", help="check every file of the cached artifacts; "
                   "a damaged one is made again (run) or shown (plan)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="stele", description=__doc__.split("\n")[0])
    ap.add_argument("--version", action="version", version=f"stele {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "run a pipeline"), ("plan", "show the DAG and what is cached; runs nothing")):
        p = sub.add_parser(name, help=help_)
        _common(p)
        if name == "run":
            _ray_args(p)
    p = sub.add_parser("demo", help="run pipelines/demo.yaml (the end-to-end demo)")
    p.add_argument("--store", help="artifact store (default ./stele-store)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE")
    _ray_args(p)
    p = sub.add_parser("stages", help="list registered stage types and their parameters")
    p.add_argument("name", nargs="?", help="only this stage type")
    p = sub.add_parser("datasets", help="list registered media datasets and their parameters")
    p.add_argument("name", nargs="?", help="only this dataset type")
    p = sub.add_parser("show", help="print an artifact's manifest")
    p.add_argument("artifact", help="a stage name (its artifact in the latest run that made or reused "
                   "it), an artifact key (or a prefix of 6+ characters) or an artifact folder")
    p.add_argument("--run", help="the stage's artifact in this run instead (run id, a unique prefix, "
                   "or 'latest')")
    p.add_argument("--store", help="artifact store (default: $STELE_STORE or ./stele-store)")
    p.add_argument("--verify", action="store_true", help="also check every file the manifest lists")
    p = sub.add_parser("ls", help="list the runs of a store, newest first; with RUN, its stages")
    p.add_argument("run", nargs="?", help="run id (or a unique prefix) or 'latest': list its stages "
                   "with status, wall time and artifact key")
    p.add_argument("--store", help="artifact store (default: $STELE_STORE or ./stele-store)")
    p = sub.add_parser("report", help="write one self-contained HTML page for a run")
    p.add_argument("run", nargs="?", default="latest",
                   help="run id (or a unique prefix), 'latest', or a pipeline YAML (its latest run)")
    p.add_argument("--store", help="artifact store (default: $STELE_STORE, the pipeline's store:, "
                   "or ./stele-store)")
    p.add_argument("--out", help="where to write the page (default <store>/reports/<run-id>.html)")
    from .commands import add_command_parsers, failed_plugins  # the ones packages contribute

    add_command_parsers(sub, reserved=set(sub.choices))
    ap.epilog = failed_plugins() or None
    return ap


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs for a local Ray (default max(4, cores))")
    p.add_argument("--no-live", action="store_true", help="print one line per change, no live table")
    p.add_argument("--mlflow", nargs="?", const=True, metavar="URI",
                   help="log training stages to MLflow (needs stele[tracking]): URI, or without one "
                   "$MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db; experiment = the pipeline's name")
    p.add_argument("--pool", action="append", default=[], metavar="NAME=N",
                   help="run at most N stages of pool NAME at a time (overrides the pipeline's "
                   "pools:); repeatable")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # emoji=False: rich would turn ":x:" in a path, a parameter or an error message into an emoji.
    console = Console(soft_wrap=True, emoji=False)
    err = Console(stderr=True, soft_wrap=True, emoji=False)
    try:
        return _dispatch(args, console)
    except SteleError as e:  # bad spec, override, artifact reference: one line each, nothing ran
        for line in str(e).splitlines() or [""]:
            err.print(f"error: {line}", style="bold red", highlight=False, markup=False,
                      soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted: finished stages are kept; run again to resume", style="yellow")
        return 130


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    from .spec import load_pipeline, with_pools
    from .store import ArtifactStore, default_store_uri

    if args.cmd == "stages":
        return _stages(args.name, console)
    if args.cmd == "datasets":
        return _datasets(args.name, console)
    if getattr(args, "stele_command", None) is not None:  # a command a package contributes
        return args.stele_command.run(args, console)
    if args.cmd == "report":
        from .report import report_command

        return report_command(args.run, args.store, args.out, console)
    if args.cmd == "ls":
        return _ls(ArtifactStore(args.store or default_store_uri()), args.run, console)
    if args.cmd == "show":
        from .runs import resolve_artifact

        store = ArtifactStore(args.store or default_store_uri())
        key, found = resolve_artifact(store, args.artifact, args.run)
        if found is not None:  # on stderr: stdout stays the manifest's JSON alone
            Console(stderr=True, emoji=False).print(
                f"{found.stage}: {found.status} in run {found.run_id}, artifact {key}",
                style="dim", highlight=False, markup=False, soft_wrap=True)
        console.print_json(json.dumps(store.manifest(key)))
        if args.verify:
            problems = store.verify(key)
            for p in problems:
                console.print(f"[red]damaged:[/] {p}")
            if not problems:
                console.print("[green]verified[/]")
            return 1 if problems else 0
        return 0

    if args.cmd == "demo":
        if not DEMO.exists():
            raise SpecError("demo pipeline not found (stele must be installed from a clone: "
                            "pip install -e .)", file=str(DEMO))
        args.pipeline, args.overrides, args.until, args.verify = str(DEMO), [], None, False
    pipeline = load_pipeline(args.pipeline, args.overrides)
    if getattr(args, "pool", None):
        pipeline = with_pools(pipeline, args.pool)
    store = ArtifactStore(args.store or default_store_uri(pipeline.store))
    from .runner import print_summary
    from .runs import plan_run, start_run

    if args.cmd == "plan":
        store.check_writable()  # a store that cannot be written is one line, as for run
        planned = plan_run(pipeline, store, args.force, args.until, args.verify)
        t = Table(title=f"{pipeline.name}  (store {store.uri})", box=None, header_style="bold")
        for col in ("stage", "type", "inputs", "key", "action", "why"):
            t.add_column(col)
        for n, p in planned.items():
            style = {"cached": "green", "run": "cyan", "excluded": "dim"}[p.action]
            t.add_row(n, p.type, ", ".join(pipeline.stages[n].inputs.values()), p.key[:12],
                      f"[{style}]{p.action}[/]", p.reason)
        console.print(t)
        return 0

    result = start_run(pipeline, store, force=args.force, until=args.until, verify=args.verify,
                       address=args.address, num_cpus=args.num_cpus, console=console,
                       live=False if args.no_live else None, mlflow=args.mlflow)
    print_summary(result, console)
    from .report import report_after_run  # never raises: a report problem is only a warning

    report_after_run(store, result.run_id, console)
    return 0 if result.ok else 1


def _ls(store: ArtifactStore, run: str | None, console: Console) -> int:
    """``stele ls``: the store's runs, newest first; ``stele ls RUN``: that run's stages."""
    from .report.page import fmt_seconds
    from .runs import list_runs, read_run, resolve_run, run_wall_s

    if run is None:
        ids = list(reversed(list_runs(store)))
        if not ids:
            console.print(f"no runs recorded in {store.uri}", highlight=False, markup=False)
            return 0
        rows = []
        for rid in ids:
            rec = read_run(store, rid)
            statuses = [o.get("status", "") for o in rec.get("stages", {}).values()]
            counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(
                ("ran", "cached", "failed", "skipped", "interrupted", "excluded", *statuses))
                if statuses.count(s))
            rows.append((rid, rec.get("pipeline", ""), rec.get("started_at", ""),
                         fmt_seconds(run_wall_s(rec)), counts))
        _print_columns(("run", "pipeline", "started", "wall", "stages"), rows, console)
        return 0
    rec = resolve_run(store, run)
    console.print(f"run {rec['run_id']}  {rec.get('pipeline', '')}  (store {store.uri}, "
                  f"{fmt_seconds(run_wall_s(rec))})", highlight=False, markup=False, soft_wrap=True)
    _print_columns(("stage", "type", "status", "wall", "key"),
                   [(n, o.get("type", ""), o.get("status", ""), fmt_seconds(o.get("wall_s")),
                     o.get("key", "")) for n, o in rec.get("stages", {}).items()], console)
    return 0


def _print_columns(header: tuple[str, ...], rows: list[tuple[str, ...]], console: Console) -> None:
    """Plain aligned columns, never wrapped or cut: keys stay whole to copy and to grep."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        console.print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(),
                      style="bold" if r is header else None, highlight=False, markup=False,
                      soft_wrap=True)


def _stages(name: str | None, console: Console) -> int:
    from .commands import parameter_table
    from .registry import REGISTRY

    types = REGISTRY.all()
    if name:
        if name not in types:
            raise SpecError(REGISTRY.unknown_message(name), file="stele stages")
        types = {name: types[name]}
    for st in types.values():
        console.print(f"[bold]{st.name}[/] v{st.version}  [dim]{st.qualname}  "
                      f"cpus={st.resources.cpus:g} gpus={st.resources.gpus:g}[/]")
        if st.description:
            console.print(f"  {st.description}", highlight=False)
        if st.params.model_fields:
            console.print(parameter_table(st.parameters()))
        if st.inputs is None:  # a type written before input roles were declared
            console.print("  [dim]input roles: not declared (not checked before a run)[/]")
        elif not st.inputs:
            console.print("  [dim]input roles: none (takes no inputs)[/]")
        else:
            from rich.markup import escape

            t = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
            # the role and "required" never wrap; the accepted types wrap at their " | "
            for col in ("  input role", "takes", "", "description"):
                t.add_column(col, no_wrap=col in ("  input role", ""))
            for r in st.input_roles():
                t.add_row(f"  {r['role']}", " | ".join(r["takes"]) or "any",
                          "[bold]required[/]" if r["required"] else "optional",
                          escape(r["description"]))
            console.print(t)
    for plugin, error in REGISTRY.plugin_errors.items():
        console.print(f"[red]plugin failed to load:[/] {plugin}: {error}")
    return 0


def _datasets(name: str | None, console: Console) -> int:
    from .commands import print_types
    from .datasets import DATASETS

    return print_types(DATASETS, name, console, command="stele datasets", label=lambda cls: cls.modality)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
