"""``stele sources [NAME]``: the registered knowledge-source types (what ``knowledge.ingest``'s
``sources:`` entries name in ``type:``), each with its one-line description and its parameters.

A ``stele`` subcommand the knowledge package contributes through the ``stele.commands`` entry-point
group (:mod:`pipeline.commands`), as ``stele datasets`` lists the media datasets. Imported whenever
``stele`` starts, so the sources themselves are imported only when the command runs.
"""

from __future__ import annotations

from typing import Any

from pipeline.commands import command, print_types


@command("sources", help="list registered knowledge sources (knowledge.ingest) and their parameters")
class Sources:
    """``stele sources [NAME]``: every knowledge-source type, or only NAME."""

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name", nargs="?", help="only this source type")

    def run(self, args: Any, console: Any) -> int:
        from .sources.base import SOURCES

        return print_types(SOURCES, args.name, console, command="stele sources")
