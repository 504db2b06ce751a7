"""``stele export --format pykeen|pyg`` of ``knowledge.embed`` artifacts: each export is loaded by
the snippet its own README gives (PyKEEN's and PyG's classes, no stele), and the peer model's
scores equal stele's on every triple of a tiny graph, after the documented ``score_offset``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.export import ExportError, export
from knowledge.models import build_model, load_model, save_model
from pipeline.cli import main

N_ENT, N_REL, DIM = 12, 3, 8
# labels a careless TSV round trip would change: "NA" (pandas' missing value), digits only, a tab,
# quotes
ENTITY_IDS = ["t:e0", "NA", "007", 'say "hi"', "a\tb"] + [f"t:e{i}" for i in range(5, N_ENT)]
CASES = [("transe", {"p_norm": 1.0}), ("transe", {"p_norm": 2.0}),
         ("transe", {"p_norm": 1.0, "entity_norm": 2.0}), ("transe", {"p_norm": 2.0, "entity_norm": 2.0}),
         ("distmult", {}), ("complex", {}), ("rotate", {"margin": 9.0})]
IDS = [f"{n}-{'-'.join(f'{k}{v:g}' for k, v in kw.items())}" for n, kw in CASES]


def make_embed_artifact(folder: Path, name: str, kwargs: dict, seed: int = 0) -> Path:
    """A ``knowledge.embed`` artifact as the stage writes it (model.json + model.safetensors, the
    entity and relation tables, a manifest), with random weights that no constraint tidied up."""
    torch.manual_seed(seed)
    model = build_model(name, N_ENT, N_REL, DIM, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    if hasattr(model, "apply_constraints"):
        model.apply_constraints()  # a projected TransE is stored projected
    folder.mkdir(parents=True)
    save_model(folder, model)
    pq.write_table(pa.table({"idx": list(range(N_ENT))[::-1], "id": ENTITY_IDS[::-1]}),
                   folder / "entities.parquet")  # rows out of idx order: the maps follow idx
    pq.write_table(pa.table({"idx": list(range(N_REL)), "id": [f"t:r{i}" for i in range(N_REL)]}),
                   folder / "relations.parquet")
    (folder / "manifest.json").write_text(json.dumps({"type": "knowledge.embed", "files": {}}))
    return folder


def load_with_readme(out: Path) -> dict:
    """Run the python block of the export's README.md (what a user copies), in a fresh namespace."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.DOTALL).group(1)
    assert 'folder = "path/to/this/folder"' in code
    ns: dict = {}
    exec(code.replace("path/to/this/folder", str(out)), ns)  # noqa: S102 - our own README
    return ns


def all_triples() -> torch.Tensor:
    h, r, t = torch.meshgrid(torch.arange(N_ENT), torch.arange(N_REL), torch.arange(N_ENT), indexing="ij")
    return torch.stack([h.reshape(-1), r.reshape(-1), t.reshape(-1)], 1)


def stele_scores(artifact: Path, hrt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(artifact)(hrt[:, 0], hrt[:, 1], hrt[:, 2])


def check_maps(ns: dict) -> None:
    assert ns["maps"]["entity_to_id"] == {e: i for i, e in enumerate(ENTITY_IDS)}
    assert ns["maps"]["relation_to_id"] == {f"t:r{i}": i for i in range(N_REL)}


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_pykeen_model_scores_as_stele(tmp_path: Path, name: str, kwargs: dict) -> None:
    pytest.importorskip("pykeen")
    art = make_embed_artifact(tmp_path / "art", name, kwargs)
    summary = export(str(art), "pykeen", tmp_path / "out")
    assert summary["stage_type"] == "knowledge.embed"
    ns = load_with_readme(tmp_path / "out")
    check_maps(ns)
    model, config = ns["model"], ns["config"]
    assert type(model).__name__ == {"transe": "TransE", "distmult": "DistMult", "complex": "ComplEx",
                                    "rotate": "RotatE"}[name]
    hrt = all_triples()
    with torch.no_grad():
        theirs = model.score_hrt(hrt).squeeze(-1) + config["score_offset"]
    torch.testing.assert_close(theirs, stele_scores(art, hrt), rtol=1e-5, atol=1e-5)
    assert config["score_offset"] == (9.0 if name == "rotate" else 0.0)
    assert not list((tmp_path / "out").glob("*.p*t")) and not list(tmp_path.glob(".out.export-*"))


@pytest.mark.parametrize(("name", "kwargs"), [c for c in CASES if c[1].get("entity_norm", 0) != 2.0
                                              or c[1]["p_norm"] == 2.0],
                         ids=[i for i, c in zip(IDS, CASES) if c[1].get("entity_norm", 0) != 2.0
                              or c[1]["p_norm"] == 2.0])
def test_pyg_model_scores_as_stele(tmp_path: Path, name: str, kwargs: dict) -> None:
    """The plain ``torch_geometric.nn.kge`` class (not stele's subclass) loads the state dict; a
    TransE projected on the sphere of its own distance norm scores alike (PyG's normalisation of
    a unit vector is the identity, up to rounding)."""
    from torch_geometric.nn import kge

    art = make_embed_artifact(tmp_path / "art", name, kwargs)
    export(str(art), "pyg", tmp_path / "out")
    ns = load_with_readme(tmp_path / "out")
    check_maps(ns)
    model, config = ns["model"], ns["config"]
    assert type(model) is getattr(kge, config["class"])
    assert config["kwargs"]["num_nodes"] == N_ENT and config["kwargs"]["num_relations"] == N_REL
    assert config["kwargs"]["hidden_channels"] == DIM and config["score_offset"] == 0.0
    hrt = all_triples()
    with torch.no_grad():
        theirs = model(hrt[:, 0], hrt[:, 1], hrt[:, 2])
    torch.testing.assert_close(theirs, stele_scores(art, hrt), rtol=1e-5, atol=1e-5)


def test_pyg_refuses_a_transe_no_pyg_model_scores(tmp_path: Path) -> None:
    """L1 distance over entities kept on the unit L2 sphere (PyKEEN's TransE): PyG's TransE would
    renormalise them in L1; the export says so, points at pykeen, and leaves nothing behind."""
    art = make_embed_artifact(tmp_path / "art", "transe", {"p_norm": 1.0, "entity_norm": 2.0})
    with pytest.raises(ExportError, match="unit L2 sphere.*--format pykeen"):
        export(str(art), "pyg", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_cli_resolves_keys_and_stage_names_and_refuses_bad_requests(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    key = "ab12cd34" + "0" * 56
    make_embed_artifact(store / "artifacts" / key, "rotate", {"margin": 9.0})
    out = tmp_path / "rotate-pyg"
    assert main(["export", key[:8], "--format", "pyg", "--out", str(out), "--store", str(store)]) == 0
    printed = capsys.readouterr().out
    assert "knowledge.embed -> pyg" in printed and "torch_geometric.nn.kge.RotatE(" in printed
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "entity_to_id.tsv.gz",
                                                     "model.safetensors", "relation_to_id.tsv.gz"]
    # the folder exists now: a second export into it is refused rather than mixed in
    assert main(["export", key[:8], "--format", "pyg", "--out", str(out), "--store", str(store)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().out
    assert main(["export", key[:8], "--format", "hf", "--out", str(tmp_path / "x"),
                 "--store", str(store)]) == 2
    assert "export as pykeen or pyg, not 'hf'" in capsys.readouterr().out
    # a stage name, through the store's run records (as `stele show` reads them)
    from pipeline.store import ArtifactStore

    ArtifactStore(str(store)).record_run({"run_id": "20260101-000000-aaaaaa", "stages": {
        "kinships_rotate": {"status": "ran", "key": key, "type": "knowledge.embed"}}})
    assert main(["export", "kinships_rotate", "--format", "pykeen", "--out", str(tmp_path / "named"),
                 "--store", str(store)]) == 0
    assert json.loads((tmp_path / "named" / "config.json").read_text())["class"] == "RotatE"
    capsys.readouterr()
    assert main(["export", "ffffff", "--format", "pyg", "--out", str(tmp_path / "x"),
                 "--store", str(store)]) == 2
    assert "no artifact 'ffffff'" in capsys.readouterr().out
    other = tmp_path / "kg"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"type": "knowledge.ingest"}))
    assert main(["export", str(other), "--format", "pyg", "--out", str(tmp_path / "x")]) == 2
    assert "stage type 'knowledge.ingest' have no exporter" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()
