"""KG embedding models: PyG's ``torch_geometric.nn.kge`` classes, by name, saved without pickle.

A model is embeddings plus a scoring function (PyG's ``forward(head, rel, tail) -> score``, higher is
better); training (``knowledge.embed``) and evaluation (``knowledge.evaluate``) only use that interface
and the full-candidate scorers in ``knowledge.scoring``.

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


@functools.cache  # one class, built on first use so importing this module does not import torch
def _transe_entity_norm() -> type:
    from torch_geometric.nn.kge import TransE

    class TransEEntityNorm(TransE):
        """TransE with entity vectors normalised in their own norm, apart from the distance's:
        ``f(h, r, t) = -|| h/||h||_q + r - t/||t||_q ||_p``.

        PyG's TransE uses ``q = p``; Bordes et al. (2013) and PyKEEN constrain entities to the unit
        L2 sphere (``q = 2``) whatever the distance, and with the L1 distance the two differ in
        quality (BENCHMARKS.md: Kinships Hits@10 0.51 vs 0.84).
        """

        def __init__(self, *args: Any, entity_norm: float = 2.0, **kwargs: Any):
            self.entity_norm = entity_norm
            super().__init__(*args, **kwargs)

        def forward(self, head_index, rel_type, tail_index):  # noqa: ANN001, ANN201
            import torch.nn.functional as F

            table = self.node_emb.weight
            if len(table) <= 2 * head_index.numel():
                # A batch gathers more rows than the table has (Kinships: 104 entities, 8,704 rows
                # per step of 256 x 17 triples): normalise the table once and gather from it. The
                # same values and gradients, normalising len(table) rows instead of 2 x batch.
                ent = F.normalize(table, p=self.entity_norm, dim=-1)
                head, tail = ent[head_index], ent[tail_index]
            else:
                head = F.normalize(self.node_emb(head_index), p=self.entity_norm, dim=-1)
                tail = F.normalize(self.node_emb(tail_index), p=self.entity_norm, dim=-1)
            rel = self.rel_emb(rel_type)
            return -((head + rel) - tail).norm(p=self.p_norm, dim=-1)

    return TransEEntityNorm


def build_model(name: str, num_entities: int, num_relations: int, dim: int, **kwargs: Any):
    """``build_model("rotate", 104, 25, 128, margin=9.0)`` -> a PyG KGE module.

    ``build_model("transe", ..., entity_norm=2.0)``: TransE with L2-normalised entities whatever
    its distance norm (the paper's and PyKEEN's model); without it, PyG's own TransE."""
    classes = model_classes()
    if name not in classes:
        raise ValueError(f"unknown KGE model {name!r}; known: {', '.join(classes)}")
    cls = classes[name]
    if name == "transe" and kwargs.get("entity_norm") is not None:
        cls = _transe_entity_norm()
    else:
        kwargs.pop("entity_norm", None)
    return cls(num_nodes=num_entities, num_relations=num_relations, hidden_channels=dim, **kwargs)


def model_spec(model: Any) -> dict[str, Any]:
    """What :func:`build_model` needs to rebuild ``model``."""
    name = next(k for k, c in model_classes().items() if isinstance(model, c))
    kwargs: dict[str, Any] = {}
    for attr in ("margin", "p_norm", "entity_norm"):
        if hasattr(model, attr):
            kwargs[attr] = float(getattr(model, attr))
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
    from safetensors.torch import load_file

    path = Path(path)
    spec = json.loads((path / MODEL_JSON).read_text())
    model = build_model(spec["model"], spec["num_entities"], spec["num_relations"], spec["dim"],
                        **spec["kwargs"])
    model.load_state_dict(load_file(str(path / MODEL_WEIGHTS), device=device))
    return model.to(device).eval()
