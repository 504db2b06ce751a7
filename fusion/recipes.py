"""stele's pretraining recipes: how each fusion encoder gets its data and its objectives.

``mlm`` is the plain backbone with masked language modelling: the baseline every knowledge encoder
is compared with, on the same data, steps and backbone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import TextBackbone
from .heads import MLMHead
from .objectives import mlm_mask
from .pretrain import Recipe, recipe


class BackboneMLM(nn.Module):
    """The backbone alone, trained with MLM (15%, 80/10/10)."""

    def __init__(self, backbone: TextBackbone):
        super().__init__()
        self.encoder = backbone.model
        cfg = backbone.model.config
        self.mlm = MLMHead(self.encoder.get_input_embeddings(), cfg.hidden_size, cfg.layer_norm_eps)
        self.mask_token_id = backbone.tokenizer.mask_token_id
        self.vocab_size = cfg.vocab_size

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict:
        ids, labels = mlm_mask(batch["input_ids"], batch["maskable"], self.mask_token_id,
                               self.vocab_size, generator)
        hidden = self.encoder(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        mlm = self.mlm.loss(hidden, labels)
        return {"mlm": mlm, "total": mlm}


def encode_texts(backbone: TextBackbone, texts: list[str], max_length: int) -> dict[str, Any]:
    """Padded token ids, attention mask and the MLM-maskable positions (not special, not padding)."""
    enc = backbone.tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                             return_tensors="pt", return_special_tokens_mask=True)
    attn = enc["attention_mask"].bool()
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "maskable": attn & ~enc["special_tokens_mask"].bool(), "n_tokens": int(attn.sum())}


@recipe("mlm")
class PlainMLM(Recipe):
    needs = ("text",)

    def build(self, backbone: TextBackbone, resources: dict, options: Any) -> nn.Module:
        return BackboneMLM(backbone)

    def collate(self, backbone: TextBackbone, examples: list[dict], resources: dict, options: Any,
                max_length: int) -> dict[str, Any]:
        return encode_texts(backbone, [e["text"] for e in examples], max_length)
