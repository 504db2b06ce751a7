"""Hugging Face models from local folders for ``fusion.retrieval``.

**Hugging Face dual encoders** (``hf_model``): a local folder written by ``save_pretrained`` holding a
model with ``get_text_features`` and ``get_image_features`` (``CLIPModel``, ``SiglipModel``, ...), its
tokenizer and its image processor. Nothing is downloaded: a name that is not a local folder fails at
once. Captions are the ``media`` feature artifact's texts; images are read through the dataset that
artifact was built from (its manifest's ``params.dataset``), or the ``dataset`` given. Scores are the
model's own ``logits_per_text``: ``exp(logit_scale) * cos(text, image)`` (CLIP).

**Hugging Face cross-encoders** (``hf_model`` naming a ``LxmertForPreTraining`` or
``VisualBertForPreTraining`` folder): the image-text matching head over the media artifact's region
features (LXMERT: features and boxes; VisualBERT: features), for ``all_pairs`` and ``rerank``; the
first stage of ``rerank`` is precomputed ``text_vectors`` + ``media_vectors`` (ids: the artifact's
caption and item ids) or the ``first_stage`` input. Their feature width must be the artifact's.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fusion.retrieval.external import FormatError


def hf_folder(value: str) -> Path:
    """A local model folder, or a one-line error: nothing is ever downloaded."""
    p = Path(value)
    if not p.is_dir():
        raise FormatError(f"hf_model: {value} is not a local folder (nothing is downloaded: save the "
                          f"model, its tokenizer and its processor with save_pretrained and give that "
                          f"folder)")
    if not (p / "config.json").is_file():
        raise FormatError(f"hf_model: {value} has no config.json (not a save_pretrained folder)")
    return p


class HFDualEncoder:
    """A Hugging Face model with ``get_text_features`` / ``get_image_features`` from a local folder,
    with its tokenizer and image processor. :meth:`encode_texts` and :meth:`encode_images` give
    L2-normalised vectors; :attr:`scale` is ``exp(logit_scale)`` where the model has one (CLIP), so
    that ``scale * text @ image.T`` is the model's own ``logits_per_text``."""

    def __init__(self, folder: str, device: str = "cpu", max_length: int | None = None,
                 batch_size: int = 64):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        path = hf_folder(folder)
        try:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FormatError(f"hf_model: {folder}: {str(e).splitlines()[0]}") from None
        for fn in ("get_text_features", "get_image_features"):
            if not hasattr(self.model, fn):
                raise FormatError(f"hf_model: {folder}: {type(self.model).__name__} has no {fn} (not a "
                                  f"dual encoder such as CLIPModel)")
        self.device, self.batch_size = torch.device(device), batch_size
        cfg = getattr(self.model.config, "text_config", self.model.config)
        limit = getattr(cfg, "max_position_embeddings", None) or 77
        self.max_length = min(max_length or limit, limit)
        scale = getattr(self.model, "logit_scale", None)
        self.scale = float(scale.detach().exp()) if scale is not None else 1.0

    @staticmethod
    def _pooled(out: Any) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected vector
        v = out if isinstance(out, torch.Tensor) else out.pooler_output
        return v / v.norm(dim=-1, keepdim=True)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text vectors, float32 on the CPU."""
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[s:s + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out.append(self._pooled(self.model.get_text_features(**enc)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, D) L2-normalised image vectors (``images``: PIL images), float32 on the CPU."""
        out = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                pix = self.processor(images=list(images[s:s + self.batch_size]), return_tensors="pt")
                out.append(self._pooled(self.model.get_image_features(
                    pixel_values=pix["pixel_values"].to(self.device))).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


def open_images(dataset: Any, refs: Sequence[str], background: tuple[int, int, int] = (255, 255, 255)
                ) -> list[Any]:
    """The images ``refs`` of a media dataset as RGB PIL images (transparency over ``background``)."""
    from PIL import Image

    out = []
    for ref in refs:
        img = Image.open(io.BytesIO(dataset.load(ref)))
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            base = Image.new("RGB", rgba.size, background)
            base.paste(rgba, mask=rgba.split()[3])
            img = base
        out.append(img.convert("RGB"))
    return out


# ----------------------------------------------------------------------------------- cross-encoders
# Hugging Face model types scored as cross-encoders over region features, with the index of the
# "matches" class of their image-text matching head: LXMERT's matched_label 1 = the sentence matches
# the image; VisualBERT's sentence_image_labels 0 = sequence B matches.
CROSS_TYPES = {"lxmert": 1, "visual_bert": 0}


def hf_model_type(value: str) -> str | None:
    """``model_type`` of a local model folder's config.json; None where there is none to read."""
    try:
        return json.loads((Path(value) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


class HFCrossEncoder(torch.nn.Module):
    """``LxmertForPreTraining`` or ``VisualBertForPreTraining`` from a local folder as a
    cross-encoder over region features, with the interface of stele's cross-encoders
    (:class:`fusion.retrieval.scorer.Scorer`): ``text_states`` and ``media_states`` only keep their
    inputs (these models mix the two streams from the first cross layer on, so nothing single-stream
    is cached), ``score_states`` runs the model on a batch of pairs and returns its image-text
    matching head's log-odds of "matches", ``logit[match] - logit[other]``.

    LXMERT takes each region's features and box (``visual_feats`` (B, R, F), ``visual_pos``
    (B, R, 4), normalised x1, y1, x2, y2: the feature artifact's boxes); VisualBERT its features only
    (``visual_embeds``). The heads only, not the vocabulary projection, run per pair."""

    has_match_head = True

    def __init__(self, folder: str):
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, LxmertForPreTraining, VisualBertForPreTraining

        path = hf_folder(folder)
        kind = hf_model_type(str(path))
        if kind not in CROSS_TYPES:
            raise FormatError(f"hf_model: {folder}: model_type {kind!r} is not a cross-encoder stele scores "
                              f"({', '.join(CROSS_TYPES)})")
        cls = LxmertForPreTraining if kind == "lxmert" else VisualBertForPreTraining
        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            self.model = cls.from_pretrained(str(path), local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FormatError(f"hf_model: {folder}: {str(e).splitlines()[0]}") from None
        self.kind, self.match = kind, CROSS_TYPES[kind]
        self.feature_dim = config.visual_feat_dim if kind == "lxmert" else config.visual_embedding_dim
        self.max_positions = config.max_position_embeddings

    def text_states(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "mask": batch["attention_mask"].bool()}

    def media_states(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"features": batch["features"], "boxes": batch["boxes"], "mask": batch["region_mask"]}

    def score_states(self, text: dict[str, torch.Tensor], media: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) log-odds that caption i matches media item i."""
        ids, mask = text["input_ids"], text["mask"].long()                      # (B, L)
        feats = media["features"].to(self.model.dtype)                           # (B, R, F)
        vmask = media["mask"].long()                                             # (B, R)
        if self.kind == "lxmert":
            out = self.model.lxmert(input_ids=ids, attention_mask=mask, visual_feats=feats,
                                    visual_pos=media["boxes"].to(self.model.dtype),
                                    visual_attention_mask=vmask)
            logits = self.model.cls.seq_relationship(out.pooled_output)          # (B, 2)
        else:
            out = self.model.visual_bert(input_ids=ids, attention_mask=mask, visual_embeds=feats,
                                         visual_attention_mask=vmask)
            logits = self.model.cls.seq_relationship(out.pooler_output)          # (B, 2)
        return logits[:, self.match] - logits[:, 1 - self.match]


def cross_setup(hf_model: str, media_dir: Path, settings: Any, device: str) -> tuple[Any, Any]:
    """``(corpus, scorer)`` of a Hugging Face cross-encoder over the media artifact's region features
    in the split of ``settings`` (:class:`~fusion.retrieval.scorer.ScoreSettings`): what the stage's
    own process and each scoring actor build alike, so that pair indices mean the same in both.
    Models from elsewhere have no held-out split of stele's: the dataset's own split, or ``all``."""
    from fusion.pairs import load_pairs
    from fusion.retrieval.scorer import Corpus, Scorer
    from pipeline import StageFailed

    enc = HFCrossEncoder(hf_model)
    bank, caps, counts = load_pairs(media_dir, settings.split, 0.0, 0, None, settings.limit)
    if len(bank) and bank.dim != enc.feature_dim:
        raise StageFailed(f"mismatched feature dimensions: hf_model {Path(hf_model).name} takes "
                          f"{enc.feature_dim}-d region features, artifact {media_dir.name} has {bank.dim}-d")
    scorer = Scorer(enc, enc.tokenizer, min(settings.max_length or 64, enc.max_positions), device,
                    settings.encode_batch_size, settings.batch_size)
    return Corpus(bank, caps, counts), scorer
