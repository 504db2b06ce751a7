"""``stele run --mlflow``: training stages log to MLflow (a local SQLite store here) from rank 0 of
the Ray Train harness: parameters, every step's metrics once, the stage's final metrics, its files."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest

from pipeline.errors import SpecError

mlflow = pytest.importorskip("mlflow", reason="stele[tracking] is not installed")

PIPE = """\
name: tracked
stages:
  kg:
    uses: knowledge.ingest
    with: {sources: [{type: pykeen, dataset: nations}]}
  emb:
    uses: knowledge.embed
    inputs: [kg]
    with: {model: transe, dim: 8, epochs: 4, eval_every: 2, batch_size: 256}
"""


def test_run_logs_a_training_stage_to_mlflow(tmp_path: Path, ray_local: None) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    pytest.importorskip("pykeen", reason="the nations graph ships with PyKEEN")
    pipe, store = tmp_path / "p.yaml", tmp_path / "store"
    pipe.write_text(PIPE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(pipe), "--store", str(store), "--no-live", "--mlflow", uri]) == 0

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["emb"]  # ingest trains nothing: no MLflow run
    run = runs[0]
    manifest_key = run.data.tags["stele.key"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["stele.stage"] == "emb" and run.data.tags["stele.type"] == "knowledge.embed"
    assert (store / "artifacts" / manifest_key / "manifest.json").exists()
    assert run.data.params["dim"] == "8" and run.data.params["model"] == "transe"
    assert run.data.params["scaling.num_workers"] == "1"
    # every epoch's loss once, equal to the artifact's history; validation where it evaluated
    import json

    history = json.loads((store / "artifacts" / manifest_key / "history.json").read_text())
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
    assert logged == pytest.approx({h["step"]: h["loss"] for h in history})
    assert [m.step for m in client.get_metric_history(run.info.run_id, "valid_mrr")] == [2, 4]
    assert len(client.get_metric_history(run.info.run_id, "valid_hits_at_10")) == 2  # hits@10
    manifest = json.loads((store / "artifacts" / manifest_key / "manifest.json").read_text())
    assert run.data.metrics["final/best_valid_mrr"] == pytest.approx(manifest["metrics"]["best_valid_mrr"])
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"embeddings.safetensors", "history.json", "tb"} <= files, files

    # A cached rerun trains nothing and opens no MLflow run.
    assert main(["run", str(pipe), "--store", str(store), "--no-live", "--mlflow", uri]) == 0
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_mlflow_missing_or_unreachable_is_one_line_before_ray_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    pipe, store = tmp_path / "p.yaml", tmp_path / "store"
    pipe.write_text(PIPE)
    bad = "sqlit:///mlflow.db"  # a typo
    assert main(["run", str(pipe), "--store", str(store), "--mlflow", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --mlflow: {bad}: ") and len(err.splitlines()) == 1, err

    real_import = builtins.__import__

    def no_mlflow(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name.startswith("mlflow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(SpecError, match=r"pip install 'stele\[tracking\]'"):
        from pipeline.tracking import mlflow_target

        mlflow_target(f"sqlite:///{tmp_path / 'mlflow.db'}", "x")
    assert not (store / "runs").exists()  # nothing ran
