"""KG embedding models: PyG's ``torch_geometric.nn.kge`` classes, by name, saved without pickle.

A model is embeddings plus a scoring function (PyG's ``forward(head, rel, tail) -> score``, higher is
better); training (``knowledge.embed``) and evaluation (``knowledge.evaluate``) only use that interface
and the full-candidate scorers in ``knowledge.scoring``.

An embedding artifact holds ``model.json`` (``{"model": name, "kwargs": {...}}``, enough to rebuild
the module) and ``model.safetensors`` (its state dict).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"


def model_classes() -> dict[str, type]:
    from torch_geometric.nn.kge import ComplEx, DistMult, RotatE, TransE

    return {"transe": TransE, "distmult": DistMult, "complex": ComplEx, "rotate": RotatE}


def build_model(name: str, num_entities: int, num_relations: int, dim: int, **kwargs: Any):
    """``build_model("rotate", 104, 25, 128, margin=9.0)`` -> a PyG KGE module."""
    classes = model_classes()
    if name not in classes:
        raise ValueError(f"unknown KGE model {name!r}; known: {', '.join(classes)}")
    return classes[name](num_nodes=num_entities, num_relations=num_relations,
                         hidden_channels=dim, **kwargs)


def model_spec(model: Any) -> dict[str, Any]:
    """What :func:`build_model` needs to rebuild ``model``."""
    name = next(k for k, c in model_classes().items() if type(model) is c)
    kwargs: dict[str, Any] = {}
    for attr in ("margin", "p_norm"):
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
