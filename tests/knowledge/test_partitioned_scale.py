"""What partitioned KG training needs at the scale it exists for (knowledge/partitioned*.py, the
knowledge.embed stage's ``partitions`` branch; issue 23): ``assemble: false`` leaves out the whole
tables and knowledge.evaluate still ranks the artifact, from its partitions, with the numbers of the
assembled one; consumers that need a whole model refuse it in one line naming the parameter; the
sharded evaluator's tasks read the filter from the graph's URI, so their pickled arguments do not
grow with the graph; entity ids are hashed from an Arrow column as from a list."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from knowledge.evaluate import rank_metrics
from knowledge.models import build_model
from knowledge.partitioned import PartitionedJob, Partitioning, PartitionStore, part_file
from knowledge.partitioned_eval import (FilterSource, read_members, read_partitioning, sharded_rank_metrics,
                                        write_partitioning)
from tests.knowledge.test_embed import kg_of
from tests.knowledge.test_partitioned import _ctx, _random, _saved, _store_model, _uri


def test_arrow_ids_partition_as_a_list_and_the_partitioning_file_round_trips() -> None:
    """The ids as a chunked Arrow column (hashed a chunk at a time) give the list's partitioning;
    the file written for tasks gives it back, and one partition's members read alone are its
    entities in local order."""
    ids = [f"wd:Q{i}" for i in range(1003)]
    parts = Partitioning.by_hash(ids, 7, seed=3)
    arrow = Partitioning.by_hash(pa.chunked_array([ids[:400], ids[400:]]), 7, seed=3)
    assert (arrow.partition == parts.partition).all() and (arrow.offset == parts.offset).all()
    uri = f"{_uri()}/partitioning.parquet"
    write_partitioning(parts, uri)
    back = read_partitioning(uri)
    assert back.num_partitions == 7
    assert (back.partition == parts.partition).all() and (back.offset == parts.offset).all()
    for p in (0, 6):
        np.testing.assert_array_equal(read_members(uri, p), parts.members(p))


def _case(num_triples: int) -> tuple[PartitionedJob, Partitioning, torch.Tensor, str, str, torch.nn.Module]:
    """A DistMult model of 50 entities in 3 partitions and a graph of ``num_triples`` triples saved
    as a KG artifact (memory://); its first 20 triples are the test set."""
    n, r = 50, 3
    trip = _random(n, r, num_triples, seed=5)
    kg = kg_of(trip, n, r)
    kg_uri = _saved(kg)
    parts = Partitioning.by_hash(kg.entity_ids(), 3)
    torch.manual_seed(0)
    model = build_model("distmult", n, r, 8).eval()
    job = PartitionedJob(model="distmult", dim=8, model_kwargs={}, num_entities=n, num_relations=r,
                         state_uri=_uri(), buckets_uri=_uri())
    _store_model(job, model, parts)
    part_uri = f"{_uri()}/partitioning.parquet"
    write_partitioning(parts, part_uri)
    return job, parts, torch.from_numpy(kg.split_array()), kg_uri, part_uri, model


def test_tasks_read_the_filter_themselves(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """With a FilterSource every task's pickled arguments are the same size for a graph of 200
    triples and one of 4,000 (the same 20 test triples): nothing in them grows with the filter,
    while the filter shipped by value grows by more than the triples' bytes; both give
    knowledge.evaluate.rank_metrics' ranks exactly."""
    import knowledge.partitioned_eval as module

    sizes: dict[str, list[int]] = {}
    real = module.run_tasks

    def measured(key: str):  # noqa: ANN202
        def run(fn, calls, workers, cpus=1.0):  # noqa: ANN001, ANN202
            sizes.setdefault(key, []).extend(len(pickle.dumps(c)) for c in calls)
            return real(fn, calls, workers, cpus)
        return run

    for m in (200, 4000):
        job, parts, trip, kg_uri, part_uri, model = _case(m)
        test = trip[:20]
        want = rank_metrics(model, test, trip, job.num_entities, batch_size=8, num_relations=3)
        for how, known in (("source", FilterSource(kg_uri, part_uri)), ("tensor", trip)):
            monkeypatch.setattr(module, "run_tasks", measured(f"{how}-{m}"))
            got = sharded_rank_metrics(job, parts, test, known, batch_size=8)
            for k in ("filtered", "raw", "per_relation", "num_known"):
                assert got[k] == want[k], (how, m, k)
            for k, v in want["ranks"].items():
                np.testing.assert_array_equal(got["ranks"][k], v, err_msg=f"{how} {m} {k}")
    assert sizes["source-200"] == sizes["source-4000"]
    assert sum(sizes["tensor-4000"]) - sum(sizes["tensor-200"]) > 3800 * 3 * 8


def _evaluate(tmp: Path, kg_dir: Path, model_dir: Path) -> dict:
    from pipeline.context import StageContext
    from pipeline.registry import Resources
    from pipeline.store import Artifact
    from knowledge.stages.evaluate import EvaluateParams, evaluate

    out = tmp / "eval"
    out.mkdir()
    ctx = StageContext(stage="ev", key="v", out=out, resources=Resources(), state_uri=str(tmp / "st"),
                       inputs={"kg": Artifact("k", kg_dir, {}), "model": Artifact("m", model_dir, {})},
                       log=logging.getLogger("test.part.eval"))
    headline = evaluate(ctx, EvaluateParams(split="test", batch_size=8, device="cpu"))
    return {"headline": headline, "metrics": json.loads((out / "metrics.json").read_text()),
            "ranks": pq.read_table(out / "ranks.parquet").to_pydict()}


def test_without_assembly_the_artifact_evaluates_from_its_partitions(tmp_path: Path,
                                                                       one_thread: None) -> None:
    """``assemble: false`` (the parameter stays out of the key at its default, and needs
    partitions > 1): the artifact has partitions/ and the tables but no model.safetensors or
    embeddings.safetensors, its partitions are those of the same run with assembly, and
    knowledge.evaluate ranks it through the sharded evaluator with every number and rank of the
    assembled artifact's (rank_metrics on the whole model). stele.load's loader and the PyKEEN/PyG
    exporter refuse it in one line naming ``assemble: true``."""
    from pydantic import ValidationError

    from knowledge.export import export_embeddings
    from knowledge.stages.embed import EmbedParams, embed, load_trained
    from pipeline.errors import SteleError
    from pipeline.export import ExportError

    assert "assemble" not in EmbedParams(partitions=3).model_dump(mode="json")
    assert EmbedParams(partitions=3, assemble=False).model_dump(mode="json")["assemble"] is False
    with pytest.raises(ValidationError, match="assemble: false needs partitions > 1"):
        EmbedParams(assemble=False)
    n, r = 30, 3
    split = ["valid" if i % 10 == 0 else "test" if i % 10 == 1 else "train" for i in range(200)]
    kg = kg_of(_random(n, r, 200, seed=3), n, r, split)
    settings = dict(model="transe", dim=8, epochs=2, eval_every=1, patience=0, lr=0.1,
                    optimizer="rowwise_adagrad", partitions=3)
    whole = _ctx(tmp_path / "whole", kg, _uri())
    embed(whole, EmbedParams(**settings))
    bare = _ctx(tmp_path / "bare", kg, _uri())
    metrics = embed(bare, EmbedParams(**settings, assemble=False))
    assert metrics["assembled"] is False and metrics["weights"] == "best validation"
    assert not (bare.out / "model.safetensors").exists()
    assert not (bare.out / "embeddings.safetensors").exists()
    assert (bare.out / "entities.parquet").exists() and (whole.out / "model.safetensors").exists()
    assert pq.read_table(bare.out / "entities.parquet").equals(pq.read_table(whole.out / "entities.parquet"))
    for p in range(3):
        a = PartitionStore(str(bare.out / "partitions")).load(part_file(p))
        b = PartitionStore(str(whole.out / "partitions")).load(part_file(p))
        assert all(torch.equal(a[k], b[k]) for k in a)

    got = _evaluate(tmp_path / "bare", tmp_path / "bare" / "kg", bare.out)
    want = _evaluate(tmp_path / "whole", tmp_path / "whole" / "kg", whole.out)
    assert got["metrics"].pop("evaluator").startswith("sharded over 3 partitions")
    assert "evaluator" not in want["metrics"]
    assert got == want

    for call, error in ((lambda: load_trained(bare.out), SteleError),
                        (lambda: export_embeddings(bare.out, "pykeen", tmp_path / "x"), ExportError)):
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert "assemble: true" in message and "\n" not in message


def test_a_kill_inside_the_best_epoch_snapshot_resumes_to_the_same_artifact(
        tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage dies while epoch 1's partitions are being copied as the best so far (one file
    copied, no marker); run again, it redoes that epoch's end and ends with the artifact of a run
    never interrupted: the same best-epoch partitions and metrics."""
    import knowledge.partitioned_eval as evaluation
    from knowledge.stages.embed import EmbedParams, embed

    n, r = 30, 3
    split = ["valid" if i % 10 == 0 else "test" if i % 10 == 1 else "train" for i in range(200)]
    kg = kg_of(_random(n, r, 200), n, r, split)   # test_stage_with_partitions_on_a_memory_state's
    params = EmbedParams(model="distmult", dim=8, epochs=3, eval_every=1, patience=0, lr=0.1,
                         optimizer="rowwise_adagrad", partitions=3, corruption="bernoulli")
    straight = _ctx(tmp_path / "straight", kg, _uri())
    want = embed(straight, params)
    assert want["weights"] == "best validation" and want["best_epoch"] < 3, want  # not the last epoch
    real, calls = evaluation.snapshot, []

    def dies(src: str, dst: str, names: list[str], marker: dict) -> None:
        calls.append(marker["epoch"])
        if len(calls) == 1:
            s, d = PartitionStore(src), PartitionStore(dst)
            d.fs.pipe_file(d.path(names[0]), s.fs.cat_file(s.path(names[0])))
            raise RuntimeError("killed inside the snapshot")
        real(src, dst, names, marker)

    monkeypatch.setattr(evaluation, "snapshot", dies)
    ctx = _ctx(tmp_path / "killed", kg, _uri())
    with pytest.raises(RuntimeError, match="inside the snapshot"):
        embed(ctx, params)
    got = embed(ctx, params)
    assert calls[:2] == [1, 1]
    assert {k: v for k, v in got.items() if k != "train_loop_s"} == \
        {k: v for k, v in want.items() if k != "train_loop_s"}
    for p in range(3):
        a = PartitionStore(str(ctx.out / "partitions")).load(part_file(p))
        b = PartitionStore(str(straight.out / "partitions")).load(part_file(p))
        assert all(torch.equal(a[k], b[k]) for k in a), p


def test_too_many_bucket_files_for_the_open_file_limit_is_one_clear_error(tmp_path: Path) -> None:
    """write_buckets keeps its P^2 bucket files open together: in a process allowed 64 open files,
    12 partitions (144 files) fail with a ValueError saying so and what to change, and leave no
    temporary file behind."""
    import subprocess
    import sys

    kg_dir = tmp_path / "kg"
    kg_dir.mkdir()
    kg_of(_random(60, 2, 300), 60, 2).save(kg_dir)
    code = (
        "import resource, sys\n"
        "from knowledge.kg import KnowledgeGraph\n"
        "from knowledge.partitioned import Partitioning, write_buckets\n"
        f"parts = Partitioning.by_hash(KnowledgeGraph.load({str(kg_dir)!r}).entity_ids(), 12)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "try:\n"
        f"    write_buckets({str(kg_dir)!r}, {str(tmp_path / 'buckets')!r}, parts)\n"
        "except ValueError as e:\n"
        "    sys.stdout.write(str(e))\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "12 partitions write 144 bucket files at once" in out and "ulimit -n" in out, out
    assert not list((tmp_path / "buckets").glob("*.tmp-*"))
