"""Partitioned training and sharded evaluation of KG embeddings (knowledge/partitioned.py,
knowledge/partitioned_eval.py; issue 23 part 2, PyTorch-BigGraph's scheme): partitions by a
seeded hash, stable and balanced; buckets hold every training triple once; partition files are
replaced atomically; rounds of buckets are disjoint; sharded filtered evaluation equals
knowledge.evaluate's exactly; P = 4 learns a planted graph as well as P = 1; the Ray path equals
the in-process one; the knowledge.embed stage with ``partitions`` on a memory:// state and on Ray
workers. Killed runs and their resumption: tests/knowledge/test_partitioned_resume.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from knowledge.embed import bernoulli_head_prob
from knowledge.evaluate import rank_metrics
from knowledge.kg import KnowledgeGraph
from knowledge.models import build_model
from knowledge.partitioned import (ACC, ENTITY_TABLES, RELATION_TABLES, RELATIONS, PartitionedJob,
                                   Partitioning, PartitionStore, inside_out_order, part_file,
                                   read_bucket, rounds, write_buckets)
from knowledge.partitioned_eval import assemble_model, bernoulli_from_buckets, sharded_rank_metrics
from knowledge.partitioned_state import train_bucket, train_partitioned
from tests.knowledge.test_embed import kg_of

ROOT = Path(__file__).resolve().parents[2]


def _uri() -> str:
    return f"memory://partitioned-test/{uuid.uuid4().hex}"


def _saved(kg: KnowledgeGraph) -> str:
    uri = _uri()
    PartitionStore(uri)  # makes the folder
    kg.save(uri)
    return uri


def _random(n: int, r: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(n, (m,), generator=g), torch.randint(r, (m,), generator=g),
                        torch.randint(n, (m,), generator=g)], 1)


# ------------------------------------------------------------------------------- partitions
def test_partitions_are_balanced_stable_across_processes_and_orders() -> None:
    """1,003 ids into 7 partitions: sizes 143 or 144; the same partition for each id in another
    process with another PYTHONHASHSEED (nothing salted), and for the ids listed in another order;
    another seed gives another assignment; ``offset`` is each entity's row in ``members``."""
    ids = [f"wd:Q{i}" for i in range(1003)]
    parts = Partitioning.by_hash(ids, 7, seed=3)
    assert sorted(set(parts.sizes.tolist())) == [143, 144]
    for p in range(7):
        members = parts.members(p)
        assert (parts.partition[members] == p).all()
        assert (parts.offset[members] == np.arange(len(members))).all()

    code = ("import sys; from knowledge.partitioned import Partitioning; "
            "ids = [f'wd:Q{i}' for i in range(1003)]; "
            "sys.stdout.write(','.join(map(str, Partitioning.by_hash(ids, 7, seed=3).partition)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert out == ",".join(map(str, parts.partition))

    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = Partitioning.by_hash([ids[i] for i in perm], 7, seed=3)
    assert (shuffled.partition == parts.partition[perm]).all()
    assert (Partitioning.by_hash(ids, 7, seed=4).partition != parts.partition).mean() > 0.5
    with pytest.raises(ValueError, match="5 partitions for 3 entities"):
        Partitioning.by_hash(ids[:3], 5)


def test_buckets_hold_every_training_triple_exactly_once() -> None:
    """A random graph (duplicates included; a fifth valid or test) into 3 x 3 buckets: the buckets'
    triples, mapped back to global indices, are the training triples (as a multiset), each bucket's
    heads in partition i and tails in j; valid and test triples are in none; the Bernoulli
    probabilities computed bucket by bucket equal knowledge.embed's on the whole array."""
    n, r = 40, 3
    trip = torch.cat([_random(n, r, 300), _random(n, r, 20)[:5].repeat(2, 1)])
    split = ["valid" if i % 10 == 0 else "test" if i % 10 == 1 else "train" for i in range(len(trip))]
    kg = kg_of(trip, n, r, split)
    parts = Partitioning.by_hash(kg.entity_ids(), 3)
    out = _uri()
    counts = write_buckets(_saved(kg), out, parts)
    train = kg.split_array("train")
    assert counts.sum() == len(train)
    got = []
    for i in range(3):
        for j in range(3):
            b = read_bucket(out, i, j).numpy()
            assert len(b) == counts[i, j]
            h, t = parts.members(i)[b[:, 0]], parts.members(j)[b[:, 2]]
            assert (parts.partition[h] == i).all() and (parts.partition[t] == j).all()
            got.append(np.stack([h, b[:, 1], t], 1))
    got = np.concatenate(got)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, train.tolist()))
    assert not [f for f in PartitionStore(out).fs.ls(PartitionStore(out).root, detail=False) if ".tmp-" in f]
    torch.testing.assert_close(bernoulli_from_buckets(out, 3, r), bernoulli_head_prob(train, r))


def test_partition_write_back_is_atomic(tmp_path: Path) -> None:
    """A write that dies after its temporary file is complete but before the rename, and a stray
    half-written temporary file of a killed process, leave the last complete partition readable
    (local folder and memory:// alike); the failed write removes its own temporary file."""
    for uri in (str(tmp_path / "state"), _uri()):
        store = PartitionStore(uri)
        first = {"node_emb": torch.arange(6.0).view(3, 2), "node_emb" + ACC: torch.zeros(3)}
        store.save(part_file(0), first)
        with store.fs.open(store.path(part_file(0)) + ".tmp-deadbeef", "wb") as f:
            f.write(b"\x00\x01half a safetensors header")  # what a killed writer leaves

        def die(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise KeyboardInterrupt("killed between the write and the rename")

        real_mv, store.fs.mv = store.fs.mv, die
        with pytest.raises(KeyboardInterrupt):
            store.save(part_file(0), {k: v + 1 for k, v in first.items()})
        store.fs.mv = real_mv
        loaded = store.load(part_file(0))
        assert all(torch.equal(loaded[k], first[k]) for k in first)
        left = [f for f in store.fs.ls(store.root, detail=False) if ".tmp-" in f]
        assert [f.rsplit("/", 1)[-1] for f in left] == [part_file(0) + ".tmp-deadbeef"]
        with pytest.raises(FileNotFoundError, match="no part-00001.safetensors"):
            store.load(part_file(1))


# ------------------------------------------------------------------------------- schedule
def test_inside_out_order_and_disjoint_rounds() -> None:
    """Every bucket once per epoch, layers by max(i, j) in order; rounds of at most W buckets that
    share no partition; in the first epoch the first round is one bucket and every later bucket
    touches a partition trained in an earlier round."""
    for p, w in ((1, 1), (4, 1), (5, 2), (6, 3)):
        order = inside_out_order(p, np.random.default_rng(p))
        assert sorted(order) == [(i, j) for i in range(p) for j in range(p)]
        assert [max(b) for b in order] == sorted(max(b) for b in order)
        trained: set[int] = set()
        schedule = rounds(order, w, trained)
        assert sorted(b for rnd in schedule for b in rnd) == sorted(order)
        assert len(schedule[0]) == 1
        seen: set[int] = set(schedule[0][0])
        for rnd in schedule:
            assert len(rnd) <= w
            used = [q for b in rnd for q in set(b)]
            assert len(used) == len(set(used)), rnd
            if rnd is not schedule[0]:
                assert all(set(b) & seen for b in rnd), (rnd, seen)
            seen |= set(used)
        if w > 1:  # later epochs (no first-epoch rule) do run buckets side by side
            assert max(len(rnd) for rnd in rounds(order, w)) > 1
    job = _job(_uri(), 10, 1)
    with pytest.raises(ValueError, match="memory:// location lives in one process"):
        train_partitioned(job, Partitioning.by_hash([str(i) for i in range(10)], 2), np.ones((2, 2)), 1,
                          workers=2)


# ------------------------------------------------------------------------------- evaluation
MODELS = {"transe": {"p_norm": 1.0}, "transe-l2": {"p_norm": 2.0}, "distmult": {},
          "complex": {}, "rotate": {"margin": 9.0}}


def _store_model(job: PartitionedJob, model: torch.nn.Module, parts: Partitioning) -> None:
    """A whole model's tables written as partition files (zero accumulators)."""
    store = PartitionStore(job.state_uri)
    for p in range(parts.num_partitions):
        idx = torch.from_numpy(parts.members(p))
        state = {}
        for name in ENTITY_TABLES:
            if hasattr(model, name):
                state[name] = getattr(model, name).weight.detach()[idx]
                state[name + ACC] = torch.zeros(len(idx))
        store.save(part_file(p), state)
    store.save(RELATIONS, {name: getattr(model, name).weight.detach()
                           for name in RELATION_TABLES if hasattr(model, name)})


@pytest.mark.parametrize("key", list(MODELS))
def test_sharded_evaluation_equals_the_unpartitioned_evaluator(key: str, one_thread: None) -> None:
    """Every number and every rank of knowledge.evaluate.rank_metrics, raw and filtered, per side,
    per relation, the Hits@k curve, with ties: entities 0..9 are copies of entities 10..19 (whose
    partitions differ), so their candidates tie with each other across partitions."""
    name = key.split("-")[0]
    n, r = 61, 4
    torch.manual_seed(0)
    model = build_model(name, n, r, 8, **MODELS[key]).eval()
    with torch.no_grad():
        for table in ENTITY_TABLES:
            if hasattr(model, table):
                getattr(model, table).weight[:10] = getattr(model, table).weight[10:20]
    trip = _random(n, r, 300)
    test = torch.cat([trip[:50], torch.tensor([[0, 1, 10], [10, 1, 0], [3, 2, 13]])])
    parts = Partitioning.by_hash([f"e{i}" for i in range(n)], 3)
    assert len({parts.partition[i] for i in range(20)}) == 3
    job = PartitionedJob(model=name, dim=8, model_kwargs=MODELS[key], num_entities=n,
                         num_relations=r, state_uri=_uri(), buckets_uri=_uri())
    _store_model(job, model, parts)
    want = rank_metrics(model, test, trip, n, batch_size=16, num_relations=r)
    got = sharded_rank_metrics(job, parts, test, trip, batch_size=16)
    assert want["filtered"]["both"]["count"] == 2 * len(test)
    tied = want["ranks"]["filtered_pessimistic"] > want["ranks"]["filtered_optimistic"]
    assert tied.any(), "the copied entities should tie"
    for k in ("filtered", "raw", "per_relation", "hits_at_k", "num_known", "num_triples"):
        assert got[k] == want[k], k
    for k, v in want["ranks"].items():
        np.testing.assert_array_equal(got["ranks"][k], v, err_msg=k)


# ------------------------------------------------------------------------------- training
def _grid(side: int) -> torch.Tensor:
    """Two relations on a side x side grid: (x, y) -> (x + 1, y) and (x, y) -> (x, y + 1)."""
    rows = [(x * side + y, 0, (x + 1) * side + y) for x in range(side - 1) for y in range(side)]
    rows += [(x * side + y, 1, x * side + y + 1) for x in range(side) for y in range(side - 1)]
    return torch.tensor(rows)


def _job(parts_uri: str, n: int, r: int, **kw) -> PartitionedJob:  # noqa: ANN003
    return PartitionedJob(**{"model": "transe", "dim": 16, "model_kwargs": {"p_norm": 1.0, "margin": 1.0},
                             "num_entities": n, "num_relations": r, "state_uri": f"{parts_uri}/state",
                             "buckets_uri": f"{parts_uri}/buckets", "loss": "margin", "negatives": 8,
                             "batch_size": 16, "lr": 0.3, **kw})


def _train(kg_uri: str, ids: list[str], p: int, epochs: int, root: str, workers: int = 1, seed: int = 0,
           **kw) -> tuple[PartitionedJob, Partitioning, list[dict]]:  # noqa: ANN003
    parts = Partitioning.by_hash(ids, p, seed)
    job = _job(root, len(ids), 2, seed=seed, **kw)
    counts = write_buckets(kg_uri, job.buckets_uri, parts)
    return job, parts, train_partitioned(job, parts, counts, epochs, workers=workers)


def test_a_bucket_touches_only_its_own_partitions(one_thread: None) -> None:
    """Bucket (0, 1) of three partitions rewrites partitions 0 and 1 (rows and accumulators) and
    leaves partition 2's file byte for byte as it was."""
    side = 6
    kg = kg_of(_grid(side), side * side, 2)
    parts = Partitioning.by_hash(kg.entity_ids(), 3)
    job = _job(_uri(), side * side, 2)
    counts = write_buckets(_saved(kg), job.buckets_uri, parts)
    assert counts[0, 1] > 0
    from knowledge.partitioned import init_state

    relations = init_state(job, parts.sizes.tolist())
    store = PartitionStore(job.state_uri)
    before = {p: store.fs.cat_file(store.path(part_file(p))) for p in range(3)}
    new_rel, loss, batches = train_bucket(job, (0, 1), relations, epoch=1)
    after = {p: store.fs.cat_file(store.path(part_file(p))) for p in range(3)}
    assert after[2] == before[2] and after[0] != before[0] and after[1] != before[1]
    assert batches == -(-counts[0, 1] // job.batch_size) and loss > 0
    assert (store.load(part_file(0))["node_emb" + ACC] > 0).any()
    assert not torch.equal(new_rel["rel_emb"], relations["rel_emb"])


def _group_chain(groups: int, size: int) -> torch.Tensor:
    """A planted graph: ``groups`` groups of ``size`` entities in a row; relation 0 links every
    member of group g to every member of g + 1, relation 1 to every member of g + 2."""
    rows = [(a * size + i, rel, (a + step) * size + j) for rel, step in ((0, 1), (1, 2))
            for a in range(groups - step) for i in range(size) for j in range(size)]
    return torch.tensor(rows)


@pytest.mark.parametrize("chunk", [0, 3])
def test_negatives_come_from_the_corrupted_sides_partition(chunk: int, monkeypatch: pytest.MonkeyPatch,
                                                           one_thread: None) -> None:
    """Bucket (2, 0): a corrupted head is a row of partition 2 (the model's first ``n_2`` rows), a
    corrupted tail one of partition 0 (the rows after them); both sides are drawn. Per positive
    (``negative_chunk`` 0: ``k`` each, the side by a coin) and per chunk of 3 positives (PBG's
    batched negatives: ``k`` heads then ``k`` tails per chunk, one draw per chunk, the batch of 4
    ending in a short chunk)."""
    import knowledge.partitioned_state as module

    side = 6
    kg = kg_of(_grid(side), side * side, 2)
    parts = Partitioning.by_hash(kg.entity_ids(), 3)
    job = _job(_uri(), side * side, 2, model="distmult", model_kwargs={}, loss="bce", batch_size=4,
               negative_chunk=chunk)
    write_buckets(_saved(kg), job.buckets_uri, parts)
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = module.row_step

    def spy(loss, acc, pos, ents, new_head):  # noqa: ANN001, ANN202
        k = job.negatives
        if chunk:
            assert ents.shape == (-(-len(pos) // chunk), 2 * k) and new_head is None
            new_head = torch.arange(2 * k).lt(k).expand_as(ents)   # heads, then tails
        drawn.append((ents, new_head))
        return real(loss, acc, pos, ents, new_head if not chunk else None)

    monkeypatch.setattr(module, "row_step", spy)
    relations = module.init_state(job, parts.sizes.tolist())
    train_bucket(job, (2, 0), relations, epoch=1)
    n2, n0 = parts.sizes[2], parts.sizes[0]
    ents, heads = torch.cat([d[0].flatten() for d in drawn]), torch.cat([d[1].flatten() for d in drawn])
    assert heads.any() and (~heads).any()
    assert ((ents[heads] >= 0) & (ents[heads] < n2)).all()
    assert ((ents[~heads] >= n2) & (ents[~heads] < n2 + n0)).all()
    assert len(torch.unique(ents[~heads])) > n0 // 2  # spread over partition 0, not a few rows


def test_four_partitions_learn_a_planted_graph_as_one_does(one_thread: None) -> None:
    """ComplEx (dim 16, row-wise Adagrad lr 0.1, batches of 32 with 8 negatives) on a chain of 10
    groups of 4 entities, every fifth triple held out: after the same 40 epochs the filtered MRR on
    the held-out triples with P = 4 (16 buckets, negatives from the corrupted side's partition of
    10 entities) is within 0.02 of P = 1 and of today's loop (knowledge.embed.train_epoch with
    RowAdagrad, the stage's ``partitions: 1`` path), means over two seeds; all of them infer the
    groups, which the initial tables do not."""
    from knowledge.embed import train_epoch
    from knowledge.optim import RowAdagrad

    trip = _group_chain(10, 4)
    n = 40
    split = ["test" if i % 5 == 0 else "train" for i in range(len(trip))]
    kg = kg_of(trip, n, 2, split)
    kg_uri = _saved(kg)
    train, test = torch.from_numpy(kg.split_array("train")), torch.from_numpy(kg.split_array("test"))
    settings = {"model": "complex", "model_kwargs": {}, "loss": "bce", "lr": 0.1, "batch_size": 32}

    def mrr(model: torch.nn.Module) -> float:
        return rank_metrics(model.eval(), test, trip, n)["filtered"]["both"]["mrr"]

    got: dict[str, list[float]] = {"P=1": [], "P=4": [], "today": []}
    for seed in (0, 1):
        for p in (1, 4):
            job, parts, hist = _train(kg_uri, kg.entity_ids(), p, 40, _uri(), seed=seed, **settings)
            assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], hist
            got[f"P={p}"].append(mrr(assemble_model(job, parts)))
        torch.manual_seed(seed)
        model = build_model("complex", n, 2, 16, sparse=True)
        assert mrr(model) < 0.5  # the planted groups are not in the initial tables
        opt = RowAdagrad(model.parameters(), lr=0.1)
        for _ in range(40):
            train_epoch(model.train(), opt, train, torch.randperm(len(train)), batch_size=32, negatives=8,
                        num_entities=n, head_prob=None, loss="bce", margin=1.0, temperature=1.0)
        got["today"].append(mrr(model))
    mean = {k: float(np.mean(v)) for k, v in got.items()}
    assert min(mean.values()) > 0.9, got
    assert abs(mean["P=4"] - mean["P=1"]) < 0.02, got
    assert abs(mean["P=4"] - mean["today"]) < 0.02, got


def test_ray_workers_equal_the_in_process_rounds(tmp_path: Path, ray_local: None, one_thread: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers on four partitions: each round's buckets run as Ray tasks on a local state
    folder (Ray workers are other processes; memory:// is per process) and the relations are
    averaged after the round. The same rounds run one after the other in this process give the
    same partitions and relations bit for bit: the result does not depend on where or when the
    buckets ran."""
    import knowledge.partitioned_state as module

    side = 6
    kg = kg_of(_grid(side), side * side, 2)
    kg_uri = str(tmp_path / "kg")
    Path(kg_uri).mkdir()
    kg.save(kg_uri)
    job_ray, parts, hist = _train(kg_uri, kg.entity_ids(), 4, 2, str(tmp_path / "ray"), workers=2)
    assert max(h["rounds"] for h in hist[1:]) < hist[1]["buckets"]  # some rounds ran two buckets
    local = module.run_tasks
    monkeypatch.setattr(module, "run_tasks", lambda fn, calls, workers, cpus=1.0: local(fn, calls, 1))
    job_seq, _, hist_seq = _train(kg_uri, kg.entity_ids(), 4, 2, str(tmp_path / "seq"), workers=2)
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist_seq]
    a, b = PartitionStore(job_ray.state_uri), PartitionStore(job_seq.state_uri)
    for name in [part_file(p) for p in range(4)] + [RELATIONS]:
        sa, sb = a.load(name), b.load(name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    monkeypatch.setattr(module, "run_tasks", local)
    # the sharded evaluation's partitions as Ray tasks, two at a time: the same ranks
    trip = torch.from_numpy(kg.split_array())
    ray_eval = sharded_rank_metrics(job_ray, parts, trip[:30], trip, batch_size=8, workers=2)
    here = sharded_rank_metrics(job_ray, parts, trip[:30], trip, batch_size=8)
    for k, v in here["ranks"].items():
        np.testing.assert_array_equal(ray_eval["ranks"][k], v, err_msg=k)


# ------------------------------------------------------------------------------- the stage
def _ctx(tmp: Path, kg: KnowledgeGraph, state_uri: str):  # noqa: ANN202
    from pipeline.context import StageContext
    from pipeline.registry import Resources
    from pipeline.store import Artifact

    kg_dir, out = tmp / "kg", tmp / "out"
    kg_dir.mkdir(parents=True)
    out.mkdir()
    kg.save(kg_dir)
    return StageContext(stage="emb", key="e", out=out, inputs={"kg": Artifact("k", kg_dir, {}, "")},
                        resources=Resources(), state_uri=state_uri, log=logging.getLogger("test.part"))


def test_stage_with_partitions_on_a_memory_state(tmp_path: Path, one_thread: None) -> None:
    """``knowledge.embed`` with ``partitions: 3`` (one worker, in process; its state on memory://):
    the artifact files of ``partitions: 1`` plus the partition files, the partitioning and the spec;
    the saved model is the best validation epoch's partitions assembled; the validation MRR comes
    from the sharded evaluator; every epoch's row reaches TensorBoard.
    ``partitions: 1`` stays out of the parameters (artifact keys unchanged); another optimiser is
    refused in one line."""
    from safetensors.torch import load_file

    from knowledge.models import load_model
    from knowledge.stages.embed import EmbedParams, embed
    from pipeline import StageFailed

    assert "partitions" not in EmbedParams().model_dump(mode="json")
    assert EmbedParams(partitions=3).model_dump(mode="json")["partitions"] == 3
    n, r = 30, 3
    trip = _random(n, r, 200)
    split = ["valid" if i % 10 == 0 else "test" if i % 10 == 1 else "train" for i in range(200)]
    state = _uri()
    ctx = _ctx(tmp_path, kg_of(trip, n, r, split), state)
    with pytest.raises(StageFailed, match="set optimizer: rowwise_adagrad, not adam"):
        embed(ctx, EmbedParams(partitions=3, epochs=1))
    params = EmbedParams(model="distmult", dim=8, epochs=3, eval_every=1, patience=0, lr=0.1,
                         optimizer="rowwise_adagrad", partitions=3, corruption="bernoulli")
    metrics = embed(ctx, params)
    assert metrics["epochs"] == 3 and metrics["partitions"] == 3 and metrics["buckets"] == 9
    assert metrics["best_valid_mrr"] is not None and not metrics["stopped_early"]
    emb = load_file(str(ctx.out / "embeddings.safetensors"))
    assert emb["entity"].shape == (n, 8) and emb["relation"].shape == (r, 8)
    model = load_model(ctx.out)
    names = sorted(p.name for p in (ctx.out / "partitions").iterdir())
    assert names == ["model.json", "part-00000.safetensors", "part-00001.safetensors",
                     "part-00002.safetensors", "partitioning.parquet", "relations.safetensors"]
    table = pa.parquet.read_table(ctx.out / "partitions" / "partitioning.parquet").to_pydict()
    for p in range(3):
        rows = [i for i, q in zip(table["idx"], table["partition"]) if q == p]
        part = load_file(str(ctx.out / "partitions" / part_file(p)))["node_emb"]
        offsets = [table["offset"][i] for i in rows]
        torch.testing.assert_close(model.node_emb.weight.detach()[rows], part[offsets], rtol=0, atol=0)
    hist = json.loads((ctx.out / "history.json").read_text())
    assert len(hist) == 3 and all("valid_mrr" in h for h in hist)
    # the saved weights are the best validation epoch's (as with partitions: 1), and that epoch's
    # validation (sharded) is the unpartitioned evaluator's on the saved model
    kg = KnowledgeGraph.load(tmp_path / "kg")
    res = rank_metrics(model, kg.split_array("valid"), kg.split_array(), n, num_relations=r)
    assert metrics["weights"] == "best validation" and metrics["best_epoch"] < 3  # not the last
    assert metrics["best_valid_mrr"] == max(h["valid_mrr"] for h in hist) == res["filtered"]["both"]["mrr"]
    assert (ctx.out / "training.png").exists()
    assert PartitionStore(f"{state}/partitioned/state").exists(RELATIONS)
    # streamed to TensorBoard epoch by epoch (under the memory:// state), copied into the artifact
    from tests.pipeline.test_train import read_scalars

    scalars = read_scalars(ctx.out / "tb")
    assert scalars["loss"] == pytest.approx({h["step"]: h["loss"] for h in hist})
    assert scalars["valid_mrr"] == pytest.approx({h["step"]: h["valid_mrr"] for h in hist})


def test_stage_with_partitions_on_two_ray_workers(tmp_path: Path, ray_local: None) -> None:
    """``partitions: 4`` with two workers: rounds of buckets and the validation's partitions as Ray
    tasks on a local state folder; the artifact's tables come from the partitions."""
    from safetensors.torch import load_file

    from knowledge.stages.embed import EmbedParams, embed

    n, r = 30, 3
    split = ["valid" if i % 10 == 0 else "train" for i in range(200)]
    ctx = _ctx(tmp_path, kg_of(_random(n, r, 200, seed=1), n, r, split), str(tmp_path / "state"))
    metrics = embed(ctx, EmbedParams(model="transe", dim=8, epochs=2, eval_every=1, lr=0.1,
                                     entity_norm=2.0, optimizer="rowwise_adagrad", partitions=4,
                                     scaling={"num_workers": 2}))
    assert metrics["epochs"] == 2 and metrics["num_workers"] == 2 and metrics["buckets"] == 16
    assert metrics["best_valid_mrr"] is not None
    emb = load_file(str(ctx.out / "embeddings.safetensors"))["entity"]
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(n))  # projected rows, from every partition
    assert not [f for f in (tmp_path / "state").rglob("*.tmp-*")]
