"""``stele export ARTIFACT --format hf``: the text encoder of a ``fusion.pretrain`` model (recipes ``mlm``,
``ernie``, ``kbert``, ``kadapter``) as a Hugging Face folder, plus the modules BERT has no place for.

The folder::

    config.json, model.safetensors   the text encoder: ``transformers.AutoModel.from_pretrained``
                                     (the backbone's class, e.g. ``BertModel``); no pooler, since
                                     stele never trains one: load with ``add_pooling_layer=False``,
                                     or the pooler is left randomly initialised (and reported)
    tokenizer files                  the artifact's ``tokenizer/`` as it is (``AutoTokenizer``)
    extra_modules.safetensors        the rest of stele's model, keyed by stele's own parameter
                                     names (ERNIE's entity streams and heads, K-Adapter's adapters
                                     and task head, MLM heads), and ERNIE's entity table
                                     (``entity_embeddings``; rows in ``entity_ids.json``)
    extra_modules.json               what each group of those tensors is and where it plugs in,
                                     the key map (stele prefix -> encoder prefix), tied weights,
                                     the model's config
    README.md                        the same, for people

What the exported encoder computes, per recipe (README.md repeats it): ``mlm`` and ``kadapter``
(whose backbone is frozen) export the backbone as it is; ``kbert`` exports its BERT, which given a
sentence tree's soft ``position_ids`` and the additive visible-matrix ``attention_mask``
(:func:`fusion.models.kbert.visible_bias`) computes K-BERT, and plain text otherwise; ``ernie``
exports the token stream (embeddings, the T-Encoder's layers and the BERT half of each aggregator:
attention, ``W_t`` as ``intermediate.dense``, ``W'_t`` + LN as ``output``), which on text with no
entity is exactly ERNIE (an aggregator without entities is its BERT layer). Stele's modules keep
the backbone's own layer classes, so the key map is a renaming of prefixes; the fused-``qkv``
mapping of :mod:`fusion.models.hf_weights` is for LXMERT's own layers and is not needed here.

:func:`stele_state` inverts the export (encoder + extra modules -> stele's state dict), so a text
encoder fine-tuned elsewhere can be put back into its stele model. A recipe plugin adds its
encoder with ``@text_encoder("name")``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.export import ExportError, exporter

EXTRA_WEIGHTS = "extra_modules.safetensors"
EXTRA_JSON = "extra_modules.json"
ENTITY_TABLE = "entity_embeddings"  # ERNIE's frozen table: an input of the model, not a parameter


@dataclass
class TextEncoder:
    """One recipe's model, split: ``key_map`` (stele prefix -> encoder prefix) names the encoder's
    tensors, ``groups`` (stele prefix -> description) describe the others, ``inputs`` are tensors
    the model is given rather than trained (ERNIE's entity table), ``note`` says what the encoder
    computes relative to the stele model."""

    model: Any
    key_map: list[tuple[str, str]]
    groups: dict[str, str]
    note: str
    inputs: dict[str, Any] = field(default_factory=dict)
    inputs_about: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # copied as they are: name -> source


#: recipe -> ``(artifact folder, recipe.json, backbone) -> TextEncoder``
TEXT_ENCODERS: dict[str, Callable[[Path, dict[str, Any], Any], TextEncoder]] = {}
_MLM_HEAD = ("MLM head: dense + GELU + LayerNorm, decoder tied to embeddings.word_embeddings.weight, "
             "plus a bias")


def text_encoder(recipe: str) -> Callable:
    """Register how recipe ``recipe``'s model splits into a text encoder and extra modules."""
    def deco(fn: Callable[[Path, dict[str, Any], Any], TextEncoder]) -> Callable:
        TEXT_ENCODERS[recipe] = fn
        return fn
    return deco


def _encoder_for(recipe: str) -> Callable[[Path, dict[str, Any], Any], TextEncoder]:
    """The registered split of ``recipe``, or of the nearest recipe class it derives from (a plugin
    recipe subclassing ``ErnieRecipe`` exports as ``ernie``), as ``fusion.finetune`` finds encoders."""
    from fusion.pretrain.loop import RECIPES

    if recipe in TEXT_ENCODERS:
        return TEXT_ENCODERS[recipe]
    try:
        cls = RECIPES.get(recipe)
    except KeyError as e:
        raise ExportError(e.args[0]) from None
    for base in cls.__mro__:
        if getattr(base, "name", None) in TEXT_ENCODERS:
            return TEXT_ENCODERS[base.name]
    raise ExportError(f"recipe {recipe!r} has no text-encoder export (its text encoder is not a "
                      f"plain BERT: extra inputs or layers inside it, or a multimodal model); "
                      f"exportable: {', '.join(sorted(TEXT_ENCODERS))}")


def _build(path: Path, backbone: Any, resources: dict[str, Any]) -> Any:
    from fusion.pretrain.loop import build_pretrained
    from pipeline import StageFailed

    try:
        return build_pretrained(path, backbone, resources)[2].eval()
    except StageFailed as e:
        raise ExportError(str(e)) from None


def _layers(start: int, stop: int) -> str:
    """``encoder.layer.start..stop-1`` in words."""
    if stop <= start:
        return "no layer"
    return f"encoder.layer.{start}" + (f"..{stop - 1}" if stop - start > 1 else "")


def _bert_prefix(prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}embeddings.", "embeddings."), (f"{prefix}encoder.", "encoder.")]


# ------------------------------------------------------------------------------------ the recipes
@text_encoder("mlm")
def _mlm(path: Path, meta: dict[str, Any], backbone: Any) -> TextEncoder:
    model = _build(path, backbone, dict(meta.get("resources_meta", {})))
    return TextEncoder(model, _bert_prefix("encoder."),
                       {"mlm.": _MLM_HEAD},
                       "the backbone as MLM pretraining left it: exactly stele's encoder")


@text_encoder("ernie")
def _ernie(path: Path, meta: dict[str, Any], backbone: Any) -> TextEncoder:
    from safetensors.torch import load_file

    if not (path / "entity_table.safetensors").is_file():
        raise ExportError(f"{path}: no entity_table.safetensors (an ERNIE artifact written before "
                          f"fusion.pretrain kept its entity table)")
    table = load_file(str(path / "entity_table.safetensors"))["entity"]
    model = _build(path, backbone, {**meta.get("resources_meta", {}), "entity_table": table})
    n, m = model.config.num_t_layers, model.config.num_k_layers
    key_map = [("embeddings.", "embeddings.")]
    key_map += [(f"t_layers.{i}.", f"encoder.layer.{i}.") for i in range(n)]
    groups = {}
    for j in range(m):
        hf = f"encoder.layer.{n + j}."
        key_map += [(f"k_layers.{j}.attention.", f"{hf}attention."),
                    (f"k_layers.{j}.token_in.", f"{hf}intermediate.dense."),
                    (f"k_layers.{j}.token_out.", f"{hf}output.")]
        groups[f"k_layers.{j}."] = (
            f"aggregator {j}, the entity stream beside {hf[:-1]}: entity_attention (multi-head "
            f"self-attention + LayerNorm over the token-aligned entity vectors), entity_in (W_e, "
            f"entity_dim -> intermediate_size, no bias: added to {hf}intermediate.dense's output "
            f"before the activation), entity_out + entity_norm (W'_e and the LayerNorm of the "
            f"entity output)")
    groups |= {"mlm_transform.": "MLM head transform (dense, GELU, LayerNorm)",
               "mlm_bias": "MLM output bias (decoder tied to embeddings.word_embeddings.weight)",
               "dea_transform.": "dEA head (dense to entity_dim, GELU, LayerNorm), scored by dot "
                                 "product against entity_embeddings rows"}
    return TextEncoder(
        model, key_map, groups,
        f"ERNIE's token stream: embeddings, the T-Encoder ({_layers(0, n)}) and the BERT half of "
        f"each aggregator ({_layers(n, n + m)}); on text with no linked entity it is exactly "
        f"ERNIE's output w^o; with entities ERNIE adds the aggregators' entity terms (extra "
        f"modules)",
        inputs={ENTITY_TABLE: table},
        inputs_about={ENTITY_TABLE: "the frozen entity vectors ERNIE reads (row i: the i-th id of "
                                    "entity_ids.json; fusion.finetune looks mentions up by id)"},
        config=dataclasses.asdict(model.config),
        files={"entity_ids.json": path / "entity_ids.json"} if (path / "entity_ids.json").is_file() else {})


@text_encoder("kbert")
def _kbert(path: Path, meta: dict[str, Any], backbone: Any) -> TextEncoder:
    resources = {"max_length": meta.get("max_length", 128), **meta.get("resources_meta", {})}
    model = _build(path, backbone, resources)
    return TextEncoder(
        model, _bert_prefix("bert."),
        {"mlm_dense.": "MLM head transform dense", "mlm_norm.": "MLM head LayerNorm",
         "mlm_bias": "MLM output bias (decoder tied to embeddings.word_embeddings.weight)"},
        "K-BERT's BERT as it is: on plain text (positions 0..L-1, every token visible) it is "
        "K-BERT; a sentence tree goes in as position_ids=its soft positions and attention_mask="
        "the additive (B, 1, L, L) visible-matrix bias (0 where visible, the dtype's minimum "
        "where not; stele's fusion.models.kbert.visible_bias), which BertModel hands to its "
        "attention unchanged (eager or sdpa)",
        config=dataclasses.asdict(model.config))


@text_encoder("kadapter")
def _kadapter(path: Path, meta: dict[str, Any], backbone: Any) -> TextEncoder:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        num_labels = f.get_slice("head.classifier.weight").get_shape()[0]
    # label names are not kept in the artifact: the head is exported by shape
    model = _build(path, backbone, {**meta.get("resources_meta", {}), "labels": [""] * num_labels})
    enc = model.head.encoder
    groups = {f"head.encoder.adapters.{a}.": (
        f"adapter {a!r}: one block per tapped layer, reading hidden_states[i] for i in "
        f"{list(enc.layers)} (output_hidden_states=True; 0 = the embeddings) plus the previous "
        f"block's output; each block = down projection, transformer layers, up projection, "
        f"residual") for a in enc.adapter_names}
    groups["head.classifier."] = (f"task head ({type(model.head).__name__}, {num_labels} labels) over "
                                  f"[last hidden state ; adapter outputs] at the mentions' first "
                                  f"wordpieces")
    return TextEncoder(model, _bert_prefix("head.encoder.backbone."), groups,
                       "the frozen backbone K-Adapter's adapters were trained beside, as it is "
                       "(K-Adapter never updates it)",
                       config={**dataclasses.asdict(enc.cfg), "layers": list(enc.layers)})


def _shared_encoder(note: str, **groups: str) -> Callable[[Path, dict[str, Any], Any], TextEncoder]:
    """The models whose text encoder is the backbone itself, trained in full (``self.encoder``),
    with their task heads as the extra modules."""
    def make(path: Path, meta: dict[str, Any], backbone: Any) -> TextEncoder:
        model = _build(path, backbone, dict(meta.get("resources_meta", {})))
        return TextEncoder(model, _bert_prefix("encoder."), {f"{k}.": v for k, v in groups.items()}, note)
    return make


text_encoder("kepler")(_shared_encoder(
    "the encoder KEPLER trained with MLM and its knowledge-embedding loss; an entity's embedding is "
    "its description's [CLS] hidden state (the same encoder, no extra module)",
    mlm=_MLM_HEAD, relations="relation embeddings of the TransE knowledge-embedding loss (R, hidden)"))
text_encoder("kgbert")(_shared_encoder(
    "the encoder KG-BERT fine-tuned on triples as text ([CLS] h [SEP] r [SEP] t [SEP])",
    triple_head="triple classification: a linear layer on [CLS] -> 1 logit (plausible or not)",
    relation_head="relation prediction: a linear layer on [CLS] -> one logit per relation"))
text_encoder("libert")(_shared_encoder(
    "the encoder LIBERT trained with MLM and its lexical-relation classification",
    mlm=_MLM_HEAD, relation="lexical relation head: BERT's pooler + a 2-way classifier on [CLS] "
    "of a word pair"))
text_encoder("wklm")(_shared_encoder(
    "the encoder WKLM trained with reduced-rate MLM and entity replacement detection",
    mlm=_MLM_HEAD, replacement="replacement detection: a linear layer on [h_start ; h_end] of a "
    "mention -> 1 logit (replaced or not)"))


# ----------------------------------------------------------------------------------- the split
def _map_key(key: str, key_map: list[tuple[str, str]]) -> str | None:
    for src, dst in key_map:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def _group(key: str, groups: dict[str, str]) -> str:
    hits = [g for g in groups if key.startswith(g)]
    return max(hits, key=len) if hits else "other"


def split_state(enc: TextEncoder) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """``(encoder state in the encoder's keys, extra tensors in stele's keys, tied)``: a stele
    tensor that is an encoder tensor under another name (an MLM decoder tied to the word
    embeddings) is not stored twice: ``tied`` maps its stele name to the encoder key."""
    state = enc.model.state_dict()
    hf: dict[str, Any] = {}
    by_storage: dict[tuple, str] = {}
    for k, v in state.items():
        mapped = _map_key(k, enc.key_map)
        if mapped is not None:
            hf[mapped] = v
            by_storage[(v.data_ptr(), tuple(v.shape), tuple(v.stride()))] = mapped
    extra, tied = {}, {}
    for k, v in state.items():
        if _map_key(k, enc.key_map) is not None:
            continue
        alias = by_storage.get((v.data_ptr(), tuple(v.shape), tuple(v.stride())))
        if alias is not None:
            tied[k] = alias
        else:
            extra[k] = v.detach().contiguous().clone()
    return hf, extra, tied


def _readme(recipe: str, enc: TextEncoder, info: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{g}` | {len(d['tensors'])} | {d['about']} |" for g, d in info["modules"].items())
    inputs = "".join(f"- `{k}` {v['shape']}: {v['about']}\n" for k, v in info["inputs"].items())
    if inputs:
        inputs = "\nInputs the model is given, not trained:\n\n" + inputs
    return f"""# {recipe} text encoder (stele export)

Exported by `stele export --format hf` from a `fusion.pretrain` artifact (recipe `{recipe}`).

The text encoder is {enc.note}.

```python
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModel.from_pretrained("path/to/this/folder", add_pooling_layer=False)
hidden = model(**tokenizer(["a sentence"], return_tensors="pt")).last_hidden_state
```

stele trains no pooler: without `add_pooling_layer=False` transformers adds a randomly initialised
one (and says so); `last_hidden_state` is the same either way.

`{EXTRA_WEIGHTS}` holds the rest of stele's model under stele's own parameter names
(`safetensors.torch.load_file`); `{EXTRA_JSON}` lists every tensor with its shape, the key map from
stele's names to the encoder's (`key_map`), tied weights (`tied`) and the model's config. stele's
`fusion.export.stele_state(folder)` puts encoder and extra modules back together as the stele
model's state dict.

| stele prefix | tensors | what it is |
|---|---|---|
{rows}
{inputs}"""


@exporter("fusion.pretrain", formats=("hf",))
def export_text_encoder(artifact: Path, fmt: str, out: Path) -> dict[str, Any]:
    """Write the ``fusion.pretrain`` artifact at ``artifact`` into ``out`` (the files of the module
    docstring)."""
    from safetensors.torch import save_file
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from fusion.models.backbone import artifact_backbone

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar: noise in a one-line command

    meta_path = artifact / "recipe.json"
    if not meta_path.is_file():
        raise ExportError(f"{artifact}: no recipe.json (not a fusion.pretrain artifact?)")
    meta = json.loads(meta_path.read_text())
    split = _encoder_for(meta["recipe"])  # an unexportable recipe fails before any model is built
    backbone = artifact_backbone(artifact)
    enc = split(artifact, meta, backbone)
    hf_state, extra, tied = split_state(enc)
    hf = AutoModel.from_config(backbone.model.config, add_pooling_layer=False)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    if missing or unexpected:  # the key map must cover the encoder exactly
        raise ExportError(f"recipe {meta['recipe']!r}: the encoder's weights do not fit "
                          f"{type(hf).__name__}: missing {sorted(missing)[:5]}, unexpected "
                          f"{sorted(unexpected)[:5]}")
    hf.save_pretrained(str(out))
    for f in sorted((artifact / "tokenizer").iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)
    for name, src in enc.files.items():
        shutil.copy2(src, out / name)
    save_file({**extra, **{k: v.contiguous() for k, v in enc.inputs.items()}}, str(out / EXTRA_WEIGHTS))
    modules: dict[str, dict[str, Any]] = {g: {"about": about, "tensors": {}}
                                          for g, about in enc.groups.items()}
    for k, v in extra.items():
        g = _group(k, enc.groups)
        modules.setdefault(g, {"about": "", "tensors": {}})["tensors"][k] = {
            "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
    modules = {g: d for g, d in modules.items() if d["tensors"]}
    info = {"recipe": meta["recipe"], "options": meta.get("options", {}),
            "max_length": meta.get("max_length"), "encoder": {
                "class": type(hf).__name__, "note": enc.note, "key_map": enc.key_map},
            "modules": modules, "tied": tied, "config": enc.config,
            "inputs": {k: {"shape": list(v.shape), "about": enc.inputs_about.get(k, "")}
                       for k, v in enc.inputs.items()}}
    (out / EXTRA_JSON).write_text(json.dumps(info, indent=1, default=str))
    (out / "README.md").write_text(_readme(meta["recipe"], enc, info))
    files = sorted(p.name for p in out.iterdir())
    sizes = (f"{type(hf).__name__}: {sum(v.numel() for v in hf_state.values()):,} parameters; "
             f"extra modules: {sum(v.numel() for v in extra.values()):,} in {len(modules)} group(s)")
    return {"files": files, "notes": [sizes, f"encoder = {enc.note}"]}


def stele_state(folder: str | Path) -> dict[str, Any]:
    """The stele model's state dict from an ``hf`` export: the encoder's tensors renamed back by
    ``key_map``, the extra modules as they are, tied names pointing at their encoder tensor.
    Inputs (ERNIE's ``entity_embeddings``) are left out: the model takes them when it is built."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / EXTRA_JSON).read_text())
    encoder = load_file(str(folder / "model.safetensors"))
    extra = load_file(str(folder / EXTRA_WEIGHTS))
    out: dict[str, Any] = {}
    for key, v in encoder.items():
        if key.startswith("pooler."):  # a pooler added by a save outside stele: no stele counterpart
            continue
        back = _map_key(key, [(dst, src) for src, dst in info["encoder"]["key_map"]])
        if back is None:
            raise ExportError(f"{folder}/model.safetensors: {key} is in no key_map entry")
        out[back] = v
    out |= {k: v for k, v in extra.items() if k not in info["inputs"]}
    for name, alias in info["tied"].items():
        out[name] = encoder[alias]
    return out
