"""A brand-new knowledge source added from a separate package through the `stele.sources` entry
point, with no edit to stele, used by `knowledge.ingest` from a pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import make_plugin_site, stele

SRC = Path(__file__).parent / "plugin_source.py"


@pytest.mark.slow
def test_plugin_source_through_entry_point(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    assert len(SRC.read_text().splitlines()) <= 45  # the recipe's "about 40 lines"
    site = make_plugin_site(tmp_path / "fam", module_src=SRC, name="stele_family",
                            group="stele.sources")
    data = tmp_path / "family.txt"
    data.write_text("Ann: Bob, Cat\nBob: Dan\nthis line is broken\nCat:\n")
    p = tmp_path / "p.yaml"
    p.write_text(f"stages:\n  fam:\n    uses: knowledge.ingest\n    with:\n"
                 f"      sources: [{{type: family, path: {data}, on_error: skip}}]\n"
                 f"      split: {{mode: random, valid: 0, test: 0}}\n")
    env = dict(plugin_env, PYTHONPATH=f"{site}:{plugin_env['PYTHONPATH']}")
    out = stele("run", str(p), "--store", str(tmp_path / "s"), "--no-live", env=env, check=True)
    assert "1 ran" in out.stdout
    art = next((tmp_path / "s" / "artifacts").iterdir())
    m = json.loads((art / "manifest.json").read_text())["metrics"]
    assert (m["entities"], m["relations"], m["triples"], m["quarantined"]) == (4, 1, 3, 1)
    q = json.loads((art / "quarantine.json").read_text())["sources"]["family"]
    assert q["examples"][0]["where"] == f"{data}:3"
