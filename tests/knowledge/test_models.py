"""KGE model I/O: every model (and TransE with L2-normalised entities) survives save -> load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knowledge.models import build_model, load_model, model_spec, save_model

CASES = [("transe", {"p_norm": 1.0}), ("transe", {"p_norm": 1.0, "entity_norm": 2.0}),
         ("distmult", {}), ("complex", {}), ("rotate", {"margin": 9.0})]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}{k}" for n, k in CASES])
def test_save_load_roundtrip(tmp_path: Path, name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, 12, 3, 8, **kwargs).eval()
    save_model(tmp_path, model)
    again = load_model(tmp_path)
    assert type(again) is type(model) and model_spec(again) == model_spec(model)
    h, r, t = torch.randint(12, (20,)), torch.randint(3, (20,)), torch.randint(12, (20,))
    with torch.no_grad():
        torch.testing.assert_close(again(h, r, t), model(h, r, t), atol=0, rtol=0)
    assert not list(tmp_path.glob("*.pt"))  # JSON + safetensors only, no pickle


def test_entity_norm_changes_transe() -> None:
    torch.manual_seed(0)
    a = build_model("transe", 12, 3, 8, p_norm=1.0)
    torch.manual_seed(0)
    b = build_model("transe", 12, 3, 8, p_norm=1.0, entity_norm=2.0)
    h, r, t = torch.arange(12), torch.zeros(12, dtype=torch.long), torch.arange(12).flip(0)
    with torch.no_grad():
        assert not torch.allclose(a(h, r, t), b(h, r, t))
    with pytest.raises(ValueError, match="unknown KGE model 'transh'"):
        build_model("transh", 12, 3, 8)
