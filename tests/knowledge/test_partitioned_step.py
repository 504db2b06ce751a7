"""The bucket trainer's step (knowledge/partitioned_state.py; issue 23): the in-place row-wise
Adagrad update is the equation (and RowAdagrad's numbers); a step on the gathered rows equals the
``partitions: 1`` loop's step (knowledge.embed.train_epoch, a model with row-sparse gradients and
RowAdagrad) on the same draws, bit for bit where the lookups allow it; PyTorch-BigGraph's batched
negatives (``negative_chunk``) score exactly the triples they stand for and learn a planted graph
as the default sampling does; the option is validated and enters the run's fingerprint. Partition
files are written by a streaming safetensors writer and read into place."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from knowledge.embed import draw_corruptions, score_shift, train_epoch
from knowledge.evaluate import rank_metrics
from knowledge.models import build_model, corruption_triples
from knowledge.optim import ADAGRAD_EPS, RowAdagrad, row_adagrad_
from knowledge.partitioned import ENTITY_TABLES, RELATION_TABLES, PartitionedJob, Partitioning
from knowledge.partitioned_eval import assemble_model
from knowledge.partitioned_state import BatchLoss, chunk_scores, row_step, run_fingerprint
from tests.knowledge.test_embed import kg_of
from tests.knowledge.test_partitioned import _group_chain, _random, _saved, _train, _uri


def test_row_adagrad_update_is_the_equation_and_row_adagrads_numbers() -> None:
    """Rows 0 and 3 of a (5, 3) table with accumulators already > 0 and weight decay: each moved row
    is ``w - lr g' / (sqrt(G + mean g'^2) + eps)`` with ``g' = g + wd w`` (float64, row by row),
    the others stay bit for bit; the same bits as RowAdagrad.step on the sparse gradient, whose
    ``eps`` is the module's."""
    assert inspect.signature(RowAdagrad).parameters["eps"].default == ADAGRAD_EPS
    g = torch.Generator().manual_seed(0)
    table, acc = torch.randn(5, 3, generator=g), torch.rand(5, generator=g)
    rows, grad = torch.tensor([0, 3]), torch.randn(2, 3, generator=g)
    lr, wd = 0.3, 0.05
    want_w, want_acc = table.double().clone(), acc.double().clone()
    for i, row in enumerate(rows.tolist()):
        gi = grad[i].double() + wd * want_w[row]
        want_acc[row] += (gi ** 2).mean()
        want_w[row] -= lr * gi / (want_acc[row].sqrt() + ADAGRAD_EPS)
    ref = torch.nn.Parameter(table.clone())
    opt = RowAdagrad([ref], lr=lr, weight_decay=wd)
    opt.state[ref]["sum"] = acc.clone()
    ref.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), grad, (5, 3))
    opt.step()
    got_w, got_acc = table.clone(), acc.clone()
    row_adagrad_(got_w, got_acc, rows, table[rows], grad, lr, wd)
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_acc.double(), want_acc, rtol=1e-6, atol=1e-7)
    assert torch.equal(got_w[[1, 2, 4]], table[[1, 2, 4]]) and torch.equal(got_acc[[1, 2, 4]], acc[[1, 2, 4]])
    assert torch.equal(got_w, ref.detach()) and torch.equal(got_acc, opt.state[ref]["sum"])


CASES = {  # model, its kwargs, loss, extra job settings, bit for bit
    "transe": ("transe", {"p_norm": 1.0, "margin": 1.0}, "margin", {}, True),
    "transe-projected-wd": ("transe", {"p_norm": 1.0, "margin": 1.0, "entity_norm": 2.0}, "margin",
                            {"weight_decay": 0.01}, True),
    "transe-l2": ("transe", {"p_norm": 2.0, "margin": 1.0}, "margin", {}, True),
    "rotate": ("rotate", {"margin": 9.0}, "self_adversarial", {}, True),
    # nn.Embedding lookups: a row's repeated lookups may be summed in another order
    "distmult-reg": ("distmult", {}, "bce", {"regularization": 0.01}, False),
    "complex": ("complex", {}, "bce", {}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_step_equals_the_unpartitioned_loops_step(case: str, one_thread: None) -> None:
    """Three steps of row_step (dense gradients on the gathered rows, row_adagrad_) against three of
    knowledge.embed.train_epoch on a model built with ``sparse=True`` stepped by RowAdagrad (the
    ``partitions: 1`` path), the same initial tables and the same corruptions: the same tables,
    accumulators and losses, bit for bit for TransE and RotatE, to float rounding otherwise."""
    name, kwargs, loss, extra, exact = CASES[case]
    n, r, k = 30, 3, 4
    job = PartitionedJob(model=name, dim=8, model_kwargs=kwargs, num_entities=n, num_relations=r,
                         state_uri="", buckets_uri="", loss=loss, negatives=k, lr=0.1, **extra)
    torch.manual_seed(0)
    model = build_model(name, n, r, 8, **kwargs)
    ref = build_model(name, n, r, 8, sparse=True, **kwargs)
    ref.load_state_dict(model.state_dict())
    opt = RowAdagrad(ref.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    tables = {t: getattr(model, t).weight for t in ENTITY_TABLES + RELATION_TABLES if hasattr(model, t)}
    acc = {t: w.new_zeros(len(w)) for t, w in tables.items()}
    step = BatchLoss(model, job)
    for seed in range(3):
        pos = _random(n, r, 12, seed=seed)
        torch.manual_seed(100 + seed)
        ents, new_head = draw_corruptions(pos, k, n, None)
        got = row_step(step, acc, pos, ents, new_head)
        torch.manual_seed(100 + seed)  # train_epoch draws the same corruptions
        want = train_epoch(ref, opt, pos, torch.arange(len(pos)), batch_size=len(pos), negatives=k,
                           num_entities=n, head_prob=None, loss=loss, margin=job.margin,
                           temperature=job.adversarial_temperature,
                           shift=score_shift(name, loss, job.margin), regularization=job.regularization)
        assert got == want if exact else got == pytest.approx(want, rel=1e-5)
    for t, w in tables.items():
        ref_w = getattr(ref, t).weight
        for a, b in ((w.detach(), ref_w.detach()), (acc[t], opt.state[ref_w]["sum"])):
            if exact:
                assert torch.equal(a, b), t
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all((a > 0).any() for a in acc.values())


@pytest.mark.parametrize("case", ["transe", "transe-l2", "transe-projected-wd", "rotate", "distmult-reg",
                                  "complex"])
def test_batched_negatives_score_the_triples_they_stand_for(case: str) -> None:
    """chunk_scores on 7 positives in chunks of 3 (the last one short), 4 heads + 4 tails per
    chunk: the positives' scores are model(h, r, t), column j < 4 of positive i is the model's
    score of (ents[i // 3, j], r, t), column j >= 4 that of (h, r, ents[i // 3, j])."""
    name, kwargs, _, _, _ = CASES[case]
    n, r, k, chunk = 25, 3, 4, 3
    torch.manual_seed(1)
    model = build_model(name, n, r, 8, **kwargs)
    pos = _random(n, r, 7, seed=2)
    ents = torch.randint(n, (3, 2 * k))
    with torch.no_grad():
        got_pos, got_neg = chunk_scores(model, pos, ents, chunk)                   # (7,), (7, 8)
        per_pos = ents.repeat_interleave(chunk, 0)[:7]                             # (7, 8)
        heads = torch.arange(2 * k).lt(k).expand(7, -1)
        neg = corruption_triples(pos, per_pos, heads)                              # (56, 3)
        want_neg = model(neg[:, 0], neg[:, 1], neg[:, 2]).view(7, 2 * k)
        want_pos = model(pos[:, 0], pos[:, 1], pos[:, 2])
    assert got_neg.shape == (7, 2 * k)
    torch.testing.assert_close(got_pos, want_pos, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_neg, want_neg, rtol=1e-5, atol=1e-4)


def test_batched_negatives_learn_a_planted_graph_as_the_default_does(one_thread: None) -> None:
    """ComplEx on the planted chain of tests/knowledge/test_partitioned.py (40 epochs, batches of
    32, 8 negatives): with P = 4 and ``negative_chunk = 8`` (8 heads + 8 tails per chunk of 8
    positives) the filtered MRR on the held-out triples, mean over two seeds, is within 0.02 of
    P = 1 with per-positive negatives, and the loss falls."""
    trip = _group_chain(10, 4)
    n = 40
    split = ["test" if i % 5 == 0 else "train" for i in range(len(trip))]
    kg = kg_of(trip, n, 2, split)
    kg_uri = _saved(kg)
    test = torch.from_numpy(kg.split_array("test"))
    settings = {"model": "complex", "model_kwargs": {}, "loss": "bce", "lr": 0.1, "batch_size": 32}
    got: dict[int, list[float]] = {0: [], 8: []}
    for seed in (0, 1):
        for p, chunk in ((1, 0), (4, 8)):
            job, parts, hist = _train(kg_uri, kg.entity_ids(), p, 40, _uri(), seed=seed,
                                      negative_chunk=chunk, **settings)
            assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], hist
            model = assemble_model(job, parts).eval()
            got[chunk].append(rank_metrics(model, test, trip, n)["filtered"]["both"]["mrr"])
    mean = {c: float(np.mean(v)) for c, v in got.items()}
    assert mean[8] > 0.9 and abs(mean[8] - mean[0]) < 0.02, got


def test_negative_chunk_is_checked_and_enters_the_fingerprint() -> None:
    """A negative chunk < 0, or one with Bernoulli corruption (one side per negative), is refused
    in one line naming the setting; a run with another chunk has another fingerprint (its state is
    refused), and the default leaves the fingerprint as it was before the setting existed."""
    import hashlib
    import json

    from knowledge.partitioned_state import partitioning_fingerprint

    base = {"model": "transe", "dim": 8, "model_kwargs": {}, "num_entities": 10, "num_relations": 2,
            "state_uri": "", "buckets_uri": ""}
    with pytest.raises(ValueError, match="negative_chunk"):
        PartitionedJob(**base, negative_chunk=-1)
    with pytest.raises(ValueError, match="negative_chunk"):
        PartitionedJob(**base, negative_chunk=4, head_prob=(0.5, 0.5))
    parts = Partitioning.by_hash([f"e{i}" for i in range(10)], 2)
    job = PartitionedJob(**base)
    chunked = dataclasses.replace(job, negative_chunk=4)
    assert run_fingerprint(job, parts, 1) != run_fingerprint(chunked, parts, 1)
    before = {k: v for k, v in dataclasses.asdict(job).items()
              if k not in ("state_uri", "buckets_uri", "threads", "negative_chunk")}
    key = json.dumps({"job": before, "parts": partitioning_fingerprint(parts), "workers": 1},
                     sort_keys=True, default=list)
    assert run_fingerprint(job, parts, 1) == hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def test_streamed_partition_files_are_safetensors_and_read_into_place(tmp_path) -> None:  # noqa: ANN001
    """PartitionStore.save streams the format itself: safetensors reads the file back (every
    dtype here, an empty tensor, the metadata), its header is padded to 8 bytes and every tensor
    starts at a multiple of its element size. read_into fills
    views into a larger table with the stored values, and refuses another shape or dtype, a
    non-contiguous target and a truncated file, naming the file and the tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from knowledge.partitioned import PartitionStore

    store = PartitionStore(str(tmp_path))
    tensors = {"node_emb": torch.randn(5, 3), "node_emb.adagrad": torch.rand(5),
               "ids": torch.arange(4), "mask": torch.tensor([True, False]),
               "half": torch.randn(2, 2).to(torch.bfloat16), "none": torch.zeros(0, 3)}
    store.save("p.safetensors", tensors, metadata={"progress": '{"epoch": 1}'})
    back = load_file(str(tmp_path / "p.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert f.metadata() == {"progress": '{"epoch": 1}'}
    assert int.from_bytes((tmp_path / "p.safetensors").read_bytes()[:8], "little") % 8 == 0
    header = store.header("p.safetensors")
    assert header["node_emb"]["shape"] == [5, 3]
    assert all(header[k]["data_offsets"][0] % v.element_size() == 0 for k, v in tensors.items())

    table, acc = torch.full((9, 3), -1.0), torch.full((9,), -1.0)
    store.read_into("p.safetensors", {"node_emb": table[2:7], "node_emb.adagrad": acc[2:7]})
    assert torch.equal(table[2:7], tensors["node_emb"]) and torch.equal(acc[2:7], tensors["node_emb.adagrad"])
    assert (table[:2] == -1).all() and (table[7:] == -1).all() and (acc[7:] == -1).all()
    with pytest.raises(ValueError, match=r"p.safetensors: node_emb is \('F32', \[5, 3\]\), expected"):
        store.read_into("p.safetensors", {"node_emb": torch.empty(4, 3)})
    with pytest.raises(ValueError, match="contiguous"):
        store.read_into("p.safetensors", {"node_emb": torch.empty(3, 5).T})
    data = (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    # written widest first: ids (I64) at bytes 0..32, node_emb 32..92, ... of 122; 82 are left
    with pytest.raises(ValueError, match="cut.safetensors: node_emb is cut short"):
        store.read_into("cut.safetensors", {k: torch.empty_like(v) for k, v in tensors.items()})


def test_the_stage_takes_negative_chunk_where_batched_negatives_apply():
    """``knowledge.embed``'s ``negative_chunk``: out of the parameters at 0 (artifact keys
    unchanged), refused at one partition and with Bernoulli corruption (one line each)."""
    from pydantic import ValidationError

    from knowledge.stages.embed import EmbedParams

    assert "negative_chunk" not in EmbedParams(partitions=4).model_dump(mode="json")
    assert EmbedParams(partitions=4, negative_chunk=50).model_dump(mode="json")["negative_chunk"] == 50
    for bad in ({"partitions": 1}, {"partitions": 4, "corruption": "bernoulli"}):
        with pytest.raises(ValidationError, match="negative_chunk needs partitions > 1 and corruption"):
            EmbedParams(negative_chunk=50, **bad)
