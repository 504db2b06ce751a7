"""KG embedding models: PyG's ``torch_geometric.nn.kge`` classes, by name, saved without pickle.

A model is embeddings plus a scoring function (PyG's ``forward(head, rel, tail) -> score``, higher is
better); training (``knowledge.embed``) and evaluation (``knowledge.evaluate``) only use that interface
(plus an optional ``apply_constraints()`` after each optimiser step) and the full-candidate scorers
in ``knowledge.scoring``. TransE and RotatE are PyG's classes with their distance computed by a
``torch.autograd.Function`` with a hand-written backward (the same values and gradients; a CPU
training step, memory-bound on these element-wise passes, takes a fraction of the time of PyG's
forward under autograd: ``bench/kge_step.py``, BENCHMARKS.md). TransE also scores a
training batch of positives and their corruptions from per-positive parts
(:func:`_corruption_distance`, ``forward(..., corruptions=)``).

Row-sparse gradients (``build_model(..., sparse=True)``, PyG's ``sparse`` flag on every
``nn.Embedding``): a training step then reads only the rows its batch looks up and gives each table
a sparse COO gradient over those rows, so its cost follows the batch, not the table, with the row-wise
optimisers of :mod:`knowledge.embed`. DistMult and ComplEx get that from PyG's forward itself
(``nn.Embedding(sparse=True)`` lookups). TransE and RotatE gather the batch's distinct rows first
(:func:`_batch_rows`) and run the same fused distances on those ``(U, d)`` rows, whose dense gradient
autograd's embedding backward turns into the table's sparse one.

An embedding artifact holds ``model.json`` (``{"model": name, "kwargs": {...}}``, enough to rebuild
the module) and ``model.safetensors`` (its state dict).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"


def model_classes() -> dict[str, type]:
    from torch_geometric.nn.kge import ComplEx, DistMult, RotatE, TransE

    return {"transe": TransE, "distmult": DistMult, "complex": ComplEx, "rotate": RotatE}


# Chunks of a fused distance on CPU: about 2 MB of float32 per (chunk, d) buffer, rebuilt in the
# backward; a large step (PyKEEN's benchmarking configuration, 20,480 rows x 256 dims) runs several
# times faster in chunks than over whole (n, d) buffers, which fall out of the cache. A batch of at
# most 4 MB (the default 256 x 17 rows of 128 dims) is one chunk and keeps its rows for the
# backward: rebuilding them there made training slower (BENCHMARKS.md, "PyKEEN's benchmarking
# configuration" and "Figures moved out of docstrings").
CPU_CHUNK_FLOATS = 1 << 19
CPU_WHOLE_FLOATS = 1 << 20


def _chunks(n: int, d: int, device: Any) -> list[slice]:
    """Row slices of a fused distance: cache-sized chunks of a large batch on CPU, else one slice
    (an accelerator's memory bandwidth makes the whole buffer cheap and every extra launch costly)."""
    if device.type != "cpu" or n * d <= CPU_WHOLE_FLOATS:
        return [slice(0, n)]
    rows = max(1, CPU_CHUNK_FLOATS // max(d, 1))
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


@functools.cache  # built on first use so importing this module does not import torch
def _translation_distance() -> type:
    import torch
    from torch.autograd.function import once_differentiable

    def rows(head, rel, tail, h, r, t):  # noqa: ANN001, ANN202
        x = head.index_select(0, h)                                                # (c, d)
        x += rel.index_select(0, r)
        return x.sub_(tail.index_select(0, t))

    class TranslationDistance(torch.autograd.Function):
        """``-|| H[h] + W[r] - T[t] ||_p`` for p = 1 or 2, with a hand-written backward.

        The same values and gradients as autograd over ``(H[h] + W[r] - T[t]).norm(p, -1)``, in
        cache-sized chunks of rows (:func:`_chunks`): the backward takes each chunk's
        ``x = H[h] + W[r] - T[t]`` (kept from the forward when the batch is one chunk, rebuilt
        otherwise) and scatters its gradient ``-g * sign(x)`` (p = 1) or ``-g * x / ||x||`` (p = 2)
        into each table with ``index_add_``. On CPU a TransE step is memory-bound on these rows
        (PyKEEN's benchmarking configuration: 20,480 x 256 per step, 21 MB per buffer); autograd's
        chain allocates and walks whole ``(n, d)`` buffers about a dozen times, a 2 MB chunk stays
        in the cache. ``H`` and ``T`` may be the same tensor.
        """

        @staticmethod
        def forward(ctx, head, rel, tail, h, r, t, p):  # noqa: ANN001, ANN205
            chunks = _chunks(len(h), head.shape[1], head.device)
            keep = len(chunks) == 1  # one chunk: keep its rows for the backward, else rebuild them
            dist = head.new_empty(len(h))
            for sl in chunks:
                x = rows(head, rel, tail, h[sl], r[sl], t[sl])
                # abs().sum, not vector_norm(x, 1): the latter is much slower on CPU, allocation
                # included (BENCHMARKS.md, "Figures moved out of docstrings")
                dist[sl] = ((x.abs() if keep else x.abs_()).sum(-1) if p == 1
                            else torch.linalg.vector_norm(x, 2, -1))
            ctx.save_for_backward(head, rel, tail, dist, h, r, t, *([x] if keep else []))
            ctx.p = p
            return -dist

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            head, rel, tail, dist, h, r, t, *kept = ctx.saved_tensors
            need = ctx.needs_input_grad
            g_head, g_rel, g_tail = (torch.zeros_like(w) if need[i] else None
                                     for i, w in enumerate((head, rel, tail)))
            for sl in _chunks(len(h), head.shape[1], head.device):
                # a rebuilt chunk is spent in place; kept rows are left intact (retain_graph)
                x = kept[0].clone() if kept else rows(head, rel, tail, h[sl], r[sl], t[sl])
                if ctx.p == 1:
                    gx = x.sign_().mul_(grad[sl].neg().unsqueeze(1))                   # (c, d)
                else:
                    gx = x.mul_((grad[sl].neg() / dist[sl].clamp_min(1e-12)).unsqueeze(1))
                if g_head is not None:
                    g_head.index_add_(0, h[sl], gx)
                if g_rel is not None:
                    g_rel.index_add_(0, r[sl], gx)
                if g_tail is not None:
                    g_tail.index_add_(0, t[sl], gx, alpha=-1)
            return g_head, g_rel, g_tail, None, None, None, None

    return TranslationDistance


def _batch_rows(tables: list[Any], *indices: Any) -> tuple[list[Any], list[Any]]:
    """The rows of each ``(n, d)`` table in ``tables`` that ``indices`` (any shapes, one index space)
    look up, each row once: ``([(U, d) per table], [each index tensor renumbered into 0..U-1])``.

    The rows come through ``F.embedding(..., sparse=True)``, so the gradient a table receives is a
    sparse COO tensor of its shape with the ``U`` distinct rows as its indices (``U`` rows, not
    one per lookup), and whatever runs on the rows (a fused distance, a normalisation) allocates ``(U, d)``
    buffers instead of ``(n, d)`` ones. ``torch.unique`` sorts the ``L`` lookups, ``O(L log L)``
    whatever ``n`` (a dense gradient is ``O(n d)``).
    """
    import torch
    import torch.nn.functional as F

    flat = torch.cat([i.reshape(-1) for i in indices])
    uniq, inv = torch.unique(flat, return_inverse=True)
    rows = [F.embedding(uniq, w, sparse=True) for w in tables]                   # (U, d) each
    out, at = [], 0
    for i in indices:
        out.append(inv[at:at + i.numel()].view(i.shape))
        at += i.numel()
    return rows, out


def corruption_triples(pos: Any, entities: Any, new_head: Any) -> Any:
    """The ``(B k, 3)`` triples that ``k`` corruptions of each of ``B`` positives stand for: row
    ``i k + j`` is positive ``i`` (``pos`` (B, 3)) with its head (``new_head[i, j]``) or else its
    tail replaced by ``entities[i, j]`` (both (B, k))."""
    import torch

    k = entities.shape[1]
    neg = pos.repeat_interleave(k, dim=0)
    e, head = entities.reshape(-1), new_head.reshape(-1)
    neg[:, 0] = torch.where(head, e, neg[:, 0])
    neg[:, 2] = torch.where(head, neg[:, 2], e)
    return neg


@functools.cache
def _corruption_distance() -> type:
    import torch
    from torch.autograd.function import once_differentiable

    class CorruptionDistance(torch.autograd.Function):
        """``-|| E[h] + W[r] - E[t] ||_1`` of ``B`` positive triples and of ``k`` corruptions of each
        (:func:`corruption_triples`; output row ``B + i k + j`` is positive ``i``'s corruption
        ``j``), with a hand-written backward.

        A corruption keeps its positive's relation and one of its entities, so its row is a part
        of the positive plus or minus one entity ``e``: a new tail gives ``hr_i - E[e]`` with
        ``hr = E[h] + W[r]``, a new head ``rt_i + E[e]`` with ``rt = W[r] - E[t]`` (the positive
        itself is ``hr_i - E[t_i]``). ``hr`` and ``rt`` are ``2 B`` rows computed once; each of the
        ``B (1 + k)`` rows then takes two gathers (its part, its entity) where
        :func:`_translation_distance` takes three, and its gradient two ``index_add_`` where that
        takes three. The backward needs only ``sign(x)`` of each row ``x``, kept instead of
        rebuilding ``x`` from the tables: as int8 (a quarter of ``x``'s bytes) when a large batch
        goes in cache-sized chunks, in place as floats when the batch is one chunk. Entity gradients
        collect in a ``(2 |E|, d)`` buffer, rows added with ``+`` in the first half and ``-`` in the
        second, so no row is multiplied by its sign. Fewer gathers and scatters make its
        forward+backward faster than :func:`_translation_distance`'s on the same triples
        (``bench/kge_step.py``; BENCHMARKS.md, "PyKEEN's benchmarking configuration").
        """

        @staticmethod
        def forward(ctx, ent, rel, pos, entities, new_head):  # noqa: ANN001, ANN205
            b, n_ent = len(pos), len(ent)
            h, r, t = pos.unbind(1)
            w = rel.index_select(0, r)
            parts = torch.cat([ent.index_select(0, h).add_(w), w.sub_(ent.index_select(0, t))])
            rows = torch.arange(b, device=pos.device)
            part = torch.cat([rows, (rows.unsqueeze(1) + b * new_head).reshape(-1)])  # hr_i / rt_i
            other = torch.cat([t, entities.reshape(-1)])
            plus = torch.cat([new_head.new_zeros(b), new_head.reshape(-1)])  # rt_i + E[e] rows
            sign = plus.to(ent.dtype).mul_(2).sub_(1).unsqueeze(1)
            n, d = len(part), ent.shape[1]
            chunks = _chunks(n, d, ent.device)
            if len(chunks) == 1:  # a small batch (or a GPU): its signs in place, as floats
                x = parts.index_select(0, part).addcmul_(ent.index_select(0, other), sign)
                dist, signs = x.abs().sum(-1), x.sign_()
            else:  # chunks of a large batch: int8 signs, a quarter of the bytes to keep
                dist = ent.new_empty(n)
                signs = torch.empty(n, d, dtype=torch.int8, device=ent.device)
                for sl in chunks:
                    x = parts.index_select(0, part[sl]).addcmul_(ent.index_select(0, other[sl]),
                                                                 sign[sl])
                    signs[sl] = x.sign()
                    dist[sl] = x.abs_().sum(-1)
            ctx.save_for_backward(pos, part, other + n_ent * ~plus, signs)
            ctx.sizes = (n_ent, len(rel))
            return -dist

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            pos, part, other, signs = ctx.saved_tensors
            (n_ent, n_rel), (b, d) = ctx.sizes, (len(pos), signs.shape[1])
            g_parts = grad.new_zeros(2 * b, d)
            g_ent = grad.new_zeros(2 * n_ent, d)          # + rows, then - rows (see the class doc)
            for sl in _chunks(len(part), d, grad.device):
                g = grad[sl].neg().unsqueeze(1)
                # dL/dx; float signs are not spent (a second backward with retain_graph)
                gx = signs[sl] * g if signs.dtype == grad.dtype else signs[sl].to(grad.dtype).mul_(g)
                g_parts.index_add_(0, part[sl], gx)
                g_ent.index_add_(0, other[sl], gx)
            g_ent = g_ent[:n_ent].sub_(g_ent[n_ent:])
            h, r, t = pos.unbind(1)
            g_hr, g_rt = g_parts[:b], g_parts[b:]
            g_ent.index_add_(0, h, g_hr)
            g_ent.index_add_(0, t, g_rt, alpha=-1)
            g_rel = grad.new_zeros(n_rel, d).index_add_(0, r, g_hr.add_(g_rt))
            return g_ent, g_rel, None, None, None

    return CorruptionDistance


@functools.cache  # one class, built on first use so importing this module does not import torch
def _transe() -> type:
    from torch_geometric.nn.kge import TransE

    class SteleTransE(TransE):
        """TransE, ``f(h, r, t) = -|| e_h + w_r - e_t ||_p``, scored through
        :func:`_translation_distance` (p = 1, 2), in one of two models of the entity vectors:

        * ``entity_norm=None``: PyG's model, entities normalised in the distance's norm inside the
          score (``e = n_p(x)``, differentiable);
        * ``entity_norm=q``: Bordes et al. (2013) and PyKEEN: the stored vectors are kept on the
          unit ``q``-sphere by projecting them after every optimiser step
          (:meth:`apply_constraints`, which ``knowledge.embed`` calls), the score uses them as
          they are. With the L1 distance and ``q = 2`` this is PyKEEN's default TransE.

        Normalising inside the score instead (``n_q`` with its Jacobian) is a different
        optimisation, and on UMLS a worse one: projection matches PyKEEN's MRR, in-score
        normalisation falls short of it (BENCHMARKS.md, "KG embedding training", Table 3).
        """

        def __init__(self, *args: Any, entity_norm: float | None = None, **kwargs: Any):
            # set before super().__init__, whose reset_parameters projects
            self.entity_norm = None if entity_norm is None else float(entity_norm)
            super().__init__(*args, **kwargs)

        @property
        def project(self) -> bool:
            """Whether the entities are projected (``entity_norm`` given) rather than normalised
            inside the score (PyG's model)."""
            return self.entity_norm is not None

        def reset_parameters(self) -> None:
            super().reset_parameters()
            self.apply_constraints()

        def apply_constraints(self, rows: Any = None) -> None:
            """Project the entity vectors onto the unit ``entity_norm``-sphere (projected mode):
            all of them, or only ``rows`` (distinct indices: the rows a sparse step updated; the
            others are on the sphere already and stay bit for bit as they are)."""
            if self.project:
                import torch
                import torch.nn.functional as F

                with torch.no_grad():
                    w = self.node_emb.weight
                    if rows is None:
                        w.copy_(F.normalize(w, p=self.entity_norm, dim=-1))
                    else:
                        w.index_copy_(0, rows, F.normalize(w.index_select(0, rows),
                                                           p=self.entity_norm, dim=-1))

        #: ``forward`` takes ``corruptions=`` (``knowledge.embed.train_epoch`` checks this)
        scores_corruptions = True

        def forward(self, head_index, rel_type, tail_index, corruptions=None):  # noqa: ANN001, ANN201
            """Scores of the triples; with ``corruptions=(entities, new_head)`` ((B, k) each, see
            :func:`corruption_triples`) also of ``k`` corruptions of each: ``B (1 + k)`` scores,
            triple ``i``'s corruption ``j`` at ``B + i k + j``. (Through ``forward``, so that DDP
            sees the step.)"""
            import torch
            import torch.nn.functional as F

            if self.node_emb.sparse:
                return self._forward_rows(head_index, rel_type, tail_index, corruptions)
            table, p = self.node_emb.weight, self.p_norm
            if corruptions is not None:
                pos = torch.stack([head_index, rel_type, tail_index], 1)
                n_rows = len(pos) * (1 + corruptions[0].shape[1])
                if p == 1.0 and (self.project or len(table) <= 2 * n_rows):
                    ent = table if self.project else F.normalize(table, p=p, dim=-1)
                    return _corruption_distance().apply(ent, self.rel_emb.weight, pos, *corruptions)
                batch = torch.cat([pos, corruption_triples(pos, *corruptions)])
                return self(batch[:, 0], batch[:, 1], batch[:, 2])
            if self.project:  # unit vectors already: score them as stored
                head = tail = table
                h, t = head_index, tail_index
            elif len(table) <= 2 * head_index.numel():
                # A batch gathers more rows than the table has (Kinships: 104 entities, 8,704 rows
                # per step of 256 x 17 triples): normalise the table once and gather from it. The
                # same values and gradients, normalising len(table) rows instead of 2 x batch.
                head = tail = F.normalize(table, p=p, dim=-1)
                h, t = head_index, tail_index
            else:
                head = F.normalize(self.node_emb(head_index), p=p, dim=-1)
                tail = F.normalize(self.node_emb(tail_index), p=p, dim=-1)
                h = t = torch.arange(len(head_index), device=head.device)
            if p in (1.0, 2.0):
                return _translation_distance().apply(head, self.rel_emb.weight, tail, h,
                                                      rel_type, t, int(p))
            return -((head[h] + self.rel_emb(rel_type)) - tail[t]).norm(p=p, dim=-1)

        def _forward_rows(self, head_index, rel_type, tail_index, corruptions):  # noqa: ANN001, ANN202
            """``forward`` with row-sparse gradients: the same scores from the ``U`` distinct
            entity rows and ``V`` distinct relation rows the batch looks up (:func:`_batch_rows`),
            each table's gradient a sparse tensor over those rows. PyG's model normalises just
            those ``U`` rows (as the dense path does for a large table)."""
            import torch
            import torch.nn.functional as F

            p = self.p_norm
            ent_idx = (head_index, tail_index) + ((corruptions[0],) if corruptions is not None else ())
            (ent,), (h, t, *e) = _batch_rows([self.node_emb.weight], *ent_idx)         # (U, d)
            (rel,), (r,) = _batch_rows([self.rel_emb.weight], rel_type)                # (V, d)
            if not self.project:
                ent = F.normalize(ent, p=p, dim=-1)
            if corruptions is not None:
                pos = torch.stack([h, r, t], 1)
                if p == 1.0:
                    return _corruption_distance().apply(ent, rel, pos, e[0], corruptions[1])
                batch = torch.cat([pos, corruption_triples(pos, e[0], corruptions[1])])
                h, r, t = batch.unbind(1)
            if p in (1.0, 2.0):
                return _translation_distance().apply(ent, rel, ent, h, r, t, int(p))
            return -((ent[h] + rel[r]) - ent[t]).norm(p=p, dim=-1)

    return SteleTransE


@functools.cache
def _rotation_distance() -> type:
    import torch
    from torch.autograd.function import once_differentiable

    def rows(re_table, im_table, cos_table, sin_table, h, r, t):  # noqa: ANN001, ANN202
        hr, hi = re_table.index_select(0, h), im_table.index_select(0, h)          # (c, d)
        c, s = cos_table.index_select(0, r), sin_table.index_select(0, r)
        re = c * hr
        re.addcmul_(s, hi, value=-1).sub_(re_table.index_select(0, t))
        im = c * hi
        im.addcmul_(s, hr).sub_(im_table.index_select(0, t))
        return hr, hi, c, s, re, im

    class RotationDistance(torch.autograd.Function):
        """``||(c + i s) * (h_re + i h_im) - (t_re + i t_im)||_2`` over all ``2d`` coordinates (PyG's
        RotatE distance), ``c, s = cos, sin`` of the relation's phases, with a hand-written backward.

        With ``z = re + i im`` the rotated head minus the tail and ``u = g / ||z||``: the head gets
        ``conj(c + i s) * u z``, the tail ``-u z``, and the relation's ``(cos, sin)`` tables get
        ``(Re, Im)`` of ``conj(h) * u z`` (autograd takes them on to the phases). The same values
        and gradients as autograd over PyG's forward, in cache-sized chunks of rows (kept or
        rebuilt for the backward as in :func:`_translation_distance`).
        """

        @staticmethod
        def forward(ctx, re_table, im_table, cos_table, sin_table, h, r, t):  # noqa: ANN001, ANN205
            tables = (re_table, im_table, cos_table, sin_table)
            chunks = _chunks(len(h), re_table.shape[1], re_table.device)
            dist = re_table.new_empty(len(h))
            for sl in chunks:
                buffers = rows(*tables, h[sl], r[sl], t[sl])
                re, im = buffers[-2:]
                dist[sl] = (re.square().sum(-1) + im.square().sum(-1)).sqrt_()
            # one chunk: keep its buffers for the backward, else rebuild them there
            ctx.save_for_backward(*tables, dist, h, r, t, *(buffers if len(chunks) == 1 else ()))
            return dist

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            *tables, dist, h, r, t = ctx.saved_tensors[:8]
            kept = ctx.saved_tensors[8:]
            g_re, g_im, g_cos, g_sin = (torch.zeros_like(w) for w in tables)
            for sl in _chunks(len(h), tables[0].shape[1], tables[0].device):
                hr, hi, c, s, re, im = kept or rows(*tables, h[sl], r[sl], t[sl])
                u = (grad[sl] / dist[sl].clamp_min(1e-12)).unsqueeze(1)               # (c, 1)
                gre, gim = re.mul_(u), im.mul_(u)           # dL/d re, dL/d im (buffers are spent)
                g_re.index_add_(0, h[sl], (c * gre).addcmul_(s, gim))              # Re(conj(w) g)
                g_re.index_add_(0, t[sl], gre, alpha=-1)
                g_im.index_add_(0, h[sl], (c * gim).addcmul_(s, gre, value=-1))    # Im(conj(w) g)
                g_im.index_add_(0, t[sl], gim, alpha=-1)
                g_cos.index_add_(0, r[sl], (hr * gre).addcmul_(hi, gim))
                g_sin.index_add_(0, r[sl], (hr * gim).addcmul_(hi, gre, value=-1))
            return g_re, g_im, g_cos, g_sin, None, None, None

    return RotationDistance


@functools.cache
def _rotate() -> type:
    import torch
    from torch_geometric.nn.kge import RotatE

    class SteleRotatE(RotatE):
        """PyG's RotatE (``margin - ||h o r - t||``), scored through :func:`_rotation_distance`."""

        def forward(self, head_index, rel_type, tail_index):  # noqa: ANN001, ANN201
            re, im, theta = self.node_emb.weight, self.node_emb_im.weight, self.rel_emb.weight
            if self.node_emb.sparse:  # row-sparse gradients: only the rows the batch looks up
                (re, im), (head_index, tail_index) = _batch_rows([re, im], head_index, tail_index)
                (theta,), (rel_type,) = _batch_rows([theta], rel_type)
            dist = _rotation_distance().apply(re, im, torch.cos(theta), torch.sin(theta),
                                              head_index, rel_type, tail_index)
            return self.margin - dist

    return SteleRotatE


def build_model(name: str, num_entities: int, num_relations: int, dim: int, **kwargs: Any):
    """``build_model("rotate", 104, 25, 128, margin=9.0)`` -> a PyG KGE module.

    ``sparse=True`` (PyG's flag): every table gets row-sparse gradients (see the module doc), for
    :mod:`knowledge.embed`'s sparse optimisers; a training setting, not part of the saved model.

    ``build_model("transe", ..., entity_norm=2.0)``: TransE with entities projected onto the unit
    L2 sphere after every step, whatever its distance norm (the paper's and PyKEEN's model);
    without it, PyG's TransE model (entities normalised in the distance's norm inside the score).
    TransE and RotatE are PyG's models scored through stele's fused distances."""
    classes = model_classes()
    if name not in classes:
        raise ValueError(f"unknown KGE model {name!r}; known: {', '.join(classes)}")
    if name != "transe":
        kwargs.pop("entity_norm", None)
    cls = {"transe": _transe, "rotate": _rotate}.get(name, lambda: classes[name])()
    return cls(num_nodes=num_entities, num_relations=num_relations, hidden_channels=dim, **kwargs)


def model_spec(model: Any) -> dict[str, Any]:
    """What :func:`build_model` needs to rebuild ``model``."""
    name = next(k for k, c in model_classes().items() if isinstance(model, c))
    kwargs: dict[str, Any] = {}
    for attr in ("margin", "p_norm"):
        if hasattr(model, attr):
            kwargs[attr] = float(getattr(model, attr))
    if getattr(model, "project", False):  # TransE with projected entities
        kwargs["entity_norm"] = float(model.entity_norm)
    return {"model": name, "num_entities": model.num_nodes, "num_relations": model.num_relations,
            "dim": model.hidden_channels, "kwargs": kwargs}


def save_model(path: str | Path, model: Any) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    (path / MODEL_JSON).write_text(json.dumps(model_spec(model), indent=1))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / MODEL_WEIGHTS))


def load_model(path: str | Path, device: str = "cpu"):
    """Rebuild a model saved by :func:`save_model` (no pickle: JSON + safetensors)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    spec = json.loads((path / MODEL_JSON).read_text())
    model = build_model(spec["model"], spec["num_entities"], spec["num_relations"], spec["dim"],
                        **spec["kwargs"])
    model.load_state_dict(load_file(str(path / MODEL_WEIGHTS), device=device))
    if getattr(model, "project", False):
        # An artifact written before TransE projected its entities (they were normalised inside
        # the score) is projected here, so it scores as it was trained; an artifact of the
        # projected model is left bit-exact.
        norms = torch.linalg.vector_norm(model.node_emb.weight.detach(), model.entity_norm, dim=-1)
        if (norms - 1).abs().max() > 1e-4:
            model.apply_constraints()
    return model.to(device).eval()
