"""Pipeline YAML as stele reads it: safe YAML, every value's line kept for error messages, and limits
that keep a hostile file from costing time or memory.

Only two tags are accepted: ``!path`` (a path relative to the YAML file) and ``!data`` (relative to
``$STELE_DATA``). A loader subclass checks while the document is composed, before any Python
object exists: nesting deeper than :data:`MAX_YAML_DEPTH`, more than :data:`MAX_YAML_NODES` nodes
once aliases are expanded (each use counted: a "billion laughs" document fails at once), recursive
aliases and duplicate keys (YAML would keep only the last) are one-line errors with file, line and
field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .uris import is_uri

SET_FILE = "--set"  # the 'file' of a value given on the command line
MAX_YAML_DEPTH = 100  # nesting: pipelines need about 8 levels
MAX_YAML_NODES = 100_000  # nodes once aliases are expanded (each use counted): the demo has ~720


class LimitError(yaml.composer.ComposerError):
    """YAML that is well-formed but refused: too deep, too large once its aliases are expanded, or
    recursive. Caught while composing, before any Python object is built."""

    def __init__(self, problem: str, mark: yaml.Mark, path: tuple):
        super().__init__(None, None, problem, mark)
        self.path = path


class LimitedLoader(yaml.SafeLoader):
    """SafeLoader that refuses, while composing the node graph (small even for hostile input, since
    aliases share nodes), documents that would blow up later: nesting deeper than
    ``MAX_YAML_DEPTH``, aliases that expand to more than ``MAX_YAML_NODES`` nodes (a "billion
    laughs" document of a few hundred bytes expands to 9**9 strings), and recursive aliases (an
    alias inside the node it names). Anything else composes exactly as with SafeLoader."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._path: list = []  # where the node being composed is (keys and list indices)
        self._open: list[str] = []  # anchors of the collections being composed
        self._size: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) once expanded
        self._expanded = 0  # nodes of the document so far, each alias counted per use

    def _refuse(self, problem: str, mark: yaml.Mark) -> LimitError:
        return LimitError(problem, mark, tuple(self._path))

    def _count(self, n: int, mark: yaml.Mark, alias: str | None) -> None:
        self._expanded += n
        if self._expanded > MAX_YAML_NODES:
            via = f" (*{alias} here)" if alias else ""
            raise self._refuse(f"YAML aliases expand to more than {MAX_YAML_NODES} nodes{via}; "
                               f"a pipeline needs far fewer", mark)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        step = index if isinstance(index, int) else (
            index.value if isinstance(index, yaml.ScalarNode) else None)
        if step is not None:
            self._path.append(step)
        try:
            return self._compose_limited(parent, index)
        finally:
            if step is not None:
                self._path.pop()

    def _compose_limited(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise self._refuse(f"recursive alias *{event.anchor} (it is inside the node it "
                                   f"names)", event.start_mark)
            node = super().compose_node(parent, index)  # (an undefined alias is an error there)
            nodes, depth = self._size[id(node)]
            if len(self._open) + depth > MAX_YAML_DEPTH:
                raise self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels (through alias "
                                   f"*{event.anchor})", event.start_mark)
            self._count(nodes, event.start_mark, event.anchor)
            return node
        collection = isinstance(event, yaml.CollectionStartEvent)
        if collection:
            if len(self._open) >= MAX_YAML_DEPTH:
                raise self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels",
                                   event.start_mark)
            self._open.append(event.anchor or "")
        try:
            node = super().compose_node(parent, index)
        finally:
            if collection:
                self._open.pop()
        if isinstance(node, yaml.MappingNode):
            parts = [self._size[id(x)] for pair in node.value for x in pair]
        elif isinstance(node, yaml.SequenceNode):
            parts = [self._size[id(x)] for x in node.value]
        else:
            parts = None
        if parts is None:  # a scalar
            self._size[id(node)] = (1, 0)
        else:
            self._size[id(node)] = (1 + sum(n for n, _ in parts),
                                    1 + max((d for _, d in parts), default=0))
        self._count(1, event.start_mark, None)
        return node


class _Loader(LimitedLoader):
    """SafeLoader (with the limits above) plus two path tags, made absolute so a pipeline runs from
    any working directory: ``!path rel/file`` (relative to the pipeline file) and ``!data
    rel/file`` (relative to ``$STELE_DATA``, the folder of full-size datasets, which may be a URI
    such as ``s3://bucket/data``). No other tags: configs never execute code."""

    base_dir = Path(".")


def _path_tag(loader: _Loader, node: yaml.Node) -> str:
    return str((loader.base_dir / loader.construct_scalar(node)).resolve())


class _TagError(yaml.constructor.ConstructorError):
    """A well-formed tag whose value cannot be resolved (not a YAML syntax problem)."""


def _data_tag(loader: _Loader, node: yaml.Node) -> str:
    rel = loader.construct_scalar(node)
    root = os.environ.get("STELE_DATA")
    if not root:
        raise _TagError(
            None, None, f"!data {rel}: STELE_DATA is not set (point it at the folder holding the "
                        f"full-size datasets)", node.start_mark)
    if is_uri(root):  # STELE_DATA=s3://bucket/data: a URI, joined as one
        return f"{root.rstrip('/')}/{rel.lstrip('/')}"
    return str((Path(root).expanduser() / rel).resolve())


_Loader.add_constructor("!path", _path_tag)
_Loader.add_constructor("!data", _data_tag)


def _yaml_error(e: yaml.YAMLError, text: str, file: str) -> SpecError:
    if isinstance(e, LimitError):
        path = e.path if len(e.path) <= 10 else e.path[:10]
        return SpecError(e.problem, file=file, line=e.problem_mark.line + 1,
                         field=(_dotted(path) + ("..." if path != e.path else "")) or None)
    problem = getattr(e, "problem", None) or str(e)
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    if context is not None:
        problem += f" ({e.context} at line {context.line + 1})"
        if mark is None or mark.index >= len(text.rstrip()):  # hit the end: where it began helps
            mark = context
    what = "" if isinstance(e, _TagError) else "malformed YAML: "
    return SpecError(f"{what}{problem}", file=file, line=mark.line + 1 if mark else None)


_MERGE = "tag:yaml.org,2002:merge"


def load_yaml(text: str, file: str, base_dir: Path | None = None) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML safely and remember the 1-based line of every mapping key and list item.

    A key given twice in one mapping is an error naming both lines (YAML loaders keep the last one
    silently: a second stage ``a:`` would replace the first). Documents that would blow up are
    refused while composing (see :class:`LimitedLoader`), so the walk below visits at most
    ``MAX_YAML_NODES`` nodes at most ``MAX_YAML_DEPTH`` deep."""
    loader = _Loader(text)
    loader.base_dir = base_dir or Path.cwd()
    lines: dict[tuple, int] = {}

    def walk(n: yaml.Node, path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for k, v in n.value:
                key = k.value
                if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE:
                    value = loader.construct_object(k)
                    try:
                        first = seen.setdefault(value, k)
                    except TypeError:  # unhashable: the constructor reports it
                        first = k
                    if first is not k:
                        same = ("" if first.value == k.value
                                else f"the same key as {first.value!r} ")
                        raise SpecError(f"duplicate key {k.value!r} ({same or 'first '}at line "
                                        f"{first.start_mark.line + 1}); YAML would keep only the "
                                        f"last", file=file, line=k.start_mark.line + 1,
                                        field=_dotted(path + (key,)))
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        node = loader.get_single_node()
        if node is not None:
            lines[()] = node.start_mark.line + 1
            walk(node, ())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise _yaml_error(e, text, file) from None
    finally:
        loader.dispose()
    return data, lines


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class Locator:
    """Turns a field path into the best (file, line) we have, including ``--set`` overrides."""

    def __init__(self, file: str, lines: dict[tuple, int], overrides: dict[tuple, str]):
        self.file, self.lines, self.overrides = file, lines, overrides

    def error(self, path: tuple, message: str) -> SpecError:
        for k in range(len(path), 1, -1):
            if path[:k] in self.overrides:  # the bad value came from the command line
                return SpecError(message, file=SET_FILE, field=self.overrides[path[:k]])
        for k in range(len(path), -1, -1):
            if path[:k] in self.lines:
                return SpecError(message, file=self.file, line=self.lines[path[:k]],
                                 field=_dotted(path) or None)
        return SpecError(message, file=self.file, field=_dotted(path) or None)
