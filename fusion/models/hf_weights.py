"""Weights from transformers checkpoints, as state dicts keyed for :class:`fusion.models.lxmert.Lxmert`:
the LXMERT that computes what a ``transformers`` LXMERT computes (:func:`from_hf`), and an LXMERT
whose language stream starts from a local BERT-family backbone (:func:`lxmert_backbone`).

``transformers.LxmertModel`` / ``LxmertForPreTraining`` (an independent port of the LXMERT reference
code, Tan & Bansal 2019) and BERT-family encoders (``BertModel`` layout, Devlin et al. 2019) keep
query, key and value as three Linears; here they are one ``qkv`` Linear (rows query, key, value,
:class:`fusion.models.layers.Attention`'s fused layout), so the three are stacked row-wise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fusion.models.backbone import TextBackbone
from fusion.models.lxmert import Lxmert, LxmertConfig


def _bert_layer(src: str, dst: str) -> dict[str, str]:
    """Key map of one BERT-layout layer (BertLayer, LxmertLayer) onto a
    :class:`~fusion.models.layers.TransformerLayer`; ``qkv`` entries are stacked by :func:`_gather`."""
    return {f"{dst}.attention.out": f"{src}.attention.output.dense",
            f"{dst}.attention.norm": f"{src}.attention.output.LayerNorm",
            f"{dst}.attention.qkv": f"{src}.attention.self",
            f"{dst}.ffn.inner": f"{src}.intermediate.dense",
            f"{dst}.ffn.out": f"{src}.output.dense",
            f"{dst}.ffn.norm": f"{src}.output.LayerNorm"}


def _bert_embeddings(src: str) -> dict[str, str]:
    return {"embeddings.word": f"{src}word_embeddings", "embeddings.position": f"{src}position_embeddings",
            "embeddings.token_type": f"{src}token_type_embeddings", "embeddings.norm": f"{src}LayerNorm"}


def _gather(state: Mapping[str, torch.Tensor], modules: dict[str, str]) -> dict[str, torch.Tensor]:
    """stele module -> source module, for ``weight`` and ``bias``; a ``qkv`` destination takes the
    source's ``query``, ``key`` and ``value`` stacked in rows (the order the attention splits)."""
    out: dict[str, torch.Tensor] = {}
    for dst, src in modules.items():
        for p in ("weight", "bias"):
            if dst.endswith(".qkv"):
                parts = [f"{src}.{n}.{p}" for n in ("query", "key", "value")]
                if all(k in state for k in parts):
                    out[f"{dst}.{p}"] = torch.cat([state[k] for k in parts])
            elif f"{src}.{p}" in state:
                out[f"{dst}.{p}"] = state[f"{src}.{p}"]
    return out


def lxmert_key_map(l_layers: int, r_layers: int, x_layers: int, prefix: str = "") -> dict[str, str]:
    """stele module -> transformers module of an LXMERT (``prefix`` "lxmert." for the pretraining
    model). The reference's ``visual_attention`` is the one shared cross-attention -> ``cross``."""
    m = {**_bert_embeddings(f"{prefix}embeddings."),
         "visual_embedding.feat": f"{prefix}encoder.visn_fc.visn_fc",
         "visual_embedding.feat_norm": f"{prefix}encoder.visn_fc.visn_layer_norm",
         "visual_embedding.box": f"{prefix}encoder.visn_fc.box_fc",
         "visual_embedding.box_norm": f"{prefix}encoder.visn_fc.box_layer_norm",
         "pooler": f"{prefix}pooler.dense"}
    for i in range(l_layers):
        m |= _bert_layer(f"{prefix}encoder.layer.{i}", f"l_layers.{i}")
    for i in range(r_layers):
        m |= _bert_layer(f"{prefix}encoder.r_layers.{i}", f"r_layers.{i}")
    for i in range(x_layers):
        s, d = f"{prefix}encoder.x_layers.{i}", f"x_layers.{i}"
        m |= {f"{d}.cross.qkv": f"{s}.visual_attention.att",
              f"{d}.cross.out": f"{s}.visual_attention.output.dense",
              f"{d}.cross.norm": f"{s}.visual_attention.output.LayerNorm"}
        for mine, theirs in (("lang", "lang"), ("vis", "visn")):
            m |= {f"{d}.{mine}_self.qkv": f"{s}.{theirs}_self_att.self",
                  f"{d}.{mine}_self.out": f"{s}.{theirs}_self_att.output.dense",
                  f"{d}.{mine}_self.norm": f"{s}.{theirs}_self_att.output.LayerNorm",
                  f"{d}.{mine}_ffn.inner": f"{s}.{theirs}_inter.dense",
                  f"{d}.{mine}_ffn.out": f"{s}.{theirs}_output.dense",
                  f"{d}.{mine}_ffn.norm": f"{s}.{theirs}_output.LayerNorm"}
    # LxmertForPreTraining's heads (absent from LxmertModel; the attribute head is left out)
    m |= {"mlm_head.dense": "cls.predictions.transform.dense",
          "mlm_head.norm": "cls.predictions.transform.LayerNorm",
          "region_transform.0": "obj_predict_head.transform.dense",
          "region_transform.2": "obj_predict_head.transform.LayerNorm",
          "region_feat": "obj_predict_head.decoder_dict.feat",
          "region_label": "obj_predict_head.decoder_dict.obj"}
    return m


def load_hf_lxmert_state(hf_model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for :class:`~fusion.models.lxmert.Lxmert` from a ``transformers.LxmertModel`` or
    ``LxmertForPreTraining`` (or either's state dict), by :func:`lxmert_key_map`.

    Holds every encoder parameter; from a pretraining model also the MLM head, the region heads and
    ``itm``: the reference's 2-way ``seq_relationship`` (rows: not matched, matched) becomes the
    one logit ``w_1 - w_0`` (the same softmax probability). Load it with ``strict=False``: the
    contrastive projections and scale have no counterpart. The tied MLM decoder needs no entry.
    """
    state = hf_model.state_dict() if isinstance(hf_model, nn.Module) else hf_model
    prefix = "lxmert." if any(k.startswith("lxmert.") for k in state) else ""

    def count(pattern: str) -> int:
        idx = {int(k[len(pattern):].split(".")[0]) for k in state if k.startswith(pattern)}
        return max(idx) + 1 if idx else 0

    enc = f"{prefix}encoder."
    out = _gather(state, lxmert_key_map(count(f"{enc}layer."), count(f"{enc}r_layers."),
                                        count(f"{enc}x_layers."), prefix))
    if "cls.predictions.bias" in state:
        out["mlm_head.bias"] = state["cls.predictions.bias"]
    if "cls.seq_relationship.weight" in state:
        w, b = state["cls.seq_relationship.weight"], state["cls.seq_relationship.bias"]
        out["itm.weight"], out["itm.bias"] = (w[1] - w[0])[None], (b[1] - b[0])[None]
    return out


def bert_state(bert: nn.Module, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Embeddings and layers 0..num_layers-1 of a BERT-family model (``BertModel`` layout, which
    LXMERT's language encoder shares) as :class:`~fusion.models.lxmert.Lxmert` keys
    ``embeddings.*`` and ``l_layers.*``."""
    state = bert.state_dict()
    n = bert.config.num_hidden_layers if num_layers is None else num_layers
    m = _bert_embeddings("embeddings.")
    for i in range(n):
        m |= _bert_layer(f"encoder.layer.{i}", f"l_layers.{i}")
    return _gather(state, m)


def config_from_hf(hf_config: Any, **overrides: Any) -> LxmertConfig:
    """The config of a ``transformers.LxmertConfig`` (sizes only; objectives from ``overrides``)."""
    c = hf_config
    return LxmertConfig(**{
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size, "l_layers": c.l_layers, "r_layers": c.r_layers,
        "x_layers": c.x_layers, "visual_feat_dim": c.visual_feat_dim, "visual_pos_dim": c.visual_pos_dim,
        "max_position": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
        "hidden_act": c.hidden_act, "layer_norm_eps": 1e-12,  # hard-coded in the reference
        "dropout": c.hidden_dropout_prob, "attention_dropout": c.attention_probs_dropout_prob,
        "initializer_range": c.initializer_range, "num_region_labels": c.num_object_labels,
        **overrides})


def from_hf(hf_model: nn.Module, **overrides: Any) -> Lxmert:
    """An :class:`~fusion.models.lxmert.Lxmert` computing what ``hf_model`` (``LxmertModel`` /
    ``LxmertForPreTraining``) does."""
    base = getattr(hf_model, "lxmert", hf_model)
    model = Lxmert(config_from_hf(base.config, **overrides))
    missing, unexpected = model.load_state_dict(load_hf_lxmert_state(hf_model), strict=False)
    encoder_missing = [k for k in missing if not k.startswith(
        ("mlm_head.", "region_", "itm.", "text_proj.", "media_proj.", "logit_scale"))]
    if encoder_missing or unexpected:
        raise ValueError(f"weights do not fit: missing {encoder_missing}, unexpected {unexpected}")
    return model


def lxmert_backbone(backbone: TextBackbone, l_layers: int | None = None, r_layers: int = 5,
                    x_layers: int = 5, **config: Any) -> Lxmert:
    """LXMERT whose language stream starts from a BERT-family backbone: its embeddings ->
    ``embeddings``, its layers 0..l_layers-1 (all by default) -> ``l_layers`` 0..l_layers-1, in
    order; the object-relationship and cross layers and all heads start random. Sizes, activation
    and LayerNorm epsilon are the backbone's (the cross layers must match its hidden size)."""
    bc = backbone.model.config
    n = bc.num_hidden_layers if l_layers is None else l_layers
    if not 0 <= n <= bc.num_hidden_layers:
        raise ValueError(f"l_layers={n}: the backbone has {bc.num_hidden_layers} layers")
    fixed = {"vocab_size", "hidden_size", "num_heads", "intermediate_size", "l_layers"} & set(config)
    if fixed:
        raise ValueError(f"{sorted(fixed)} come from the backbone and cannot be overridden")
    tok = backbone.tokenizer
    cfg = LxmertConfig(**({
        "vocab_size": bc.vocab_size, "hidden_size": bc.hidden_size, "num_heads": bc.num_attention_heads,
        "intermediate_size": bc.intermediate_size, "l_layers": n, "r_layers": r_layers, "x_layers": x_layers,
        "max_position": bc.max_position_embeddings, "type_vocab_size": bc.type_vocab_size,
        "hidden_act": bc.hidden_act, "layer_norm_eps": bc.layer_norm_eps,
        "dropout": bc.hidden_dropout_prob, "attention_dropout": bc.attention_probs_dropout_prob,
        "initializer_range": bc.initializer_range, "pad_token_id": tok.pad_token_id or 0,
        "mask_token_id": tok.mask_token_id} | config))
    model = Lxmert(cfg)
    missing, unexpected = model.load_state_dict(bert_state(backbone.model, n), strict=False)
    if unexpected or [k for k in missing if k.startswith(("embeddings.", "l_layers."))]:
        raise ValueError(f"backbone weights do not fit: missing {missing}, unexpected {unexpected}")
    return model
