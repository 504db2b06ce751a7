"""``stele sources [NAME]``: the registered knowledge-source types (what ``knowledge.ingest``'s
``sources:`` entries name in ``type:``), each with its one-line description and its parameters.

A ``stele`` subcommand the knowledge package contributes through the ``stele.commands`` entry-point
group (:mod:`pipeline.commands`), as ``stele datasets`` lists the media datasets. Imported whenever
``stele`` starts, so the sources themselves are imported only when the command runs.
"""

from __future__ import annotations

from typing import Any

from pipeline.commands import command


@command("sources", help="list registered knowledge sources (knowledge.ingest) and their parameters")
class Sources:
    """``stele sources [NAME]``: every knowledge-source type, or only NAME."""

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name", nargs="?", help="only this source type")

    def run(self, args: Any, console: Any) -> int:
        from rich.markup import escape
        from rich.table import Table

        from pipeline.errors import SpecError
        from pipeline.registry import model_parameters

        from .sources.base import SOURCES

        types = SOURCES.all()
        if args.name:
            if args.name not in types:  # one line, exit 2, like an unknown type in a pipeline
                raise SpecError(SOURCES.unknown_message(args.name), file="stele sources")
            types = {args.name: types[args.name]}
        for name, cls in types.items():
            console.print(f"[bold]{escape(name)}[/]  [dim]{cls.__module__}.{cls.__qualname__}[/]")
            # the class's own docstring: an undocumented one would show KnowledgeSource's
            doc = (cls.__doc__ or "").strip().split("\n\n")[0]
            console.print(f"  {' '.join(doc.split()) or '(no description)'}", highlight=False,
                          markup=False)
            t = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
            for col in ("  parameter", "type", "default", "description"):
                t.add_column(col, no_wrap=col == "  parameter")
            fields = cls.model_fields
            for row in model_parameters(cls, skip=("type",)):
                name = fields[row["name"]].alias or row["name"]  # what a pipeline writes
                default = "[bold]required[/]" if row["default"] == "required" \
                    else escape(repr(row["default"]))
                t.add_row(f"  {escape(name)}", escape(row["type"]), default,
                          escape(row["description"]))
            console.print(t)
        for plugin, error in SOURCES.plugin_errors.items():
            console.print(f"[red]plugin failed to load:[/] {escape(plugin)}: {escape(error)}")
        return 0
