"""Full-candidate scoring for PyG's KGE models: every entity as the tail (or head) of a query at once.

Ranking-based evaluation needs, for a query ``(h, r, ?)``, the score of ``(h, r, e)`` for *every* entity
``e``. Calling ``model(h, r, t)`` once per candidate materialises a ``(b, N, d)`` tensor (this is what
``KGEModel.test`` and PyKEEN's broadcasting interactions do). All four models in
``torch_geometric.nn.kge`` instead rewrite as a *query* vector against a fixed *candidate table*:

==========  =====================================================================  ==================
model       score f(h, r, t) (PyG's ``forward``, higher is better)                 full-candidate form
==========  =====================================================================  ==================
TransE      ``-|| n(e_h) + w_r - n(e_t) ||_p``,  n(x) = x / max(||x||_p, 1e-12)    ``-cdist(q, n(E), p)``
            (``entity_norm``: projected entities, n = identity)
DistMult    ``<e_h, w_r, e_t>``                                                    ``q @ E^T``
ComplEx     ``Re <e_h, w_r, conj(e_t)>``                                           ``q @ [E_re, E_im]^T``
RotatE      ``gamma - || e_h o w_r - e_t ||_2`` (w_r = exp(i theta_r), norm over   ``gamma - cdist(q,
            the real and imaginary parts together)                                 [E_re, E_im], 2)``
==========  =====================================================================  ==================

with the queries (``o`` is the element-wise complex product, ``[a, b]`` concatenation on the last axis):

* TransE tails ``q = n(e_h) + w_r``; heads ``q = n(e_t) - w_r`` (``||n(e_h) - (n(e_t) - w_r)||``).
* DistMult tails ``q = e_h * w_r``; heads ``q = w_r * e_t``.
* ComplEx (Trouillon et al. 2016) tails ``q = [h_re r_re - h_im r_im, h_im r_re + h_re r_im]``;
  heads ``q = [r_re t_re + r_im t_im, r_re t_im - r_im t_re]`` (expand the four ``triple_dot`` terms of
  PyG's ``forward`` and collect the coefficients of the candidate's real and imaginary parts).
* RotatE (Sun et al. 2019) tails ``q = e_h o w_r``; heads ``q = e_t o conj(w_r)``, because a rotation is
  unitary: ``||e_h o w_r - e_t|| = ||e_h - e_t o conj(w_r)||``.

Memory is ``O(b N)`` for the score matrix (plus the ``O(N d)`` candidate table, built once), never
``O(b N d)``. L2 distances go through one GEMM by default; ``exact=True`` trades that speed for the
direct kernel (:class:`CandidateScorer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.registry import Registry

QueryFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class CandidateScorer:
    """A model seen as ``score(query, candidate)``: queries built per batch, candidates built once.

    ``kind="dot"``: ``score = q @ C^T``. ``kind="distance"``: ``score = offset - ||q - c||_p``.

    Precision trade-off: for ``p = 2``, ``torch.cdist`` by default uses the expansion
    ``||q||^2 + ||c||^2 - 2 q.c`` (one GEMM, several times faster on CPU than the direct kernel;
    BENCHMARKS.md, "Link-prediction evaluation at scale"), whose cancellation error is about
    ``eps * ||q||^2`` (~1e-7 here) on the squared distance. That is below the float32 noise of the
    model's own forward but can swap near-ties with a direct computation; ``exact=True`` uses the
    direct difference kernel instead.
    """

    candidates: Tensor                  # (N, k)
    tail_query: QueryFn                 # (h (b,), r (b,)) -> (b, k)
    head_query: QueryFn                 # (r (b,), t (b,)) -> (b, k)
    kind: Literal["dot", "distance"]
    p: float = 2.0
    offset: float = 0.0
    exact: bool = False

    @property
    def num_entities(self) -> int:
        return self.candidates.shape[0]

    def _score(self, q: Tensor) -> Tensor:
        if self.kind == "dot":
            return q @ self.candidates.T                                  # (b, N)
        mode = ("donot_use_mm_for_euclid_dist" if self.exact
                else "use_mm_for_euclid_dist_if_necessary")
        dist = torch.cdist(q.unsqueeze(0), self.candidates.unsqueeze(0), p=self.p,
                           compute_mode=mode).squeeze(0)                  # (b, N)
        return self.offset - dist if self.offset else -dist

    def tails(self, h: Tensor, r: Tensor) -> Tensor:
        """``(b, N)``: ``out[i, e] = f(h[i], r[i], e)``."""
        return self._score(self.tail_query(h, r))

    def heads(self, r: Tensor, t: Tensor) -> Tensor:
        """``(b, N)``: ``out[i, e] = f(e, r[i], t[i])``."""
        return self._score(self.head_query(r, t))


# Full-candidate scorers by the PyG KGE class they handle (its class name).
SCORERS: Registry[Callable[..., CandidateScorer]] = Registry(
    group="stele.kge_scorers", kind="KGE candidate scorer",
    qualname=lambda fn: f"{fn.__module__}.{fn.__qualname__}")


def kge_scorer(pyg_class: str) -> Callable[[Callable[..., CandidateScorer]], Callable[..., CandidateScorer]]:
    """Register ``fn(model, exact) -> CandidateScorer`` for the PyG KGE class named ``pyg_class``."""
    def deco(fn: Callable[..., CandidateScorer]) -> Callable[..., CandidateScorer]:
        return SCORERS.register(pyg_class, fn)
    return deco


@kge_scorer("TransE")
def _transe(model, exact: bool) -> CandidateScorer:
    p = float(model.p_norm)
    ent = model.node_emb.weight                                           # (N, d)
    if not getattr(model, "project", False):
        # PyG's TransE normalises inside the score (q = p); with projected entities (stele's
        # entity_norm) the stored vectors are scored as they are, as its forward does
        ent = F.normalize(ent, p=p, dim=-1)
    rel = model.rel_emb.weight                                            # (R, d)
    return CandidateScorer(
        candidates=ent,
        tail_query=lambda h, r: ent[h] + rel[r],
        head_query=lambda r, t: ent[t] - rel[r],
        kind="distance", p=p, exact=exact)


@kge_scorer("DistMult")
def _distmult(model, exact: bool) -> CandidateScorer:
    ent, rel = model.node_emb.weight, model.rel_emb.weight
    return CandidateScorer(
        candidates=ent,
        tail_query=lambda h, r: ent[h] * rel[r],
        head_query=lambda r, t: rel[r] * ent[t],
        kind="dot")


def _cmul(a_re: Tensor, a_im: Tensor, b_re: Tensor, b_im: Tensor) -> Tensor:
    """Complex product ``a * b`` as ``[real, imaginary]`` concatenated on the last dim."""
    return torch.cat([a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re], dim=-1)


@kge_scorer("ComplEx")
def _complex(model, exact: bool) -> CandidateScorer:
    # Re(<h, r, conj(t)>) = <h * r, t> = <conj(r) * t, h> over [re, im] vectors
    e_re, e_im = model.node_emb.weight, model.node_emb_im.weight
    r_re, r_im = model.rel_emb.weight, model.rel_emb_im.weight
    return CandidateScorer(
        candidates=torch.cat([e_re, e_im], dim=-1),                                    # (N, 2d)
        tail_query=lambda h, r: _cmul(e_re[h], e_im[h], r_re[r], r_im[r]),            # (b, 2d)
        head_query=lambda r, t: _cmul(r_re[r], -r_im[r], e_re[t], e_im[t]),           # (b, 2d)
        kind="dot")


@kge_scorer("RotatE")
def _rotate(model, exact: bool) -> CandidateScorer:
    # |h * w_r - t| = |conj(w_r) * t - h| since |w_r| = 1: rotate the head forward, or the tail back
    e_re, e_im = model.node_emb.weight, model.node_emb_im.weight
    theta = model.rel_emb.weight
    cos, sin = torch.cos(theta), torch.sin(theta)
    return CandidateScorer(
        candidates=torch.cat([e_re, e_im], dim=-1),                                    # (N, 2d)
        tail_query=lambda h, r: _cmul(cos[r], sin[r], e_re[h], e_im[h]),               # (b, 2d)
        head_query=lambda r, t: _cmul(cos[r], -sin[r], e_re[t], e_im[t]),              # (b, 2d)
        kind="distance", p=2.0, offset=float(model.margin), exact=exact)




def candidate_scorer(model, exact: bool = False) -> CandidateScorer:
    """Build the full-candidate scorer of a PyG KGE model (the candidate table is computed once here,
    so build it once per evaluation, under ``torch.no_grad()`` unless gradients are wanted)."""
    builders = SCORERS.all()
    for cls in type(model).__mro__:
        if cls.__name__ in builders and cls.__module__.startswith("torch_geometric.nn.kge"):
            return builders[cls.__name__](model, exact)
    raise TypeError(f"no full-candidate scorer for {type(model).__name__}; known: "
                    f"{', '.join(builders)}")


def score_tails(model, h: Tensor, r: Tensor, exact: bool = False) -> Tensor:
    """``(b, N)`` scores of ``(h[i], r[i], e)`` for every entity ``e``; equal to ``model(h, r, e)``."""
    return candidate_scorer(model, exact).tails(h, r)


def score_heads(model, r: Tensor, t: Tensor, exact: bool = False) -> Tensor:
    """``(b, N)`` scores of ``(e, r[i], t[i])`` for every entity ``e``; equal to ``model(e, r, t)``."""
    return candidate_scorer(model, exact).heads(r, t)
