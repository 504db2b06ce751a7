"""The knowledge package on the command line: ``stele sources`` (a command it contributes through
``stele.commands``), and a pipeline naming a source type that does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main


def _sections(out: str) -> dict[str, str]:
    """Each type's heading line (not indented) and what follows it, by type name."""
    sections: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line and not line[0].isspace():
            sections[line.split()[0]] = [line]
        elif sections:
            sections[list(sections)[-1]].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def _params(section: str) -> list[str]:
    lines = section.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["parameter"])
    # a wrapped cell continues on a line whose first column is blank
    return [ln.split()[0] for ln in lines[start + 1:] if ln.startswith("  ") and ln[2] != " "]


def test_sources_lists_every_type_with_its_parameters(capsys: pytest.CaptureFixture) -> None:
    from knowledge.sources import SOURCES

    assert main(["sources"]) == 0
    sections = _sections(capsys.readouterr().out)
    assert list(sections) == list(SOURCES.all()) and {"triples", "wordnet", "rdf"} <= set(sections)
    for name, section in sections.items():
        description = section.splitlines()[1].strip()
        # its own one-line description, not KnowledgeSource's inherited docstring
        assert description and "Base class" not in description, (name, description)
        header = section.splitlines()[2].split()
        assert header == ["parameter", "type", "default", "description"], (name, header)
        assert _params(section)[:2] == ["namespace", "on_error"], (name, section)
    triples = sections["triples"]
    assert "Triples from delimited or JSON-lines files." in triples
    assert _params(triples) == ["namespace", "on_error", "path", "splits", "format", "header",
                                "columns", "entity_labels", "relation_labels"]
    header_row = next(ln for ln in triples.splitlines() if ln.split()[:1] == ["header"])
    assert header_row.split()[1:4] == ["bool", "False", "TSV/CSV:"], header_row
    # wordnet's `relations` parameter by the name a pipeline writes (the field is relations_)
    assert _params(sections["wordnet"]) == ["namespace", "on_error", "path", "relations"]
    assert "required" in sections["rdf"]  # rdf's path has no default


def test_sources_name_shows_one_type(capsys: pytest.CaptureFixture) -> None:
    assert main(["sources", "wordnet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wordnet ") and "\ntriples " not in out
    assert "on_error" in out and "namespace" in out and "'raise'" in out


def test_sources_unknown_name_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["sources", "tripels"]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert "unknown knowledge source 'tripels'" in lines[0] and "did you mean 'triples'" in lines[0]


def test_sources_is_in_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sources" in out and "command plugins that failed" not in out


PIPE = """\
name: bad_source
stages:
  kg:
    uses: knowledge.ingest
    with:
      sources:
        - {type: pykeen, dataset: nations}
        - {type: tripels, path: kg.tsv}
"""


def test_plan_with_an_unknown_source_type_is_one_line_exit_2(plan_error) -> None:
    p, line = plan_error(PIPE)
    assert line.startswith(f"error: {p}:8: stages.kg.with.sources[1]: "), line
    assert "unknown knowledge source 'tripels'" in line and "did you mean 'triples'" in line


@pytest.mark.parametrize("entry,message", [
    ("{type: triples}", "sources[1]: Value error, give either 'path' or 'splits'"),
    ("{type: triples, path: kg.tsv, header: maybe}",
     "sources[1].header: Input should be a valid boolean, unable to interpret input (got 'maybe')"),
    ("{type: triples, path: kg.tsv, heder: true}", "sources[1].heder: unknown parameter 'heder'"),
    ("{path: kg.tsv}", "sources[1]: Value error, each source needs a 'type:'"),
])
def test_plan_with_a_bad_source_entry_is_one_line_naming_it(tmp_path: Path, entry: str, message: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(PIPE.replace("{type: tripels, path: kg.tsv}", entry))
    code = main(["plan", str(p), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {p}:8: stages.kg.with.{message}"), err
