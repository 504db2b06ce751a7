"""``stele export --format hf`` of ``fusion.pretrain`` artifacts (a tiny BERT, built here): the folder
loads with ``transformers.AutoModel`` / ``AutoTokenizer`` alone, its hidden states equal stele's
text encoder's, and encoder + extra modules give back the stele model's whole state dict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fusion.export import EXTRA_JSON, EXTRA_WEIGHTS, stele_state
from fusion.models.backbone import random_backbone
from pipeline.export import ExportError, export
from pipeline.cli import main

NUM_ENTITIES, ENTITY_DIM = 7, 8
OPTIONS = {"mlm": {}, "ernie": {"k_layers": 1}, "kbert": {"k": 2},
           "kadapter": {"adapter": "factual", "adapter_size": 16, "num_heads": 2},
           "kepler": {}, "kgbert": {}, "libert": {}, "wklm": {}}
SHARED_ENCODER = {"mlm", "kepler", "kgbert", "libert", "wklm"}  # self.encoder is the backbone
TEXTS = ["tim cook is visiting beijing now", "the dog was born in paris"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_pretrain_artifact(folder: Path, recipe: str, tokenizer) -> torch.nn.Module:  # noqa: ANN001
    """A ``fusion.pretrain`` artifact as the stage writes it (model.safetensors by safetensors'
    ``save_model``, tokenizer/, backbone_config.json, recipe.json, ERNIE's entity table and ids, a
    manifest), for a model whose every parameter was moved off its initial value; returns it."""
    from safetensors.torch import save_file, save_model

    from fusion.pretrain.loop import RECIPES

    backbone = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                               intermediate_size=64, max_position=64, seed=0)
    rec = RECIPES.get(recipe)()
    options = rec.Options.model_validate(OPTIONS[recipe])
    torch.manual_seed(1)
    table = torch.randn(NUM_ENTITIES, ENTITY_DIM)
    resources = {"max_length": 32, "entity_table": table, "labels": ["a", "b", "c"], "num_relations": 3}
    model = rec.build(backbone, resources, options).eval()
    with torch.no_grad():  # "pretrained": nothing equals the random backbone or a fresh head
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder.mkdir(parents=True)
    save_model(model, str(folder / "model.safetensors"))
    backbone.tokenizer.save_pretrained(str(folder / "tokenizer"))
    backbone.model.config.to_json_file(str(folder / "backbone_config.json"))
    (folder / "recipe.json").write_text(json.dumps({
        "recipe": recipe, "backbone": "random", "options": options.model_dump(), "max_length": 32,
        "resources_meta": {"max_length": 32, "num_relations": 3}}))
    if recipe == "ernie":
        save_file({"entity": table}, str(folder / "entity_table.safetensors"))
        (folder / "entity_ids.json").write_text(json.dumps([f"t:e{i}" for i in range(NUM_ENTITIES)]))
    (folder / "manifest.json").write_text(json.dumps({"type": "fusion.pretrain", "files": {}}))
    return model


def stele_hidden(recipe: str, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden states, as each stele model computes them on plain text."""
    with torch.no_grad():
        if recipe in SHARED_ENCODER:
            return model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if recipe == "ernie":
            return model(ids, mask).hidden  # no entity: ERNIE's w^o
        if recipe == "kbert":  # a tree without branches: ordinary positions, real tokens see each other
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            visible = mask.bool()[:, None, :] | torch.eye(ids.shape[1], dtype=torch.bool)
            return model(ids, positions, visible).hidden
        return model.head.encoder.backbone(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("recipe", list(OPTIONS))
def test_automodel_loads_the_export_and_computes_stele_s_encoder(tmp_path: Path, tokenizer,  # noqa: ANN001
                                                                  recipe: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = make_pretrain_artifact(tmp_path / "art", recipe, tokenizer)
    out = tmp_path / "hf"
    summary = export(str(tmp_path / "art"), "hf", out)
    assert summary["stage_type"] == "fusion.pretrain"
    assert {"config.json", "model.safetensors", "tokenizer.json", EXTRA_WEIGHTS, EXTRA_JSON,
            "README.md"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickle

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    enc = hf_tok(TEXTS, padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == tokenizer(TEXTS, padding=True)["input_ids"]
    hf, info = AutoModel.from_pretrained(str(out), add_pooling_layer=False, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # padded positions are nobody's output
    torch.testing.assert_close(theirs[real], stele_hidden(recipe, model, ids, mask)[real],
                               rtol=1e-5, atol=1e-5)
    # the plain call a README reader makes: a pooler is added (stele trains none), hidden states alike
    with torch.no_grad():
        plain = AutoModel.from_pretrained(str(out)).eval()(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(plain.last_hidden_state, theirs)


@pytest.mark.parametrize("recipe", list(OPTIONS))
def test_encoder_and_extra_modules_give_back_the_stele_model(tmp_path: Path, tokenizer,  # noqa: ANN001
                                                             recipe: str) -> None:
    """``stele_state`` of the export is the model's state dict, every tensor; a model built from
    other random weights and loaded with it computes what the original computes."""
    model = make_pretrain_artifact(tmp_path / "art", recipe, tokenizer)
    export(str(tmp_path / "art"), "hf", tmp_path / "hf")
    state = stele_state(tmp_path / "hf")
    want = model.state_dict()
    assert set(state) == set(want)
    for k, v in want.items():
        assert torch.equal(state[k], v), k
    info = json.loads((tmp_path / "hf" / EXTRA_JSON).read_text())
    assert "other" not in info["modules"]  # every extra tensor is described
    if recipe == "mlm":  # an encoder saved again by transformers (with the pooler it adds) goes back too
        import shutil

        from transformers import AutoModel

        AutoModel.from_pretrained(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "again"))
        for name in (EXTRA_WEIGHTS, EXTRA_JSON):
            shutil.copy(tmp_path / "hf" / name, tmp_path / "again" / name)
        again = stele_state(tmp_path / "again")
        assert set(again) == set(want) and all(torch.equal(again[k], v) for k, v in want.items())
    if recipe == "ernie":
        from safetensors.torch import load_file

        from fusion.pretrain.loop import RECIPES

        table = load_file(str(tmp_path / "hf" / EXTRA_WEIGHTS))["entity_embeddings"]
        assert json.loads((tmp_path / "hf" / "entity_ids.json").read_text())[0] == "t:e0"
        other = random_backbone(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, max_position=64, seed=5)
        rebuilt = RECIPES.get("ernie")().build(other, {"entity_table": table},
                                               RECIPES.get("ernie").Options(k_layers=1)).eval()
        rebuilt.load_state_dict(state)
        enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
        ent = torch.full_like(enc["input_ids"], -1)
        ent[0, 1], ent[1, 2] = 3, 5  # two tokens linked to entities: the entity streams run
        with torch.no_grad():
            a = model(enc["input_ids"], enc["attention_mask"], ent)
            b = rebuilt(enc["input_ids"], enc["attention_mask"], ent)
            plain = model(enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(b.hidden, a.hidden, rtol=0, atol=0)
        torch.testing.assert_close(b.entity_hidden, a.entity_hidden, rtol=0, atol=0)
        assert not torch.allclose(a.hidden, plain.hidden)  # entities do change ERNIE's output


def test_kbert_sentence_trees_run_through_the_exported_bert(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    """What the README says: soft positions as ``position_ids`` and the additive visible-matrix
    bias as ``attention_mask`` make the exported BertModel compute K-BERT."""
    from transformers import AutoModel

    from fusion.models.kbert import visible_bias

    model = make_pretrain_artifact(tmp_path / "art", "kbert", tokenizer)
    export(str(tmp_path / "art"), "hf", tmp_path / "hf")
    hf = AutoModel.from_pretrained(str(tmp_path / "hf"), add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (2, 10), generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 5, 6, 7], [0, 1, 2, 2, 3, 4, 3, 4, 5, 6]])
    visible = (torch.rand(2, 10, 10, generator=g) < 0.6) | torch.eye(10, dtype=torch.bool)
    with torch.no_grad():
        theirs = hf(input_ids=ids, position_ids=positions,
                    attention_mask=visible_bias(visible, torch.float32)).last_hidden_state
        torch.testing.assert_close(theirs, model(ids, positions, visible).hidden, rtol=1e-5, atol=1e-5)


def test_cli_and_refusals(tmp_path: Path, tokenizer, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    make_pretrain_artifact(tmp_path / "art", "ernie", tokenizer)
    out = tmp_path / "ernie-hf"
    assert main(["export", str(tmp_path / "art"), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fusion.pretrain -> hf" in printed and "BertModel" in printed
    readme = (out / "README.md").read_text()
    assert "k_layers.0." in readme and "entity_embeddings" in readme and "encoder.layer.1" in readme
    ns: dict = {}  # the README's snippet, as a reader copies it
    exec(re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)  # noqa: S102 - our own README
         .replace("path/to/this/folder", str(out)), ns)
    assert ns["hidden"].shape[-1] == 32 and not ns["model"].training
    assert main(["export", str(tmp_path / "art"), "--format", "pyg", "--out",
                 str(tmp_path / "x")]) == 2
    assert "fusion.pretrain artifacts export as hf, not 'pyg'" in capsys.readouterr().out
    # a multimodal recipe has no BERT-layout text encoder: refused before any model is built
    dual = tmp_path / "dual"
    dual.mkdir()
    (dual / "recipe.json").write_text(json.dumps({"recipe": "dual", "options": {}}))
    (dual / "manifest.json").write_text(json.dumps({"type": "fusion.pretrain"}))
    with pytest.raises(ExportError, match="recipe 'dual' has no text-encoder export.*ernie, "
                                          "kadapter, kbert, kepler, kgbert, libert, mlm, wklm"):
        export(str(dual), "hf", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.export-*"))
