"""``import stele``: run a pipeline, load artifacts by stage name, evaluate retrieval, from Python."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import stele
from pipeline.registry import REGISTRY, Registry, stage

PIPE = """\
name: api
stages:
  a: {uses: test.write, with: {text: A}}
  b: {uses: test.write, inputs: [a], with: {text: B, parts: 2}}
"""


def expected(text: str, upstream: list[str]) -> str:
    """What the test plugin's test.write writes to out.txt."""
    return text + "".join(f"<{u}>" for u in upstream)


@pytest.fixture(scope="module")
def store_with_runs(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> tuple[Path, list]:
    """Two runs through ``stele.run`` (a's text set from Python in the second): (store, results)."""
    tmp = tmp_path_factory.mktemp("api")
    pipe = tmp / "p.yaml"
    pipe.write_text(PIPE)
    store = tmp / "store"
    first = stele.run(pipe, store=store, quiet=True, report=False)
    second = stele.run(pipe, store=str(store), set={"a.text": "Z"}, quiet=True, report=False)
    return store, [first, second]


def test_run_returns_each_stage_s_status_key_metrics_and_wall_time(
        store_with_runs: tuple[Path, list]) -> None:
    store, (first, second) = store_with_runs
    assert first.ok and second.ok and first.wall_s is not None and second.wall_s is not None
    b = second.outcomes["b"]
    assert (b.status, b.type, b.metrics["parts"]) == ("ran", "test.write", 2)
    assert b.wall_s is not None and b.key != first.outcomes["b"].key  # a's text changed
    assert (store / "artifacts" / b.key / "out.txt").read_text() == expected("B", [expected("Z", [])])
    assert stele.read_run(stele.ArtifactStore(store), second.run_id)["stages"]["b"]["key"] == b.key


def test_run_again_is_cached_and_prints_the_summary_unless_quiet(
        store_with_runs: tuple[Path, list], capsys: pytest.CaptureFixture) -> None:
    store, (_, second) = store_with_runs
    pipe = store.parent / "p.yaml"
    again = stele.run(pipe, store=store, set={"a.text": "Z"}, report=False)
    assert {o.status for o in again.outcomes.values()} == {"cached"}
    assert again.outcomes["b"].key == second.outcomes["b"].key
    printed = capsys.readouterr().out
    assert "api: 2 cached in " in printed and f"run {again.run_id}" in printed, printed
    stele.run(pipe, store=store, set={"a.text": "Z"}, quiet=True, report=False)
    assert capsys.readouterr().out == ""


def test_run_refuses_a_bad_spec_before_anything_runs(tmp_path: Path, test_stages: None) -> None:
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE)
    with pytest.raises(stele.SpecError, match=r"^--set: a.text=3: Input should be a valid string"):
        stele.run(pipe, store=tmp_path / "store", set={"a.text": 3}, quiet=True)
    assert not (tmp_path / "store").exists()


def test_load_gives_the_artifact_of_a_stage_name_with_a_note_when_its_type_has_no_loader(
        store_with_runs: tuple[Path, list]) -> None:
    store, (first, second) = store_with_runs
    with pytest.warns(UserWarning, match=r"stele.load\('b'\): stage type 'test.write' declares no "
                                         r"loader; returning its Artifact \(files in "):
        art = stele.load(store, "b")
    assert isinstance(art, stele.Artifact) and art.key == second.outcomes["b"].key
    with pytest.warns(UserWarning):
        older = stele.load(store, "b", run=first.run_id)
    assert (older / "out.txt").read_text() == expected("B", [expected("A", [])])
    with pytest.warns(UserWarning):
        assert stele.load(str(store), first.outcomes["a"].key[:10]).key == first.outcomes["a"].key
    with pytest.raises(stele.StoreError, match=r"no stage 'bb' in the runs of .* \(did you mean 'b'\?\)"):
        stele.load(store, "bb")


def test_load_hands_the_folder_to_the_loader_its_stage_type_declares(
        store_with_runs: tuple[Path, list], monkeypatch: pytest.MonkeyPatch) -> None:
    store, (_, second) = store_with_runs
    write = REGISTRY.get("test.write")
    monkeypatch.setitem(REGISTRY.types, "test.write", dataclasses.replace(
        write, loader=lambda folder: ("loaded", (folder / "out.txt").read_text())))
    assert stele.load(store, "b") == ("loaded", expected("B", [expected("Z", [])]))


def test_stage_declares_its_loader() -> None:
    reg = Registry(_loaded=True)

    def load_counts(folder: Path) -> dict:
        return json.loads((folder / "counts.json").read_text())

    stage("t.counts", registry=reg, loader=load_counts)(lambda ctx: None)
    stage("t.plain", registry=reg)(lambda ctx: None)
    assert reg.get("t.counts").loader is load_counts and reg.get("t.plain").loader is None


def _fake_protocol(model_dir: Path, media_dir: Path, out: Path, params, first_stage_dir=None,
                   queries_dir=None) -> dict:
    """Stands in for fusion.retrieval's protocol (tested with real models in tests/fusion): writes
    what it writes, from the folders it was given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fusion.retrieval.scorer import DIRECTIONS

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"mode": params.mode, "k": params.k,
                                                  "dirs": [model_dir.name, media_dir.name]}))
    pq.write_table(pa.table({"direction": ["text_to_media"], "rank": [1]}), out / "ranks.parquet")
    return {"mode": params.mode, "k": params.k, "captions": 1, "media": 1, "eval_s": 0.0,
            "pairs_scored": 0, "rsum": 600.0, "first_stage_rsum": 600.0,
            **{f"{d}_{m}": 100.0 for d in DIRECTIONS
               for m in ("R@1", "R@5", "R@10", "median_rank", "mAP@10")}}


def test_evaluate_retrieval_takes_stage_names_like_the_command(
        store_with_runs: tuple[Path, list], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    store, (first, second) = store_with_runs
    monkeypatch.setattr("fusion.retrieval.cli.evaluate", _fake_protocol)
    res = stele.evaluate_retrieval("b", "a", store=store, out=store.parent / "r", mode="rerank", k=5)
    assert res.path == store.parent / "r" and res.headline["k"] == 5
    assert res.metrics == {"mode": "rerank", "k": 5,
                           "dirs": [second.outcomes["b"].key, second.outcomes["a"].key]}
    assert res.ranks.column("rank").to_pylist() == [1]
    res = stele.evaluate_retrieval("b", "a", store=store, out=store.parent / "r1", run=first.run_id,
                                   mode="dual")
    assert res.metrics["dirs"] == [first.outcomes["b"].key, first.outcomes["a"].key]
    assert main(["eval", "retrieval", "--model", "b", "--media", "a", "--store", str(store),
                 "--out", str(store.parent / "r2")]) == 0
    assert "retrieval (rerank, k=32, fuse=none)" in capsys.readouterr().out
    assert json.loads((store.parent / "r2" / "metrics.json").read_text())["dirs"] == \
        [second.outcomes["b"].key, second.outcomes["a"].key]


# ------------------------------------------------------------------- the built-in types' loaders
def test_load_gives_a_knowledge_graph_for_knowledge_ingest(tmp_path: Path, ray_local: None) -> None:
    from knowledge.kg import KnowledgeGraph

    tsv = tmp_path / "kg.tsv"
    tsv.write_text("".join(f"e{i}\tnext\te{i + 1}\n" for i in range(30)))
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"stages:\n  kg:\n    uses: knowledge.ingest\n"
                    f"    with: {{sources: [{{type: triples, path: {tsv}}}]}}\n")
    assert stele.run(pipe, store=tmp_path / "store", quiet=True, report=False).ok
    kg = stele.load(tmp_path / "store", "kg")
    assert isinstance(kg, KnowledgeGraph)
    assert (kg.num_entities, kg.num_relations, kg.triples.num_rows) == (31, 1, 30)


def test_load_gives_the_model_of_knowledge_embed(tmp_path: Path) -> None:
    import torch

    from knowledge.models import build_model, save_model

    model = build_model("distmult", 6, 2, 8)
    save_model(tmp_path, model)
    loaded = REGISTRY.get("knowledge.embed").loader(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("type_name", ["vision.features", "speech.features"])
def test_load_gives_a_feature_set_for_feature_stages(type_name: str, tmp_path: Path) -> None:
    from pipeline.features import FeatureSet

    from .fusion.conftest import make_feature_artifact

    folder = make_feature_artifact(tmp_path / "f", dim=16)
    fs = REGISTRY.get(type_name).loader(folder)
    assert isinstance(fs, FeatureSet) and fs.dim == 16 and len(fs.load()) == 42


def test_load_gives_the_pretrained_encoder_of_fusion_pretrain(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr("fusion.pretrain.loop.load_pretrained", lambda folder: seen.append(folder) or "m")
    assert REGISTRY.get("fusion.pretrain").loader(tmp_path) == "m" and seen == [tmp_path]


def test_load_gives_the_metrics_and_ranks_of_fusion_retrieval(tmp_path: Path) -> None:
    from fusion.retrieval.stage import RetrievalParams, RetrievalResult

    headline = _fake_protocol(tmp_path / "m", tmp_path / "f", tmp_path, RetrievalParams(mode="dual"))
    (tmp_path / "manifest.json").write_text(json.dumps({"metrics": headline}))
    res = REGISTRY.get("fusion.retrieval").loader(tmp_path)
    assert isinstance(res, RetrievalResult) and res.headline == headline
    assert res.metrics["mode"] == "dual" and res.ranks.num_rows == 1
