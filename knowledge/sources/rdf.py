"""RDF files (N-Triples, Turtle) as a knowledge source, parsed with rdflib.

Formats: N-Triples (W3C RDF 1.1 N-Triples, https://www.w3.org/TR/n-triples/; ``.nt``, ``.nt.gz``) and
Turtle (https://www.w3.org/TR/turtle/; ``.ttl``, ``.ttl.gz``); ``format:`` overrides the suffix.

Mapping:

- Triples are the statements whose object is an IRI (graph edges). Literal-valued statements are
  entity attributes, not edges: ``rdfs:label`` gives ``name`` (in ``language``, else untagged, else
  any; further labels become aliases), ``skos:altLabel`` / ``skos:prefLabel`` give ``aliases``,
  ``rdfs:comment`` / ``schema:description`` / ``skos:definition`` give ``description`` (first found,
  in that order). Other literal properties are not mapped.
- ``rdf:type`` statements give the subject's ``types`` (class IRIs) and are *not* triples: classes
  would otherwise become hub entities linked to every instance, which dominates KG embeddings and is
  what ``types`` is for.
- Entities are the IRIs that are subject or object of an edge. Ids are the full IRIs: unique, stable
  across files whatever prefixes each file declares (prefixed names depend on the file's bindings),
  and ingest namespaces them anyway; ``name`` carries the readable part.
- Relations are the edge predicates (id = IRI), named by their ``rdfs:label`` if the graph has one,
  else the IRI's local name (after the last ``#`` or ``/``).
- Blank nodes have no stable identity across runs, so an edge touching one is quarantined.
- A statement that is not RDF although rdflib's Turtle parser takes it (a literal subject, a predicate
  that is a literal or a blank node) is quarantined: it would otherwise be dropped, or become an edge
  whose relation is a literal.

N-Triples is parsed line by line, so a malformed line is quarantined with its file and line and the rest
is read. Turtle is parsed as one document with rdflib's Turtle parser, through a sink that notes the
line each statement ends on: quarantined statements are reported as ``file:line`` too, and blank nodes
are numbered in the order the file gives them rather than by rdflib's random ids, so the records are
the same on every run. A Turtle file that cannot be parsed at all raises :class:`SourceError` naming
the file and the line where parsing stopped, whatever ``on_error`` says. The graph is held in memory
(parsed once per source object; each bad item is reported once).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr
from rdflib import RDF, RDFS, SKOS, BNode, Graph, Literal as RDFLiteral, URIRef
from rdflib.exceptions import ParserError
from rdflib.plugins.parsers.notation3 import BadSyntax, RDFSink, SinkParser
from rdflib.plugins.parsers.ntriples import (W3CNTriplesParser, r_literal, r_nodeid, r_tail, r_uriref,
                                             r_wspaces)

from pipeline.quarantine import describe
from pipeline.uris import InputURI, URIPath, input_path

from .base import (Entity, KnowledgeSource, Quarantine, Relation, SourceError, Triple, read_lines,
                   source)

SUFFIX_FORMATS = {".nt": "nt", ".ttl": "turtle"}
# What each token pattern of rdflib's N-Triples parser reads, for the reason of a line it stops in.
_NT_TOKENS = [(r.pattern, what) for r, what in (
    (r_tail, "'.' at the end of the statement"), (r_wspaces, "a space between terms"),
    (r_uriref, "an IRI in <...>"), (r_nodeid, "a blank node label (_:name)"), (r_literal, "a literal"))]
DESCRIPTION_PREDICATES = (RDFS.comment, URIRef("http://schema.org/description"),
                          URIRef("https://schema.org/description"), SKOS.definition)
ALIAS_PREDICATES = (SKOS.altLabel, SKOS.prefLabel)


class _LineSink:
    """rdflib N-Triples sink that keeps the triples of the current line."""

    def __init__(self) -> None:
        self.got: list[tuple] = []

    def triple(self, s, p, o) -> None:
        self.got.append((s, p, o))


class _TurtleSink(RDFSink):
    """rdflib's Turtle sink, noting the line each statement ends on, with blank nodes numbered.

    rdflib names blank nodes with a random UUID per parse; numbered in the order the file gives them
    they read the same on every run, in quarantine records and in any message that names one.
    """

    def __init__(self, graph: Graph) -> None:
        super().__init__(graph)
        self.uuid = ""  # rdflib's ids are "n<uuid>b<count>": these become "nb1", "nb2", ...
        self.parser: SinkParser | None = None
        self.lines: dict[tuple, int] = {}

    def makeStatement(self, quadruple, why=None) -> None:  # noqa: N802 - rdflib's name
        super().makeStatement(quadruple, why)
        f, p, s, o = quadruple
        # The parser counts the newlines it has passed: the statement ends on the line after them.
        self.lines.setdefault((self.normalise(f, s), self.normalise(f, p), self.normalise(f, o)),
                              self.parser.lines + 1)


def _nt_reason(e: Exception) -> str:
    """Why rdflib's N-Triples parser refused a line. Its ``Invalid line: <rest of the line>`` hides
    the cause in the exception it replaced; that cause without the rest of the line (which the record
    holds) is the reason, so lines broken the same way are counted together."""
    cause = e.__context__ if isinstance(e, ParserError) and isinstance(e.__context__, ParserError) \
        else e
    msg = describe(cause)
    if not isinstance(cause, ParserError):
        return f"N-Triples syntax error ({type(cause).__name__}: {msg})"
    for pattern, what in _NT_TOKENS:
        if msg.startswith(f"Failed to eat {pattern} at"):
            return f"N-Triples syntax error (expected {what})"
    if msg.startswith(("Trailing garbage:", "Illegal escape at:")):
        msg = msg.partition(":")[0].removesuffix(" at")
    return f"N-Triples syntax error ({msg})"


def local_name(iri: str) -> str:
    tail = iri.rstrip("/#")
    return tail[max(tail.rfind("#"), tail.rfind("/")) + 1:] or iri


@source("rdf")
class RDFSource(KnowledgeSource):
    """RDF files (N-Triples, Turtle), parsed with rdflib; names from rdfs:label."""

    path: InputURI = Field(description=".nt / .ttl file (optionally .gz); a path or a URI")
    format: Literal["nt", "turtle"] | None = Field(default=None,
                                                   description="default: from the file's suffix")
    language: str = Field(default="en", description="language of the names and descriptions kept")

    _graph: Graph | None = PrivateAttr(default=None)

    def files(self) -> list[Path | URIPath]:
        return [input_path(self.path)]

    def _format(self) -> str:
        if self.format:
            return self.format
        p = input_path(self.path)
        suffix = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
        if suffix not in SUFFIX_FORMATS:
            raise SourceError(f"{p}: cannot tell the RDF format from the suffix {suffix!r}; use "
                              f"format: nt or format: turtle")
        return SUFFIX_FORMATS[suffix]

    def _load(self, q: Quarantine) -> Graph:
        if self._graph is not None:
            return self._graph
        path = input_path(self.path)
        if not path.is_file():
            raise SourceError(f"{path}: no such file")
        g = Graph()
        if self._format() == "nt":
            sink = _LineSink()
            parser = W3CNTriplesParser(sink)  # one parser: `_:b` labels keep meaning across lines
            for no, line in read_lines(path, q):
                sink.got.clear()
                try:
                    parser.parsestring(line + "\n")
                except Exception as e:  # noqa: BLE001 - whatever rdflib raises, it is about this line
                    q.bad(f"{path}:{no}", _nt_reason(e), line)
                    continue
                for s, p, o in sink.got:
                    if isinstance(o, URIRef) and p != RDF.type and (
                            isinstance(s, BNode) or isinstance(o, BNode)):
                        q.bad(f"{path}:{no}", "edge with a blank node (no stable id)", line)
                        continue
                    g.add((s, p, o))
        else:
            data = path.read_bytes()
            if path.suffix == ".gz":
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as e:
                    raise SourceError(f"{path}: cannot decompress it ({describe(e)})") from None
            lines = self._parse_turtle(path, data, g)
            # In file order: the records read like those of a line-by-line source.
            stmts = sorted((lines.get(t, 0), f"{t[0].n3()} {t[1].n3()} {t[2].n3()}", t)
                           for t in g.triples((None, None, None)))
            for line, text, (s, p, o) in stmts:
                where = f"{path}:{line}" if line else str(path)
                if isinstance(s, RDFLiteral) or not isinstance(p, URIRef):
                    what = "subject is a literal" if isinstance(s, RDFLiteral) else \
                        f"predicate is a {'literal' if isinstance(p, RDFLiteral) else 'blank node'}"
                    q.bad(where, f"not an RDF statement ({what})", text)
                    g.remove((s, p, o))
                elif isinstance(o, BNode) or (isinstance(s, BNode) and isinstance(o, URIRef)):
                    if p != RDF.type:
                        q.bad(where, "edge with a blank node (no stable id)", text)
        self._graph = g
        return g

    @staticmethod
    def _parse_turtle(path: Path | URIPath, data: bytes, g: Graph) -> dict[tuple, int]:
        """Parse ``data`` into ``g``; returns the line of each statement. A file that cannot be
        parsed raises :class:`SourceError` with its file and the line where parsing stopped."""
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise SourceError(f"{path}:{line}: Turtle parse error: {describe(e)}") from None
        sink = _TurtleSink(g)
        parser = sink.parser = SinkParser(sink, baseURI=g.absolutize(path.resolve().as_uri()),
                                          turtle=True)
        try:
            parser.loadBuf(text)
        except BadSyntax as e:
            # BadSyntax.lines counts the newlines before the error: the 1-based line is one more.
            raise SourceError(f"{path}:{e.lines + 1}: Turtle syntax error: {e._why}") from None
        except Exception as e:  # noqa: BLE001 - rdflib fails on some bad input with other errors
            # (a bad language tag, an N3 variable): the parser's newline count still says where.
            raise SourceError(f"{path}:{parser.lines + 1}: Turtle parse error "
                              f"({type(e).__name__}: {describe(e)})") from None
        return sink.lines

    @staticmethod
    def _is_edge(s, p, o) -> bool:
        return isinstance(s, URIRef) and isinstance(p, URIRef) and isinstance(o, URIRef) \
            and p != RDF.type

    def _edges(self, q: Quarantine) -> list[tuple[URIRef, URIRef, URIRef]]:
        return sorted(t for t in self._load(q) if self._is_edge(*t))

    def _texts(self, g: Graph, s: URIRef, preds) -> list[str]:
        """Literal values of ``preds`` on ``s``: the chosen language first, then untagged, then others."""
        lits = [o for p in preds for o in g.objects(s, p) if isinstance(o, RDFLiteral)]
        rank = {self.language: 0, None: 1}
        lits.sort(key=lambda lit: rank.get(lit.language, 2))
        out: list[str] = []
        for lit in lits:
            if str(lit) not in out:
                out.append(str(lit))
        return out

    def entities(self, q: Quarantine) -> Iterator[Entity]:
        g = self._load(q)
        seen: dict[URIRef, None] = {}
        for s, _, o in self._edges(q):
            seen.setdefault(s)
            seen.setdefault(o)
        for iri in seen:
            labels = self._texts(g, iri, (RDFS.label,))
            aliases = [a for a in labels[1:] + self._texts(g, iri, ALIAS_PREDICATES)
                       if a not in labels[:1]]
            desc = next((d for p in DESCRIPTION_PREDICATES for d in self._texts(g, iri, (p,))), "")
            types = sorted(str(t) for t in g.objects(iri, RDF.type) if isinstance(t, URIRef))
            yield Entity(str(iri), name=labels[0] if labels else "",
                         aliases=list(dict.fromkeys(aliases)), description=desc, types=types)

    def relations(self, q: Quarantine) -> Iterator[Relation]:
        g = self._load(q)
        for p in dict.fromkeys(p for _, p, _ in self._edges(q)):
            labels = self._texts(g, p, (RDFS.label,))
            yield Relation(str(p), name=labels[0] if labels else local_name(str(p)))

    def triples(self, q: Quarantine) -> Iterator[Triple]:
        for s, p, o in self._edges(q):
            yield Triple(str(s), str(p), str(o), where=self.path)
