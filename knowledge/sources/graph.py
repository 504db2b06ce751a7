"""A networkx graph as a knowledge source: GraphML, GML, edge-list files, or a user function.

Formats (``format:`` overrides the suffix):

- GraphML (http://graphml.graphdrawing.org/specification.html; ``.graphml``) via
  ``networkx.read_graphml``: node ids are the GraphML ``id`` attributes.
- GML (https://networkx.org/documentation/stable/reference/readwrite/gml.html; ``.gml``) via
  ``networkx.read_gml`` with its default ``label="label"``: node ids are the GML labels, which is
  how ``write_gml`` stores node names (so a written graph reads back with the same ids).
- Edge lists (``.edgelist``, ``.txt``), as ``networkx.write_edgelist`` writes them: one edge a line,
  ``head tail``, ``head tail {'relation': 'r', ...}`` (a Python dict literal, read with
  ``ast.literal_eval``) or ``head tail relation`` (the rest of the line); ``#`` starts a comment.
  Read here line by line so that a bad line is quarantined with its number; ``directed:`` says
  whether the list is directed (a file cannot say).
- ``callable: "package.module:function"``: the function is called without arguments and returns a
  networkx graph. This imports the named module, which runs its code: it is the user's own code named
  explicitly, like an entry point, never a name taken from data. The fingerprint covers that module's
  file only, not the data the function reads.

Mapping: nodes are entities (id = ``str(node)``; ``name`` from ``name_attr``, by default the ``name``
attribute, else ``label``; ``description`` from ``description_attr``; ``types`` from ``types_attr``,
a string or a list). Each edge is one triple, relation = the edge's ``relation_attr`` value, else
``related_to``. Undirected graphs give one triple per edge, oriented as networkx stores it (no
inverse is added: a model that wants symmetry adds inverse triples itself). Multigraphs give one
triple per parallel edge; identical (head, relation, tail) triples are yielded once.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from xml.etree.ElementTree import ParseError

import networkx as nx
from pydantic import Field, PrivateAttr, model_validator

from pipeline.uris import InputURI, URIPath, input_path

from .base import (Entity, KnowledgeSource, Quarantine, Relation, SourceError, Triple, read_lines,
                   source)

SUFFIX_FORMATS = {".graphml": "graphml", ".gml": "gml", ".edgelist": "edgelist", ".txt": "edgelist"}
DEFAULT_RELATION = "related_to"


@source("networkx")
class NetworkXSource(KnowledgeSource):
    """A networkx graph: GraphML, GML or edge-list files, or a function returning one."""

    path: InputURI | None = Field(default=None,
                                  description="GraphML / GML / edge-list file (a path or a URI)")
    format: Literal["graphml", "gml", "edgelist"] | None = Field(
        default=None, description="default: from the file's suffix")
    callable: str | None = Field(default=None,
                                 description="'package.module:function' returning a graph")
    directed: bool = Field(default=True, description="edge lists: whether edges are directed")
    relation_attr: str = Field(default="relation",
                               description="edge attribute naming the relation (else related_to)")
    name_attr: str | None = Field(default=None,
                                  description="node attribute naming the entity (default name, label)")
    description_attr: str = Field(default="description", description="node attribute: description")
    types_attr: str = Field(default="type", description="node attribute: type(s)")

    _graph: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_input(self) -> "NetworkXSource":
        if (self.path is None) == (self.callable is None):
            raise ValueError("give exactly one of path: (a graph file) or callable: "
                             "('package.module:function')")
        return self

    def files(self) -> list[Path | URIPath]:
        if self.path is not None:
            return [input_path(self.path)]
        try:  # locating the module imports its parent packages at most, never the module itself
            spec = importlib.util.find_spec(self.callable.partition(":")[0])
        except (ImportError, ValueError):
            spec = None
        return [Path(spec.origin)] if spec is not None and spec.has_location else []

    def _format(self) -> str:
        if self.format:
            return self.format
        suffix = input_path(self.path).suffix
        if suffix not in SUFFIX_FORMATS:
            raise SourceError(f"{self.path}: cannot tell the graph format from the suffix "
                              f"{suffix!r}; use format: graphml, gml or edgelist")
        return SUFFIX_FORMATS[suffix]

    def _load(self, q: Quarantine) -> nx.Graph:
        if self._graph is None:
            self._graph = self._call() if self.callable else self._read(q)
        return self._graph

    def _call(self) -> nx.Graph:
        module, _, fn = self.callable.partition(":")
        try:
            func = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError, ValueError) as e:
            raise SourceError(f"callable {self.callable!r}: cannot import it ({e}); write "
                              f"'package.module:function'") from None
        g = func()
        if not isinstance(g, nx.Graph):
            raise SourceError(f"callable {self.callable!r} returned {type(g).__name__}, not a "
                              f"networkx graph")
        return g

    def _read(self, q: Quarantine) -> nx.Graph:
        path = input_path(self.path)
        if not path.is_file():
            raise SourceError(f"{path}: no such file")
        fmt = self._format()
        if fmt == "edgelist":
            return self._read_edgelist(path, q)
        try:
            if isinstance(path, URIPath):  # networkx reads an open file as it reads a local one
                with path.open("rb", compression="infer") as f:
                    return nx.read_graphml(f) if fmt == "graphml" else nx.read_gml(f)
            return nx.read_graphml(path) if fmt == "graphml" else nx.read_gml(path)
        except ParseError as e:
            line, col = e.position
            raise SourceError(f"{path}:{line}: GraphML is not well-formed XML (column {col})") from None
        except (nx.NetworkXError, ValueError, KeyError) as e:
            # networkx's GML errors carry "(line, column)" in their text; GraphML ones name the item.
            raise SourceError(f"{path}: cannot read {fmt}: {e}") from None

    def _read_edgelist(self, path: Path | URIPath, q: Quarantine) -> nx.Graph:
        g = nx.MultiDiGraph() if self.directed else nx.MultiGraph()
        for no, line in read_lines(path, q):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split(None, 2)
            if len(parts) < 2:
                q.bad(f"{path}:{no}", "edge line needs 'head tail [relation or {attrs}]'", line)
                continue
            attrs: dict = {}
            if len(parts) == 3:
                if parts[2].startswith("{"):
                    try:
                        attrs = ast.literal_eval(parts[2])
                    except (ValueError, SyntaxError):
                        attrs = None
                    if not isinstance(attrs, dict):
                        q.bad(f"{path}:{no}", "edge attributes are not a dict literal", line)
                        continue
                else:
                    attrs = {self.relation_attr: parts[2]}
            g.add_edge(parts[0], parts[1], **attrs, _line=no)
        return g

    def _edges(self, q: Quarantine) -> Iterator[tuple[str, str, str, dict]]:
        g = self._load(q)
        edges = g.edges(keys=True, data=True) if g.is_multigraph() else (
            (u, v, None, d) for u, v, d in g.edges(data=True))
        for u, v, _, d in edges:
            rel = d.get(self.relation_attr)
            yield str(u), ("" if rel is None else str(rel)) or DEFAULT_RELATION, str(v), d

    def entities(self, q: Quarantine) -> Iterator[Entity]:
        for node, d in self._load(q).nodes(data=True):
            names = [self.name_attr] if self.name_attr else ["name", "label"]
            name = next((str(d[a]) for a in names if d.get(a) not in (None, "")), "")
            types = d.get(self.types_attr)
            types = [] if types in (None, "") else [str(t) for t in (
                types if isinstance(types, (list, tuple)) else [types])]
            yield Entity(str(node), name=name, description=str(d.get(self.description_attr) or ""),
                         types=types)

    def relations(self, q: Quarantine) -> Iterator[Relation]:
        for rel in dict.fromkeys(r for _, r, _, _ in self._edges(q)):
            yield Relation(rel, name=rel.replace("_", " "))

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        seen = set()
        where = self.path or self.callable
        for h, r, t, d in self._edges(q):
            if (h, r, t) not in seen:
                seen.add((h, r, t))
                yield Triple(h, r, t, where=f"{where}:{d['_line']}" if "_line" in d else where)
