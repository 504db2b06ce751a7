"""Weights for :class:`fusion.models.single_stream.SingleStream`: a VisualBERT that computes what a
``transformers`` VisualBERT computes (:func:`from_hf_visualbert`), and a single-stream model whose
text side starts from a local BERT-family backbone (:func:`single_stream_backbone`).

``transformers.VisualBertModel`` / ``VisualBertForPreTraining`` (an independent port of Li et al.
2019's uclanlp/visualbert) keep BERT's layout: query, key and value as three Linears, stacked here
into one ``qkv`` (:func:`fusion.models.hf_weights._gather`). Its region inputs are
``embeddings.visual_projection`` (W_f), ``visual_position_embeddings`` and
``visual_token_type_embeddings``; the text LayerNorm is shared, as here. Neither ``bypass_transformer``
nor ``image_text_alignment`` (region positions averaged from aligned words) is supported: the first
is refused, the second is an input stele does not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fusion.models.backbone import TextBackbone
from fusion.models.hf_weights import _bert_embeddings, _bert_layer, _gather, bert_state
from fusion.models.single_stream import HEADS, SingleStream, SingleStreamConfig, variant_config


def visualbert_key_map(num_layers: int, prefix: str = "") -> dict[str, str]:
    """stele module -> transformers module of a VisualBERT (``prefix`` "visual_bert." for the
    pretraining model)."""
    e = f"{prefix}embeddings."
    m = {**_bert_embeddings(e), "regions.feat": f"{e}visual_projection",
         "pooler": f"{prefix}pooler.dense",
         "mlm_head.dense": "cls.predictions.transform.dense",
         "mlm_head.norm": "cls.predictions.transform.LayerNorm"}
    for i in range(num_layers):
        m |= _bert_layer(f"{prefix}encoder.layer.{i}", f"layers.{i}")
    return m


def load_hf_visualbert_state(hf_model: torch.nn.Module | Mapping[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor]:
    """A state dict for a ``region_input="visualbert"`` :class:`SingleStream` from a
    ``transformers.VisualBertModel`` or ``VisualBertForPreTraining`` (or either's state dict).

    From a pretraining model also the MLM head and ``itm``: the 2-way ``seq_relationship`` whose
    class 0 means "matches" (transformers' ``sentence_image_labels``) becomes the one logit
    ``w_0 - w_1``. Load with ``strict=False``: the region heads and the contrastive projections
    have no counterpart."""
    state = hf_model.state_dict() if isinstance(hf_model, torch.nn.Module) else hf_model
    prefix = "visual_bert." if any(k.startswith("visual_bert.") for k in state) else ""
    layer = f"{prefix}encoder.layer."
    n = 1 + max((int(k[len(layer):].split(".")[0]) for k in state if k.startswith(layer)), default=-1)
    out = _gather(state, visualbert_key_map(n, prefix))
    e = f"{prefix}embeddings."
    out["regions.position.weight"] = state[f"{e}visual_position_embeddings.weight"]
    out["regions.token_type.weight"] = state[f"{e}visual_token_type_embeddings.weight"]
    if "cls.predictions.bias" in state:
        out["mlm_head.bias"] = state["cls.predictions.bias"]
    if "cls.seq_relationship.weight" in state:
        w, b = state["cls.seq_relationship.weight"], state["cls.seq_relationship.bias"]
        out["itm.weight"], out["itm.bias"] = (w[0] - w[1])[None], (b[0] - b[1])[None]
    return out


def visualbert_config_from_hf(hf_config: Any, **overrides: Any) -> SingleStreamConfig:
    """The VisualBERT variant config of a ``transformers.VisualBertConfig`` (sizes; the rest from
    ``overrides``)."""
    c = hf_config
    if getattr(c, "bypass_transformer", False):
        raise ValueError("VisualBERT with bypass_transformer=True (text-only layers, then one joint "
                         "layer) is not the single-stream model")
    return variant_config("visualbert", **({
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size, "num_layers": c.num_hidden_layers,
        "visual_feat_dim": c.visual_embedding_dim, "max_position": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size, "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps,
        "dropout": c.hidden_dropout_prob, "attention_dropout": c.attention_probs_dropout_prob,
        "initializer_range": c.initializer_range, "pad_token_id": c.pad_token_id or 0} | overrides))


def from_hf_visualbert(hf_model: torch.nn.Module, **overrides: Any) -> SingleStream:
    """A VisualBERT :class:`SingleStream` computing what ``hf_model`` (``VisualBertModel`` /
    ``VisualBertForPreTraining``) does."""
    base = getattr(hf_model, "visual_bert", hf_model)
    model = SingleStream(visualbert_config_from_hf(base.config, **overrides))
    missing, unexpected = model.load_state_dict(load_hf_visualbert_state(hf_model), strict=False)
    encoder_missing = [k for k in missing if not k.startswith(HEADS)]
    if encoder_missing or unexpected:
        raise ValueError(f"weights do not fit: missing {encoder_missing}, unexpected {unexpected}")
    return model


def single_stream_backbone(backbone: TextBackbone, variant: str = "visualbert",
                           **config: Any) -> SingleStream:
    """A single-stream model of ``variant`` whose embeddings and layers start from a BERT-family
    backbone (all its layers, in order); region inputs and heads start random, except VisualBERT's
    region position and segment tables (B2T2's too: the same region input), copied from the text's
    (the reference's ``special_visual_initialize``). Sizes, activation and epsilon are the backbone's."""
    bc = backbone.model.config
    fixed = {"vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_layers"} & set(config)
    if fixed:
        raise ValueError(f"{sorted(fixed)} come from the backbone and cannot be overridden")
    tok = backbone.tokenizer
    model = SingleStream(variant_config(variant, **({
        "vocab_size": bc.vocab_size, "hidden_size": bc.hidden_size, "num_heads": bc.num_attention_heads,
        "intermediate_size": bc.intermediate_size, "num_layers": bc.num_hidden_layers,
        "max_position": bc.max_position_embeddings, "type_vocab_size": bc.type_vocab_size,
        "hidden_act": bc.hidden_act, "layer_norm_eps": bc.layer_norm_eps, "dropout": bc.hidden_dropout_prob,
        "attention_dropout": bc.attention_probs_dropout_prob, "initializer_range": bc.initializer_range,
        "pad_token_id": tok.pad_token_id or 0, "mask_token_id": tok.mask_token_id} | config)))
    state = {k.replace("l_layers.", "layers.", 1): v for k, v in bert_state(backbone.model).items()}
    if model.config.region_input == "visualbert":   # VisualBERT's and B2T2's region tables
        types = state["embeddings.token_type.weight"]
        state["regions.position.weight"] = state["embeddings.position.weight"].clone()
        state["regions.token_type.weight"] = (types if len(types) >= 2 else types.expand(2, -1)).clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k.startswith(("embeddings.", "layers."))]:
        raise ValueError(f"backbone weights do not fit: missing {missing}, unexpected {unexpected}")
    return model
