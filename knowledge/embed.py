"""KG embedding training: stele's own vectorised loop over PyG's KGE models, run by Ray Train.

Per step of a batch of ``B`` positive triples:

* **Negatives.** ``k`` unfiltered corruptions per positive (sLCWA, as PyKEEN and the papers), each
  a uniform random entity in place of the head or the tail: the side by a fair coin (``uniform``) or,
  with ``bernoulli`` (Wang et al. 2014, TransH), the head with probability ``tph_r / (tph_r + hpt_r)``
  (tails per head, heads per tail), which corrupts the "many" side of 1-N / N-1 relations less often
  and so yields fewer false negatives.
* **One forward pass** over the ``B (1 + k)`` triples (DDP needs one forward per backward), scores
  ``s = f(h, r, t)`` (higher is better). A model with ``scores_corruptions`` (stele's TransE) builds
  each corruption from its positive's parts (:func:`knowledge.models._corruption_distance`).
* **Loss**, the one each family is known to train well with:
  - ``margin`` (TransE; Bordes et al. 2013): ``mean(max(0, gamma - s_pos + s_neg))``;
  - ``bce`` (DistMult, ComplEx; Trouillon et al. 2016): binary cross-entropy with logits, positives
    labelled 1 and negatives 0, averaged over the ``B (1 + k)`` scores;
  - ``self_adversarial`` (RotatE; Sun et al. 2019): ``-log sigma(s_pos) - sum_i p_i log sigma(-s_neg_i)``
    with ``p = softmax(alpha * s_neg)`` treated as constant, on ``s = gamma - d``: PyG's RotatE
    score already is ``gamma - d(h o r, t)``; other models get ``gamma`` added (:func:`score_shift`),
    as PyKEEN's NSSA loss does.
* **Regulariser** (``regularization`` > 0): Trouillon et al. 2016's L2 penalty on the embeddings a
  batch uses, as PyKEEN's ``LpRegularizer(normalize=True)`` (its ComplEx default, weight 0.01):
  :func:`lp_regularization`.

The job each worker receives (:class:`EmbedJob`) holds the graph artifact's URI and scalars, never
triples, so what travels inside the Ray Train config stays the same size whatever the graph's. Each
worker reads what it needs from that URI once, at start (:func:`knowledge.kg.read_triples`): the
training triples, and on rank 0, which alone evaluates, also the validation triples and every split
(the ranking's filter); the Bernoulli corruption probabilities are computed there from the training
triples.

An epoch is one :class:`~pipeline.train.TrainSession` step, each worker on a disjoint shard of a
seeded permutation of the training triples; every ``eval_every`` epochs rank 0 computes the filtered
validation MRR, and ``patience`` evaluations without improvement stop the run with the best weights.
With the dense optimisers (``adam``, ``adagrad``) DDP all-reduces every table's dense gradient at
every step, ``(num_entities + num_relations) * dim * 4`` bytes per worker, and the optimiser walks
every row of every table: fine up to a few million parameters on CPU (BENCHMARKS.md, "DDP cost of KG
embeddings").

**Sparse row updates** (``sparse_adam``, ``rowwise_adagrad``): the model is built with row-sparse
gradients (:func:`knowledge.models.build_model` ``sparse=True``): a step reads the rows its batch
looks up (``U <= B (2 + k)`` entity rows), each table's gradient is a sparse COO tensor over those
rows, and the optimiser (:class:`~knowledge.optim.SparseAdam`, :class:`~knowledge.optim.RowAdagrad`)
updates only them; TransE's projection re-projects only them. A step's cost then follows the batch,
not the table (``bench/kge_scale.py``). With several workers, DDP sends those gradients through its
sparse all-reduce (``nn.Embedding(sparse=True)`` parameters; on gloo every rank all-gathers every
rank's ``(indices, rows)`` and sums them in rank order), so what travels is ``O(U d)`` per worker
and every rank applies the same summed gradient to the same table: the tables stay identical.
Weight decay with a sparse optimiser decays only the rows a step updates (lazily, as the
regulariser does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .kg import read_triples
from .models import corruption_triples
from .optim import RowAdagrad, SparseAdam

DEFAULT_LOSS = {"transe": "margin", "distmult": "bce", "complex": "bce", "rotate": "self_adversarial"}
#: optimisers over row-sparse gradients (only the rows a batch touches are read and updated)
SPARSE_OPTIMIZERS = ("sparse_adam", "rowwise_adagrad")
OPTIMIZERS = ("adam", "adagrad") + SPARSE_OPTIMIZERS


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimiser ``name`` (:data:`OPTIMIZERS`) over ``params``: torch's dense ``Adam`` /
    ``Adagrad``, or :class:`SparseAdam` / :class:`RowAdagrad` (:data:`SPARSE_OPTIMIZERS`), which
    need a model built with ``sparse=True``."""
    classes = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad,
               "sparse_adam": SparseAdam, "rowwise_adagrad": RowAdagrad}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(classes)}")
    return classes[name](params, lr=lr, weight_decay=weight_decay)


def bernoulli_head_prob(train: np.ndarray, num_relations: int) -> torch.Tensor:
    """``P(corrupt head | r) = tph / (tph + hpt)`` per relation (Wang et al. 2014)."""
    probs = torch.full((num_relations,), 0.5)
    if len(train) == 0:
        return probs
    h, r, t = (torch.as_tensor(train[:, i]) for i in range(3))
    for rel in torch.unique(r).tolist():
        m = r == rel
        hr, tr = h[m], t[m]
        tph = m.sum().item() / torch.unique(hr).numel()  # average tails per head
        hpt = m.sum().item() / torch.unique(tr).numel()  # average heads per tail
        probs[rel] = tph / (tph + hpt)
    return probs


def draw_corruptions(pos: torch.Tensor, k: int, num_entities: int,
                     head_prob: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` corruptions of each of ``B`` positives ``(B, 3)``: ``(entities, new_head)``, both
    ``(B, k)``, a uniformly random entity and whether it replaces the head (probability
    ``head_prob[r]``, else 1/2) or the tail (:func:`knowledge.models.corruption_triples`)."""
    b, device = len(pos), pos.device
    p = head_prob[pos[:, 1]].unsqueeze(1) if head_prob is not None else 0.5
    new_head = torch.rand(b, k, device=device) < p
    return torch.randint(num_entities, (b, k), device=device), new_head


def corrupt(pos: torch.Tensor, k: int, num_entities: int,
            head_prob: torch.Tensor | None) -> torch.Tensor:
    """``(B, 3)`` positives -> ``(B * k, 3)`` negatives, row ``i * k + j`` corrupting positive ``i``."""
    return corruption_triples(pos, *draw_corruptions(pos, k, num_entities, head_prob))


def kge_loss(kind: str, pos: torch.Tensor, neg: torch.Tensor, margin: float,
             temperature: float) -> torch.Tensor:
    """``pos`` (B,), ``neg`` (B, k) scores (higher = more plausible) -> scalar loss (see module doc)."""
    if kind == "margin":
        return F.relu(margin - pos.unsqueeze(1) + neg).mean()
    if kind == "bce":
        logits = torch.cat([pos, neg.flatten()])
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg.flatten())])
        return F.binary_cross_entropy_with_logits(logits, labels)
    if kind == "self_adversarial":
        weights = torch.softmax(temperature * neg, dim=1).detach()  # (B, k)
        pos_loss = -F.logsigmoid(pos).mean()
        neg_loss = -(weights * F.logsigmoid(-neg)).sum(dim=1).mean()
        return (pos_loss + neg_loss) / 2
    raise ValueError(f"unknown loss {kind!r}")


def init_embeddings(model: torch.nn.Module, kind: str) -> None:
    """Initial embeddings: ``default`` leaves the PyG model's own (Xavier for DistMult and ComplEx,
    uniform for TransE and RotatE); ``normal`` draws every real number of every table from a standard
    normal, for ComplEx the real and the imaginary part alike (so ``|x_i|^2`` averages 2): what
    Trouillon et al. (2016)'s code does (``randn`` for both parts) and what PyKEEN's ComplEx does
    (``normal_`` on the real view of its complex tables). The choice matters for ComplEx: from
    the other starts its MRR lands far from PyKEEN's, from this one close to it (BENCHMARKS.md,
    "KG embedding training", Tables S6 and S7)."""
    if kind == "default":
        return
    if kind != "normal":
        raise ValueError(f"unknown initialisation {kind!r}; known: default, normal")
    with torch.no_grad():
        for emb in model.modules():
            if isinstance(emb, torch.nn.Embedding):
                emb.weight.normal_(0.0, 1.0)
    if hasattr(model, "apply_constraints"):  # TransE with projected entities: back on the sphere
        model.apply_constraints()


def lp_regularization(model: torch.nn.Module, pos: torch.Tensor, neg: torch.Tensor,
                      p: float = 2.0) -> torch.Tensor:
    """``sum over (pos, neg) and over (h, r, t) of mean_rows ||x||_p / E||z||_p``: PyKEEN's
    ``LpRegularizer(p, normalize=True)`` term for the rows a batch of positives ``pos`` (B, 3) and
    negatives ``neg`` (B k, 3) looks up, ``z`` a standard normal vector of the embedding's size (its
    expected norm makes the weight independent of ``dim``). A row's vector is all of its tables
    (ComplEx: real and imaginary parts, so ``||x||_2`` is the complex vector's norm)."""
    import math

    m = getattr(model, "module", model)  # DDP-wrapped
    ent = [getattr(m, n).weight for n in ("node_emb", "node_emb_im") if hasattr(m, n)]
    rel = [getattr(m, n).weight for n in ("rel_emb", "rel_emb_im") if hasattr(m, n)]
    d = m.hidden_channels
    expected = (2 ** (p / 2) * math.gamma((p + 1) / 2) / math.sqrt(math.pi) * d) ** (1 / p)
    # a model with row-sparse gradients (sparse optimisers) looks its rows up as nn.Embedding(sparse)
    # does, so the penalty's gradient is row-sparse too
    sparse = m.node_emb.sparse

    def norms(tables: list[torch.Tensor], idx: torch.Tensor | None = None) -> torch.Tensor:
        rows = [w if idx is None else F.embedding(idx, w, sparse=True) if sparse
                else w.index_select(0, idx) for w in tables]
        return sum(x.abs().pow(p).sum(-1) for x in rows) ** (1 / p)

    def term(tables: list[torch.Tensor], cols: tuple[int, ...]) -> torch.Tensor:
        lookups = [batch[:, c] for batch in (pos, neg) for c in cols]
        if len(tables[0]) <= len(pos) and not sparse:
            # a table no larger than the batch (small graphs): its norms once, weighted by how
            # often each row is looked up (a dozen autograd ops instead of a gather per lookup)
            weights = sum(torch.bincount(i, minlength=len(tables[0])).to(tables[0].dtype) / i.numel()
                          for i in lookups)
            return weights @ norms(tables)
        return sum(norms(tables, i).mean() for i in lookups)

    return (term(ent, (0, 2)) + term(rel, (1,))) / expected


def score_shift(model: str, loss: str, margin: float) -> float:
    """What to add to the model's scores before the loss. The self-adversarial loss works on
    ``gamma - d(h, r, t)`` (Sun et al. 2019; PyKEEN's NSSA adds its margin to any score): PyG's
    RotatE already returns that, a distance model such as TransE returns ``-d``, so gamma is added."""
    return margin if loss == "self_adversarial" and model != "rotate" else 0.0


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: torch.Tensor,
                order: torch.Tensor, *, batch_size: int, negatives: int, num_entities: int,
                head_prob: torch.Tensor | None, loss: str, margin: float, temperature: float,
                shift: float = 0.0, regularization: float = 0.0,
                regularization_p: float = 2.0) -> float:
    """One pass over ``train[order]`` ((n, 3) triples, on the model's device) in batches of
    ``batch_size`` positives, each with ``negatives`` corruptions; one optimiser step per batch,
    on the loss plus ``regularization`` x :func:`lp_regularization`. Returns the mean batch loss
    (regulariser included). A model with row-sparse gradients (``sparse=True``, for the sparse
    optimisers) has them coalesced before the step, and its constraint re-applied to the rows the
    step updated only."""
    model.train()
    inner = getattr(model, "module", model)  # DDP-wrapped
    # a constrained model (TransE with projected entities) is projected after every step
    constrain = getattr(inner, "apply_constraints", None)
    sparse = inner.node_emb.sparse
    params = [q for q in inner.parameters() if q.requires_grad] if sparse else []
    # a model that scores a batch of corruptions itself (TransE: from per-positive parts) gets them
    # as drawn, others the triples they stand for
    fused = getattr(inner, "scores_corruptions", False)
    total = torch.zeros((), device=train.device)
    batches = 0
    for start in range(0, len(order), batch_size):
        pos = train[order[start:start + batch_size]]
        drawn = draw_corruptions(pos, negatives, num_entities, head_prob)
        neg = None if fused and not regularization else corruption_triples(pos, *drawn)
        if fused:
            scores = model(pos[:, 0], pos[:, 1], pos[:, 2], corruptions=drawn)
        else:
            batch = torch.cat([pos, neg])
            scores = model(batch[:, 0], batch[:, 1], batch[:, 2])
        scores = scores + shift
        value = kge_loss(loss, scores[: len(pos)], scores[len(pos):].view(len(pos), negatives),
                         margin, temperature)
        if regularization:
            value = value + regularization * lp_regularization(model, pos, neg, regularization_p)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if sparse:
            # Coalesced once here (sorted distinct rows, duplicates summed), so the optimiser's
            # own coalesce is free and the constraint knows which entity rows moved.
            for q in params:
                if q.grad is not None and q.grad.is_sparse:
                    q.grad = q.grad.coalesce()
        optimizer.step()
        if constrain is not None and not sparse:
            constrain()
        elif constrain is not None and inner.node_emb.weight.grad is not None:
            constrain(inner.node_emb.weight.grad._indices()[0])  # the rows this step moved
        total += value.detach()  # summed on the device: no host sync per step on a GPU
        batches += 1
    return total.item() / max(batches, 1)


@dataclass(frozen=True)
class EmbedJob:
    """What each worker of :func:`train_loop_per_worker` needs, built once by ``knowledge.embed``:
    settings and the graph's location, no data (workers read the triples from ``kg_uri``)."""

    model: str                       # transe | distmult | complex | rotate
    dim: int
    model_kwargs: dict[str, Any]     # build_model's model-specific arguments
    init: str                        # default | normal (:func:`init_embeddings`)
    kg_uri: str                      # the knowledge.ingest artifact: local folder or fsspec URI
    num_entities: int
    num_relations: int
    num_train: int                   # triples of each split, as the stage counted them
    num_valid: int
    corruption: str                  # uniform | bernoulli
    loss: str                        # margin | bce | self_adversarial
    margin: float
    adversarial_temperature: float
    negatives: int
    batch_size: int
    optimizer: str                   # adam | adagrad | sparse_adam | rowwise_adagrad
    lr: float
    weight_decay: float
    regularization: float
    regularization_p: float
    epochs: int
    eval_every: int
    eval_batch_size: int
    patience: int
    seed: int
    threads_per_worker: int


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: one epoch per session step (see the module docstring); its settings are
    ``config["job"]``, an :class:`EmbedJob`."""
    from pipeline.train import TrainSession

    from .evaluate import rank_metrics
    from .models import build_model

    job: EmbedJob = config["job"]
    torch.set_num_threads(job.threads_per_worker)
    torch.manual_seed(job.seed)  # the same initial weights on every rank
    # the sparse optimisers need row-sparse gradients; the initial weights are the same either way
    sparse = job.optimizer in SPARSE_OPTIMIZERS
    model = build_model(job.model, job.num_entities, job.num_relations, job.dim,
                        **job.model_kwargs, **({"sparse": True} if sparse else {}))
    init_embeddings(model, job.init)
    optimizer = make_optimizer(job.optimizer, model.parameters(), job.lr, job.weight_decay)
    session = TrainSession(model, optimizer, None, config)
    rank, world = session.rank, session.world_size

    # Only rank 0 ranks the validation triples, so only it reads them and the filter (every split).
    train_np, *ranked = read_triples(job.kg_uri, "train", *(("valid", None) if rank == 0 else ()))
    # Every rank must take the same number of steps (DDP) and rank 0's evaluations must line up
    # with the others' broadcasts: both follow from the counts the stage made, so a graph that
    # changed since would hang or mis-train the run instead of failing it.
    counts = (len(train_np), len(ranked[0]) if ranked else job.num_valid)
    if counts != (job.num_train, job.num_valid):
        raise RuntimeError(f"the graph at {job.kg_uri} changed since knowledge.embed counted it: "
                           f"{counts[0]} training and {counts[1]} validation triples, expected "
                           f"{job.num_train} and {job.num_valid}")
    # Everything a step touches lives where the model does: prepare_model put it on the worker's
    # GPU when Ray Train runs with use_gpu.
    device = session.device
    train = torch.as_tensor(train_np, dtype=torch.long, device=device)
    valid, known = [torch.as_tensor(a, dtype=torch.long, device=device) for a in ranked] or [None, None]
    head_prob = bernoulli_head_prob(train_np, job.num_relations).to(device) \
        if job.corruption == "bernoulli" else None
    n_shard = len(train) // world  # equal shards: DDP needs the same number of steps everywhere
    bsz, k = job.batch_size, job.negatives
    shift = score_shift(job.model, job.loss, job.margin)
    state = session.data_state
    state.setdefault("best_mrr", -1.0)
    state.setdefault("bad_evals", 0)

    for epoch in session.steps():
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(job.seed * 1_000_003 + epoch)
        shard = torch.randperm(len(train), generator=g)[: n_shard * world].view(n_shard, world)[:, rank]
        loss = train_epoch(session.model, optimizer, train, shard.to(device), batch_size=bsz,
                           negatives=k, num_entities=job.num_entities, head_prob=head_prob,
                           loss=job.loss, margin=job.margin,
                           temperature=job.adversarial_temperature, shift=shift,
                           regularization=job.regularization,
                           regularization_p=job.regularization_p)
        metrics: dict[str, float] = {"loss": loss, "epoch_s": time.perf_counter() - t0}  # training only

        if job.eval_every and (epoch % job.eval_every == 0 or epoch == job.epochs) and job.num_valid:
            decision = torch.zeros(2, device=device)  # (valid MRR, stop?): rank 0 decides for all
            if rank == 0:
                model.eval()
                res = rank_metrics(model, valid, known, job.num_entities,
                                   batch_size=job.eval_batch_size, num_relations=job.num_relations)
                mrr = res["filtered"]["both"]["mrr"]
                if mrr > state["best_mrr"]:
                    state["best_mrr"], state["best_epoch"], state["bad_evals"] = mrr, epoch, 0
                    session.extra.update({f"best.{n}": p.detach().clone()
                                          for n, p in model.state_dict().items()})
                else:
                    state["bad_evals"] += 1
                stop = job.patience > 0 and state["bad_evals"] >= job.patience
                decision = torch.tensor([mrr, float(stop)], device=device)
                metrics["valid_hits@10"] = res["filtered"]["both"]["hits@10"]
            if world > 1:
                torch.distributed.broadcast(decision, src=0)
            metrics["valid_mrr"] = float(decision[0])
            if decision[1] > 0:
                session.stop()
        session.report(metrics)
