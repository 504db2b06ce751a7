"""``stele export ARTIFACT --format pykeen|pyg``: a ``knowledge.embed`` model in PyKEEN's or PyTorch
Geometric's own parameter layout, loaded there with ``load_state_dict`` and no stele installed.

Both formats write, into one folder::

    model.safetensors       the peer model's state dict (its own keys; no pickle)
    config.json             the peer class, its constructor arguments, ``score_offset`` and stele's
                            own model spec (``knowledge.models.model_spec``)
    entity_to_id.tsv.gz     PyKEEN's label-map files (columns ``id``, ``label``; as
    relation_to_id.tsv.gz   ``TriplesFactory.to_path_binary`` writes them): the label is stele's
                            entity / relation id, ``id`` its row in the embedding tables
    README.md               the load snippet, and how the scores relate to stele's

``pyg``: the state dict of the ``torch_geometric.nn.kge`` class stele trained (stele's TransE and
RotatE are subclasses that only compute the same distance faster), scores identical. PyG's TransE
normalises the entities in its distance norm inside the score; a TransE trained with
``entity_norm: q`` keeps them on the unit q-sphere instead, which PyG's TransE expresses only when
q equals the distance norm (normalising a unit vector is the identity): other such models are
refused, and ``pykeen`` holds them exactly.

``pykeen``: ``pykeen.models.{TransE, DistMult, ComplEx, RotatE}``'s state dict. PyKEEN scores the
stored vectors as they are (its constrainers act after optimiser steps), so the tables are written
as stele scores them: TransE's entities ``n_p(e)`` for PyG's model (``e`` as stored for a projected
one), complex numbers in PyKEEN's interleaved real layout (``[re_0, im_0, re_1, ...]``,
``torch.view_as_real``), RotatE's relation phases ``theta`` as ``cos theta + i sin theta``. Scores
equal stele's up to ``score_offset``: RotatE's stele score is ``margin - ||h o r - t||`` (PyG's),
PyKEEN's ``-||h o r - t||``; the others agree as they are. Training on in PyKEEN follows PyKEEN's
model (its TransE projects entities on the unit L2 sphere after each step, as ``entity_norm: 2``).
The DistMult and ComplEx regularisers' buffers are PyKEEN's own (from its constructor), not part of
the export: load with ``strict=False`` and check that only they are missing (the README's snippet).

Both peers hold one whole table, so an artifact trained with ``partitions`` and ``assemble: false``
(partitions only) is refused in one line naming the parameter.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

from pipeline.export import ExportError, exporter
from .models import MODEL_JSON, MODEL_WEIGHTS

MAPS = ("entity_to_id", "relation_to_id")
PYKEEN_CLASSES = {"transe": "TransE", "distmult": "DistMult", "complex": "ComplEx", "rotate": "RotatE"}
PYG_CLASSES = {"transe": "TransE", "distmult": "DistMult", "complex": "ComplEx", "rotate": "RotatE"}

_READ_MAPS = '''\
import json

import pandas as pd
import torch
from safetensors.torch import load_file

folder = "path/to/this/folder"
config = json.load(open(f"{folder}/config.json"))
# label -> row; labels read as text ("NA" and digit-only ids stay strings)
maps = {}
for name in ("entity_to_id", "relation_to_id"):
    df = pd.read_csv(f"{folder}/{name}.tsv.gz", sep="\\t", dtype={"label": str}, keep_default_na=False)
    maps[name] = dict(zip(df["label"], df["id"]))
state = load_file(f"{folder}/model.safetensors")
'''

LOAD_SNIPPET = {
    "pykeen": _READ_MAPS + '''
import pykeen.models
from pykeen.triples import TriplesFactory

tf = TriplesFactory(mapped_triples=torch.empty(0, 3, dtype=torch.long), **maps)
model = getattr(pykeen.models, config["class"])(triples_factory=tf, **config["kwargs"])
missing, unexpected = model.load_state_dict(state, strict=False)
assert not unexpected and all(".regularizer." in k for k in missing), (missing, unexpected)
model.eval()
# stele's score of (h, r, t), by row index:
#   model.score_hrt(torch.tensor([[h, r, t]])).squeeze(-1) + config["score_offset"]
''',
    "pyg": _READ_MAPS + '''
import torch_geometric.nn.kge

model = getattr(torch_geometric.nn.kge, config["class"])(**config["kwargs"])
model.load_state_dict(state)
model.eval()
# stele's score of (h, r, t), by row index: model(torch.tensor([h]), torch.tensor([r]), torch.tensor([t]))
''',
}


def read_ids(artifact: Path, table: str) -> list[str]:
    """The ids of ``entities`` / ``relations``, in row (``idx``) order."""
    import pyarrow.parquet as pq

    t = pq.read_table(artifact / f"{table}.parquet", columns=["idx", "id"])
    idx, ids = t["idx"].to_pylist(), t["id"].to_pylist()
    if sorted(idx) != list(range(len(idx))):
        raise ExportError(f"{artifact}/{table}.parquet: idx is not 0..{len(idx) - 1}")
    out = [""] * len(ids)
    for i, e in zip(idx, ids):
        out[i] = e
    return out


def write_id_map(path: Path, ids: list[str]) -> None:
    """PyKEEN's label-map file: gzip TSV, header ``id<TAB>label``, one row per index (``csv``
    quoting, as pandas reads it); gzip's timestamp is zero, so equal maps give equal bytes."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["id", "label"])
    w.writerows(enumerate(ids))
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue().encode())


def _norm_arg(p: float) -> int | float:
    return int(p) if float(p).is_integer() else float(p)


def pyg_export(model: Any, spec: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], float]:
    """``(class, constructor kwargs, state dict, score offset)`` for ``torch_geometric.nn.kge``."""
    kwargs = dict(spec["kwargs"])
    q = kwargs.pop("entity_norm", None)
    if q is not None and float(q) != float(kwargs.get("p_norm", 1.0)):
        raise ExportError(
            f"this TransE keeps its entities on the unit L{_norm_arg(q)} sphere; PyG's TransE "
            f"normalises them in its distance norm (L{_norm_arg(kwargs.get('p_norm', 1.0))}) inside "
            f"the score, so no PyG model scores it as stele does: export --format pykeen instead")
    kwargs = {"num_nodes": spec["num_entities"], "num_relations": spec["num_relations"],
              "hidden_channels": spec["dim"], **kwargs}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    return PYG_CLASSES[spec["model"]], kwargs, state, 0.0


def pykeen_export(model: Any, spec: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], float]:
    """``(class, constructor kwargs, state dict, score offset)`` for ``pykeen.models``; stele's
    score = PyKEEN's + offset (see the module docstring for each model's layout)."""
    import torch
    import torch.nn.functional as F

    name, kw = spec["model"], spec["kwargs"]
    ent, rel = model.node_emb.weight.detach().float(), model.rel_emb.weight.detach().float()
    kwargs: dict[str, Any] = {"embedding_dim": spec["dim"]}
    offset = 0.0
    if name == "transe":
        p = kw.get("p_norm", 1.0)
        kwargs["scoring_fct_norm"] = _norm_arg(p)
        if "entity_norm" not in kw:  # PyG's model: entities normalised inside the score
            ent = F.normalize(ent, p=p, dim=-1)
    elif name == "complex":
        ent = torch.view_as_real(torch.complex(ent, model.node_emb_im.weight.detach().float()))
        rel = torch.view_as_real(torch.complex(rel, model.rel_emb_im.weight.detach().float()))
    elif name == "rotate":
        ent = torch.view_as_real(torch.complex(ent, model.node_emb_im.weight.detach().float()))
        rel = torch.view_as_real(torch.polar(torch.ones_like(rel), rel))  # cos + i sin
        offset = float(kw["margin"])
    state = {"entity_representations.0._embeddings.weight": ent.reshape(len(ent), -1).contiguous(),
             "relation_representations.0._embeddings.weight": rel.reshape(len(rel), -1).contiguous()}
    return PYKEEN_CLASSES[name], kwargs, state, offset


def _readme(fmt: str, cls: str, spec: dict[str, Any], offset: float) -> str:
    library = {"pykeen": "PyKEEN", "pyg": "PyTorch Geometric"}[fmt]
    module = {"pykeen": "pykeen.models", "pyg": "torch_geometric.nn.kge"}[fmt]
    score = (f"stele's score = this model's score + {offset:g} (`score_offset` in config.json)"
             if offset else "this model's scores are stele's")
    return (f"# {spec['model']} KG embeddings for {library}\n\n"
            f"Exported by `stele export --format {fmt}` from a `knowledge.embed` artifact: "
            f"`{module}.{cls}`, {spec['num_entities']} entities, {spec['num_relations']} "
            f"relations, dimension {spec['dim']}; {score}.\n\n"
            f"- `model.safetensors`: the model's state dict in {library}'s own keys\n"
            f"- `config.json`: `class`, constructor `kwargs`, `score_offset`, and stele's own model "
            f"spec (`stele_model`)\n"
            f"- `entity_to_id.tsv.gz`, `relation_to_id.tsv.gz`: PyKEEN's label-map files "
            f"(columns `id`, `label`): each entity's / relation's stele id and its row\n\n"
            f"Load it (no stele needed):\n\n```python\n{LOAD_SNIPPET[fmt]}```\n\n"
            f"{_layout(fmt, spec)}\n")


def _layout(fmt: str, spec: dict[str, Any]) -> str:
    """How the tables relate to stele's, for the README (the module docstring says why)."""
    if fmt == "pyg":
        return ("The tensors are those of the very class stele trained (stele's TransE and RotatE "
                "subclass PyG's only to compute the same distance faster).")
    complex_rows = ("PyKEEN's interleaved real layout of complex vectors: a row is "
                    "`[re_0, im_0, re_1, im_1, ...]`")
    if spec["model"] == "transe" and "entity_norm" in spec["kwargs"]:
        return ("Entity rows are stele's stored vectors, kept on the unit "
                f"L{_norm_arg(spec['kwargs']['entity_norm'])} sphere during training; PyKEEN's TransE "
                "projects on the unit L2 sphere after each optimiser step if you train on.")
    return {
        "transe": "Entity rows are the vectors stele's (PyG's) TransE scores with, each normalised in "
                  "the distance norm (that model normalises inside its score; PyKEEN scores the stored "
                  "vectors as they are). PyKEEN's TransE projects entities on the unit L2 sphere after "
                  "each optimiser step if you train on.",
        "distmult": "The tables are stele's as they are.",
        "complex": f"Both tables are in {complex_rows}.",
        "rotate": f"Both tables are in {complex_rows}; a relation row is the unit complex numbers "
                  "`cos theta + i sin theta` of stele's phases `theta`. stele's (PyG's) RotatE score is "
                  "`margin - ||h o r - t||`, PyKEEN's `-||h o r - t||`: hence `score_offset`.",
    }[spec["model"]]


@exporter("knowledge.embed", formats=("pykeen", "pyg"))
def export_embeddings(artifact: Path, fmt: str, out: Path) -> dict[str, Any]:
    """Write the ``knowledge.embed`` artifact at ``artifact`` for ``fmt`` into ``out`` (the
    files of the module docstring)."""
    from safetensors.torch import save_file

    from .models import load_model, model_spec
    from .stages.embed import not_assembled

    why = not_assembled(artifact)
    if why:
        raise ExportError(f"{why}; PyKEEN and PyG load one whole table")
    if not (artifact / MODEL_JSON).is_file() or not (artifact / MODEL_WEIGHTS).is_file():
        raise ExportError(f"{artifact}: no {MODEL_JSON} / {MODEL_WEIGHTS} (not a knowledge.embed "
                          f"artifact?)")
    model = load_model(artifact)
    spec = model_spec(model)
    cls, kwargs, state, offset = (pyg_export if fmt == "pyg" else pykeen_export)(model, spec)
    ids = {"entity_to_id": read_ids(artifact, "entities"), "relation_to_id": read_ids(artifact, "relations")}
    sizes = (len(ids["entity_to_id"]), len(ids["relation_to_id"]))
    if sizes != (spec["num_entities"], spec["num_relations"]):
        raise ExportError(f"{artifact}: the tables list {len(ids['entity_to_id'])} entities and "
                          f"{len(ids['relation_to_id'])} relations, the model has "
                          f"{spec['num_entities']} and {spec['num_relations']}")
    save_file(state, str(out / "model.safetensors"))
    for name in MAPS:
        write_id_map(out / f"{name}.tsv.gz", ids[name])
    config = {"format": fmt, "module": {"pykeen": "pykeen.models", "pyg": "torch_geometric.nn.kge"}[fmt],
              "class": cls, "kwargs": kwargs, "score_offset": offset, "stele_model": spec,
              "files": {"weights": "model.safetensors", **{n: f"{n}.tsv.gz" for n in MAPS}}}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "README.md").write_text(_readme(fmt, cls, spec, offset))
    notes = [f"{config['module']}.{cls}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"]
    if offset:
        notes.append(f"stele's score = {fmt}'s score + {offset:g} (score_offset)")
    return {"files": ["model.safetensors", "config.json", *(f"{n}.tsv.gz" for n in MAPS), "README.md"],
            "notes": notes}
