"""Subcommands of ``stele`` contributed by packages: ``stele NAME ...`` for work that belongs to a
package's own stage types (running its protocol on existing artifacts, say) and not to the engine.

A command is one decorated class with two methods::

    from pipeline.commands import command

    @command("hello", help="say hello")
    class Hello:
        def add_arguments(self, parser: argparse.ArgumentParser) -> None:
            parser.add_argument("--name", default="world")

        def run(self, args: argparse.Namespace, console: rich.console.Console) -> int:
            console.print(f"hello {args.name}")
            return 0   # the exit code

``add_arguments`` fills the command's own parser (sub-subcommands included); ``run`` gets the parsed
arguments and the console to print on, and returns the exit code. ``--help`` shows every option's
default after its help text (stele's parsers, sub-subcommands' too, add it), so give each option a
``help``. Packages make their commands known
through the ``stele.commands`` entry-point group, the way stage types come through ``stele.stages``:
an entry point names a module that registers its commands when imported. A plugin that fails to
import costs only its commands: ``stele`` still starts and ``stele --help`` names the failure. The
built-in commands (``run``, ``plan``, ...) keep their names; a plugin command of the same name is
not added.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .registry import Registry


class Command(Protocol):
    """What ``@command`` registers: an instance of the decorated class."""

    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, console: Any) -> int: ...


COMMANDS: Registry[Command] = Registry(
    group="stele.commands", kind="command",
    qualname=lambda cmd: f"{type(cmd).__module__}.{type(cmd).__qualname__}")

C = TypeVar("C", bound=type)


def command(name: str, *, help: str = "") -> Callable[[C], C]:  # noqa: A002 - argparse's word
    """Register the decorated class (instantiated without arguments) as ``stele NAME``."""
    if not name or name.startswith("-") or any(c.isspace() for c in name):
        raise ValueError(f"command name {name!r}: one word, not starting with '-'")

    def deco(cls: C) -> C:
        cls.name, cls.help = name, help
        COMMANDS.register(name, cls())
        return cls

    return deco


def add_command_parsers(sub: Any, reserved: set[str]) -> None:
    """A subparser for every registered command whose name is not ``reserved`` (the built-ins).
    The parsed arguments carry the command as ``stele_command``, for the dispatch to call."""
    for name, cmd in COMMANDS.all().items():
        if name in reserved:
            continue
        p = sub.add_parser(name, help=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(stele_command=cmd)


def failed_plugins() -> str:
    """The command plugins that failed to import, for the end of ``stele --help``; empty if none."""
    COMMANDS.load_plugins()
    if not COMMANDS.plugin_errors:
        return ""
    return "command plugins that failed to load: " + "; ".join(
        f"{k} ({v})" for k, v in COMMANDS.plugin_errors.items())


def parameter_table(rows: list[dict[str, Any]]) -> Any:
    """The parameters table of ``stele stages`` and the type listings (rows of
    :func:`pipeline.registry.model_parameters`); user text is escaped, never read as markup."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
    for col in ("  parameter", "type", "default", "description"):
        t.add_column(col, no_wrap=col == "  parameter")
    for row in rows:
        default = "[bold]required[/]" if row["default"] == "required" else escape(repr(row["default"]))
        t.add_row(f"  {escape(row['name'])}", escape(row["type"]), default, escape(row["description"]))
    return t


def print_types(registry: Registry, name: str | None, console: Any, *, command: str,
                label: Callable[[Any], str] = lambda cls: "") -> int:
    """``stele datasets`` / ``stele sources``: every type of a registry of pydantic classes (or only
    ``name``: unknown is a one-line error with did-you-mean), each with the first paragraph of its
    own docstring and its parameters (``type`` left out: it is the name)."""
    from rich.markup import escape

    from .errors import SpecError
    from .registry import model_parameters

    types = registry.all()
    if name:
        if name not in types:
            raise SpecError(registry.unknown_message(name), file=command)
        types = {name: types[name]}
    for type_name, cls in types.items():
        extra = label(cls)
        console.print(f"[bold]{escape(type_name)}[/]{' (' + escape(extra) + ')' if extra else ''}  "
                      f"[dim]{cls.__module__}.{cls.__qualname__}[/]")
        # the class's own docstring: an undocumented subclass would show its base class's
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        console.print(f"  {' '.join(doc.split()) or '(no description)'}",
                      highlight=False, markup=False)
        console.print(parameter_table(model_parameters(cls, skip=("type",))))
    for plugin, error in registry.plugin_errors.items():
        console.print(f"[red]plugin failed to load:[/] {escape(plugin)}: {escape(error)}")
    return 0
