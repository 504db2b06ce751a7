"""Single-stream vision-language encoders: text tokens and region embeddings in ONE transformer.

One model; its variants (:data:`VARIANTS`) differ where the papers do, in region input and objectives:

* **VisualBERT** (Li, Yatskar, Yin, Hsieh & Chang 2019, "VisualBERT: A Simple and Performant
  Baseline for Vision and Language", arXiv:1908.03557; code uclanlp/visualbert). Regions are
  projected into the word-embedding space and get a segment embedding and a position embedding of
  their own; one LayerNorm (the text's) over the whole sequence::

      e_w = word(w) + pos(i) + seg_t(0)        e_f = W_f f + pos_v(0) + seg_v(1)
      x   = LN([e_w ; e_f])                                                        (B, L+R, D)

  Boxes are not used. Objectives: MLM on the text, and sentence-image prediction, a binary head on
  the pooled [CLS] ``tanh(W h_0 + b)``. The paper's text is two captions, the second one of the same
  image or (half the time) a random one; with one caption per pair (stele's batches) that is ITM on
  the pair, and MLM counts matched pairs only (in the paper the masked text always holds a caption
  of the image). ``transformers.VisualBertModel`` is an independent port;
  :func:`fusion.models.hf_visualbert.from_hf_visualbert` loads its weights with equal outputs.
* **UNITER** (Chen, Li, Yu, El Kholy, Ahmed, Gan, Cheng & Liu 2020, "UNITER: UNiversal Image-TExt
  Representation Learning", ECCV; code ChenRocks/UNITER ``model/model.py``, ``model/pretrain.py``,
  ``model/ot.py``). Regions carry their 7-d location ``(x1, y1, x2, y2, w, h, w*h)``::

      e_f = LN(LN(W_f f) + LN(W_l loc) + seg_t(1))        the text's segment table, row 1

  Objectives: MLM, masked region feature regression (MRFR: the output at a masked region regresses
  the original feature, MSE, through a transform and ``W_f^T``, tied to the input projection), MRC-kl
  when the batch has class distributions, ITM, and word-region alignment (WRA) by optimal transport.
  *Conditional masking*: one modality is masked at a time, on matched pairs only (UNITER samples one
  task per batch; here each item masks its words or its regions with probability 1/2, so one pass
  serves both), and ITM/WRA run on a second, uncorrupted pass. Masked regions are zeroed plus a
  learnt mask vector (UNITER's ``mask_embedding``).
* **VL-BERT** (Su, Zhu, Cao, Li, Lu, Wei & Dai 2020, "VL-BERT: Pre-training of Generic
  Visual-Linguistic Representations", ICLR). A *visual feature embedding* ``v(f, b) = W_a f +
  W_g geo(b) + c`` (one FC over ``[appearance ; geometry]``, as two terms so that MRFR ties ``W_a``)
  is added to EVERY element: the whole image's to the words, each region's own to the regions, whose
  token ([IMG]) and shared sequence position (regions have no order) are one learnt vector ``img``::

      e_w = LN(word(w) + pos(i) + seg_t(0) + v(f_img, (0, 0, 1, 1)))
      e_r = LN(img + v(f_r, b_r) + seg_t(1))                       the text's LN and segment table
      geo(b) = [sin ; cos](100 p / 1000^(j/n)), p each corner of b, j < n = G / 8

  (``geometry_dim`` G, by default F as the paper's 2048 = 2048; wavelengths of the relation networks
  it cites, Hu et al. 2018). ``f_img`` is the mean of the real, unmasked, non-global regions'
  features (:func:`fusion.models.objectives.image_feature`): the paper blanks masked RoIs' pixels
  before extracting the whole image's feature, which a stored global token cannot undo.
  Objectives: MLM with visual clues and masked RoI classification (15% of words and of regions in
  one pass, a masked RoI's feature zeroed). The feature artifacts carry no detector labels, so the
  RoI objective here is feature regression (MRFR, UNITER's), or MRC when a batch has
  ``region_labels``. No sentence-image task (the paper drops it): retrieval by the dual encoder.
* **B2T2** (Alberti, Ling, Collins & Reitter 2019, "Fusion of Detected Objects in Text for Visual
  Question Answering", EMNLP). Early fusion: a token referring to boxes gets their projected
  features added, ``e'(t) = e(t) + sum_j R_tj (M phi(crop(I, b_j)) + pi(b_j))``. Captions carry no
  referring expressions, so here every word refers to one box, the whole image (its ``pi`` a
  constant ``m``): ``e'_w = LN(e_w + M f_img + m)`` (``early_fusion``; ``f_img`` as for VL-BERT).
  The regions also stay in the sequence as VisualBERT's (the dual encoder's media side needs them).
  Objectives: image-caption matching (the paper's impostor detection) and MLM, as its pretraining.
* **Unicoder-VL** (Li, Duan, Fang, Gong, Jiang & Zhou 2020, "Unicoder-VL: A Universal Encoder for
  Vision and Language by Cross-modal Pre-training", AAAI). Each region's feature and its 5-d
  location ``loc5 = (x1, y1, x2, y2, area share)`` are projected by two FC layers, summed and
  normalised by a LayerNorm of its own (the input ViLBERT's regions also use)::

      e_r = LN(W_f f + W_l loc5 + c)

  Objectives: MLM, masked object classification (MOC) and visual-linguistic matching (VLM, ITM),
  in one pass; MOC predicts the detector's label of a masked (zeroed) region, which the feature
  artifacts do not have, so here it is MRFR, or MRC when a batch has ``region_labels``.

The objectives (masking, MRFR, MRC, ITM, WRA by optimal transport) are in
:mod:`fusion.models.single_stream_objectives`. Retrieval (:mod:`fusion.retrieval.scorer`): only the
embeddings are single-modality, so ``text_states`` / ``media_states`` are the embedded inputs (the
words before their LN when the image adds to them) and ``score_states`` runs the whole transformer
on the pair. ``encode_text`` / ``encode_media`` run the same transformer over one modality alone
(UNITER's model accepts text-only and image-only inputs) for a dual-encoder first stage, trained by
an optional in-batch InfoNCE (``contrastive_weight``; not in the papers).
Masked regions never include padding nor a global token (region 0 with ``global_token``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.heads import MLMHead
from fusion.models.layers import (TransformerLayer, activation, block_sizes, init_bert_weights, key_mask,
                                  summary)
from fusion.models.lxmert import TextEmbeddings
from fusion.models.objectives import image_feature, pool
from fusion.models.regions import WHOLE_IMAGE, location_features
# ipot and ot_distance are re-exported: they were defined here before the objectives moved out
from fusion.models.single_stream_objectives import (Masking, ipot, masked_inputs, masked_losses,  # noqa: F401
                                                    match_losses, ot_distance, pretraining_loss)


@dataclasses.dataclass
class SingleStreamConfig:
    """Sizes, inputs, rates and loss weights (a loss weight of 0 switches its objective off)."""

    variant: str = "visualbert"          # a name of VARIANTS (checkpoint metadata)
    vocab_size: int = 30522
    hidden_size: int = 768               # D
    num_heads: int = 12
    intermediate_size: int = 3072
    num_layers: int = 12
    visual_feat_dim: int = 2048          # F
    max_position: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    mask_token_id: int | None = 103
    region_input: str = "visualbert"     # "visualbert" (projection + segment), "uniter" (+ 7-d location),
    #                                      "vlbert" (visual feature embedding on every element), "unicoder"
    geometry_dim: int | None = None      # VL-BERT's sin/cos box size G, a multiple of 8 (None: F rounded
    #                                      up to one, as the paper's G = F = 2048)
    early_fusion: bool = False           # B2T2: the projected whole-image feature added to every word
    global_token: bool = False           # region 0 is a global token: never masked; the media vector
    num_region_labels: int | None = None  # C for MRC (class ids or distributions)
    text_pool: str = "cls"               # dual-encoder text vector: "cls" or "mean"
    contrastive_dim: int | None = None
    temperature: float = 0.07
    mlm_prob: float = 0.15
    region_mask_prob: float = 0.15
    itm_mismatch_prob: float = 0.5
    conditional_masking: bool = False    # UNITER: one modality masked per item; ITM on a clean pass
    masked_loss_on_mismatched: bool = False  # masked losses on mismatched pairs too
    region_loss: str = "mse"             # MRFR: "mse" (UNITER) or "smooth_l1"
    ot_beta: float = 0.5                 # IPOT's proximal step (UNITER: 0.5, 50 iterations, k = 1)
    ot_iterations: int = 50
    ot_inner: int = 1
    mlm_weight: float = 1.0
    region_feat_weight: float = 0.0
    region_label_weight: float = 0.0
    itm_weight: float = 1.0
    wra_weight: float = 0.0              # UNITER's itm_ot_lambda: 0.1
    contrastive_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        inputs = ("visualbert", "uniter", "vlbert", "unicoder")
        for field, value, allowed in (("region_input", self.region_input, inputs),
                                      ("text_pool", self.text_pool, ("cls", "mean")),
                                      ("region_loss", self.region_loss, ("mse", "smooth_l1"))):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        if self.region_input in ("uniter", "vlbert") and self.type_vocab_size < 2:
            raise ValueError(f"{self.region_input}'s regions take row 1 of the segment table: "
                             "type_vocab_size >= 2")
        if self.geometry_dim is None:
            self.geometry_dim = -(-self.visual_feat_dim // 8) * 8
        if self.region_input == "vlbert" and (self.geometry_dim <= 0 or self.geometry_dim % 8):
            raise ValueError(f"geometry_dim must be a positive multiple of 8, got {self.geometry_dim}")
        if self.mlm_weight and self.mask_token_id is None:
            raise ValueError("MLM needs mask_token_id (or set mlm_weight=0)")


# parameters outside the encoder (no counterpart in transformers' VisualBertModel)
HEADS = ("mlm_head.", "region_", "itm.", "text_proj.", "media_proj.", "logit_scale", "regions.mask_vector")

VARIANTS: dict[str, dict[str, Any]] = {
    # Li et al. 2019: projected regions with segment 1, MLM + sentence-image prediction.
    "visualbert": {"region_input": "visualbert", "mlm_weight": 1.0, "itm_weight": 1.0,
                   "region_feat_weight": 0.0, "region_label_weight": 0.0, "wra_weight": 0.0,
                   "conditional_masking": False},
    # Chen et al. 2020: MLM + MRFR + MRC-kl (given labels) + ITM + WRA (itm_ot_lambda 0.1).
    "uniter": {"region_input": "uniter", "mlm_weight": 1.0, "itm_weight": 1.0, "region_feat_weight": 1.0,
               "region_label_weight": 1.0, "wra_weight": 0.1, "conditional_masking": True,
               "region_loss": "mse"},
    # Su et al. 2020: visual feature embedding on every element; MLM with visual clues + masked RoI
    # modelling (feature regression: no detector labels; MRC given labels); no sentence-image task.
    "vlbert": {"region_input": "vlbert", "mlm_weight": 1.0, "itm_weight": 0.0, "region_feat_weight": 1.0,
               "region_label_weight": 1.0, "wra_weight": 0.0, "conditional_masking": False,
               "region_loss": "mse"},
    # Alberti et al. 2019: whole-image feature fused into the words; matching (+ MLM).
    "b2t2": {"region_input": "visualbert", "early_fusion": True, "mlm_weight": 1.0, "itm_weight": 1.0,
             "region_feat_weight": 0.0, "region_label_weight": 0.0, "wra_weight": 0.0,
             "conditional_masking": False},
    # Li et al. 2020 (Unicoder-VL): 5-d locations; MLM + masked object modelling (regression without
    # detector labels) + visual-linguistic matching, in one pass.
    "unicoder_vl": {"region_input": "unicoder", "mlm_weight": 1.0, "itm_weight": 1.0,
                    "region_feat_weight": 1.0, "region_label_weight": 1.0, "wra_weight": 0.0,
                    "conditional_masking": False, "region_loss": "mse"},
}


def variant_config(name: str, **overrides: Any) -> SingleStreamConfig:
    """The config of variant ``name`` with ``overrides`` (sizes, rates, weights)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown single-stream variant {name!r}; known: {sorted(VARIANTS)}")
    return SingleStreamConfig(**({"variant": name} | VARIANTS[name] | overrides))


# ----------------------------------------------------------------------------------------------
# region inputs


def uniter_location(boxes: torch.Tensor) -> torch.Tensor:
    """UNITER's 7-d location from normalised ``(x1, y1, x2, y2)`` (..., 4): corners, width, height, area."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)                      # (..., 7)


def geometry_embedding(boxes: torch.Tensor, dim: int) -> torch.Tensor:
    """VL-BERT's ``geo(b)`` (..., dim) of normalised ``(x1, y1, x2, y2)`` (..., 4): per corner ``p``,
    ``sin(100 p / 1000^(j/n))`` for ``j < n = dim / 8``, then the cosines (module docstring)."""
    n = dim // 8
    wavelength = 1000.0 ** (torch.arange(n, dtype=boxes.dtype, device=boxes.device) / n)    # (n,)
    angle = 100 * boxes[..., None] / wavelength                                     # (..., 4, n)
    return torch.cat([angle.sin(), angle.cos()], -1).flatten(-2)                    # (..., 8n)


class VisualBertRegions(nn.Module):
    """``LN_text(W_f f + pos_v(0) + seg_v(1))`` (the text's LayerNorm and dropout, passed in)."""

    def __init__(self, cfg: SingleStreamConfig) -> None:
        super().__init__()
        self.feat = nn.Linear(cfg.visual_feat_dim, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type = nn.Embedding(max(cfg.type_vocab_size, 2), cfg.hidden_size)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, text: TextEmbeddings,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        x = self.feat(features) + self.position.weight[0] + self.token_type.weight[1]  # (B, R, D)
        return text.dropout(text.norm(x))


class UniterRegions(nn.Module):
    """``LN(LN(W_f f') + LN(W_l loc) + seg_t(1))``, ``f' = f + m`` at masked regions (``m`` learnt)."""

    def __init__(self, cfg: SingleStreamConfig) -> None:
        super().__init__()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.feat = nn.Linear(cfg.visual_feat_dim, D)
        self.feat_norm = nn.LayerNorm(D, eps=eps)
        self.location = nn.Linear(7, D)
        self.location_norm = nn.LayerNorm(D, eps=eps)
        self.norm = nn.LayerNorm(D, eps=eps)
        self.mask_vector = nn.Parameter(torch.zeros(cfg.visual_feat_dim))

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, text: TextEmbeddings,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        if masked is not None:
            features = features + masked[..., None].to(features.dtype) * self.mask_vector  # (B, R, F)
        loc = uniter_location(boxes.to(features.dtype))                             # (B, R, 7)
        x = self.feat_norm(self.feat(features)) + self.location_norm(self.location(loc))
        return text.dropout(self.norm(x + text.token_type.weight[1]))               # (B, R, D)


class VLBertRegions(nn.Module):
    """VL-BERT's ``LN_text(img + v(f, b) + seg_t(1))``, ``v(f, b) = W_a f + W_g geo(b) + c`` (the
    visual feature embedding, also added to the words: :meth:`SingleStream.text_visual`)."""

    def __init__(self, cfg: SingleStreamConfig) -> None:
        super().__init__()
        self.geometry_dim = cfg.geometry_dim
        self.feat = nn.Linear(cfg.visual_feat_dim, cfg.hidden_size)                 # W_a, c
        self.geometry = nn.Linear(cfg.geometry_dim, cfg.hidden_size, bias=False)    # W_g
        self.img = nn.Embedding(1, cfg.hidden_size)      # [IMG] token + the one visual position

    def visual(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        geo = geometry_embedding(boxes.to(features.dtype), self.geometry_dim)       # (..., G)
        return self.feat(features) + self.geometry(geo)                             # (..., D)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, text: TextEmbeddings,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        x = self.img.weight[0] + self.visual(features, boxes) + text.token_type.weight[1]
        return text.dropout(text.norm(x))                                           # (B, R, D)


class UnicoderRegions(nn.Module):
    """Unicoder-VL's ``LN(W_f f + W_l loc5 + c)`` (module docstring), its own LN; the text's dropout."""

    def __init__(self, cfg: SingleStreamConfig) -> None:
        super().__init__()
        self.feat = nn.Linear(cfg.visual_feat_dim, cfg.hidden_size)                 # W_f, c
        self.location = nn.Linear(5, cfg.hidden_size, bias=False)                   # W_l
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, text: TextEmbeddings,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        loc = location_features(boxes.to(features.dtype))                            # (B, R, 5)
        return text.dropout(self.norm(self.feat(features) + self.location(loc)))    # (B, R, D)


# ----------------------------------------------------------------------------------------------
# the model


class SingleStreamOutput(NamedTuple):
    text: torch.Tensor      # (B, L, D) outputs at the text positions
    media: torch.Tensor     # (B, R, D) outputs at the regions
    pooled: torch.Tensor    # (B, D) tanh(W h_[CLS] + b)


class SingleStream(nn.Module):
    """One transformer over ``[text ; regions]`` with its pretraining heads (module docstring).

    Inputs: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``features`` (B, R, F), ``boxes``
    (B, R, 4), ``region_mask`` (B, R) (1 on real regions; None: all), ``token_type_ids`` (B, L)."""

    def __init__(self, config: SingleStreamConfig) -> None:
        super().__init__()
        self.config = cfg = config
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = TextEmbeddings(cfg)
        self.regions = {"visualbert": VisualBertRegions, "uniter": UniterRegions,
                        "vlbert": VLBertRegions, "unicoder": UnicoderRegions}[cfg.region_input](cfg)
        self.fusion = nn.Linear(cfg.visual_feat_dim, D) if cfg.early_fusion else None  # B2T2's M, m
        self.layers = nn.ModuleList(TransformerLayer(**block_sizes(cfg)) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(D, D)
        self.mlm_head = MLMHead(self.embeddings.word, D, eps)                        # tied
        self.region_transform = nn.Sequential(nn.Linear(D, D), activation(cfg.hidden_act),
                                              nn.LayerNorm(D, eps=eps))
        self.region_feat_bias = nn.Parameter(torch.zeros(cfg.visual_feat_dim))      # decoder: W_f^T (tied)
        self.region_label = (nn.Sequential(nn.Linear(D, D), activation(cfg.hidden_act),
                                           nn.LayerNorm(D, eps=eps), nn.Linear(D, cfg.num_region_labels))
                             if cfg.num_region_labels else None)                    # MRC: its own transform
        self.itm = nn.Linear(D, 1)
        P = cfg.contrastive_dim or D
        self.text_proj, self.media_proj = nn.Linear(D, P), nn.Linear(D, P)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation; the MLM and MRFR biases zero; UNITER's mask vector normal(0, std)
        (its ``mask_embedding`` row); InfoNCE's scale log(1/temperature)."""
        init_bert_weights(self, self.config.initializer_range)
        nn.init.zeros_(self.mlm_head.bias)
        nn.init.zeros_(self.region_feat_bias)
        if isinstance(self.regions, UniterRegions):
            nn.init.normal_(self.regions.mask_vector, std=self.config.initializer_range)
        nn.init.constant_(self.logit_scale, math.log(1 / self.config.temperature))

    # -- encoder --

    def embed_text(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                   visual: torch.Tensor | None = None) -> torch.Tensor:
        """``LN(word + pos + seg [+ visual])`` (B, L, D); ``visual`` (B, 1, D): :meth:`text_visual`."""
        x = self.text_sum(input_ids, token_type_ids)                                 # (B, L, D)
        return self.embeddings.dropout(self.embeddings.norm(x if visual is None else x + visual))

    def text_sum(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``word + pos + seg`` before the LayerNorm (B, L, D)."""
        e = self.embeddings
        seg = e.token_type.weight[0] if token_type_ids is None else e.token_type(token_type_ids)
        return e.word(input_ids) + e.position.weight[:input_ids.shape[1]] + seg     # (B, L, D)

    @property
    def image_on_words(self) -> bool:
        """Whether the words' embeddings depend on the image (VL-BERT, B2T2)."""
        return self.config.region_input == "vlbert" or self.fusion is not None

    def text_visual(self, features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor | None,
                    masked: torch.Tensor | None = None) -> torch.Tensor | None:
        """What the image adds to every word before the LN (B, 1, D), None for VisualBERT / UNITER:
        VL-BERT's ``v(f_img, (0, 0, 1, 1))`` and / or B2T2's ``M f_img + m`` (module docstring)."""
        if not self.image_on_words:
            return None
        f = image_feature(features.to(self.regions.feat.weight.dtype), region_mask, masked,
                          self.config.global_token)                                  # (B, F)
        v = 0
        if self.config.region_input == "vlbert":
            whole = torch.tensor(WHOLE_IMAGE, dtype=f.dtype, device=f.device)
            v = self.regions.visual(f, whole.expand(len(f), 4))                      # (B, D)
        if self.fusion is not None:
            v = v + self.fusion(f)                                                   # (B, D)
        return v[:, None]                                                            # (B, 1, D)

    def embed_media(self, features: torch.Tensor, boxes: torch.Tensor,
                    masked: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.regions.feat.weight.dtype   # features are stored float16
        return self.regions(features.to(dtype), boxes, self.embeddings, masked)     # (B, R, D)

    def encode(self, text: torch.Tensor | None, text_mask: torch.Tensor | None, media: torch.Tensor | None,
               media_mask: torch.Tensor | None) -> torch.Tensor:
        """The layers over ``[text ; media]`` (either may be None: one modality alone), (B, S, D)."""
        parts = [(x, m) for x, m in ((text, text_mask), (media, media_mask)) if x is not None]
        x = torch.cat([p for p, _ in parts], 1)                                      # (B, L+R, D)
        masks = [torch.ones(p.shape[:2], dtype=torch.bool, device=p.device) if m is None else m.bool()
                 for p, m in parts]
        mask = key_mask(torch.cat(masks, 1))                                         # (B, 1, 1, L+R)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))                                # (B, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, features: torch.Tensor,
                boxes: torch.Tensor, region_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                masked_regions: torch.Tensor | None = None) -> SingleStreamOutput:
        L = input_ids.shape[1]
        visual = self.text_visual(features, boxes, region_mask, masked_regions)      # (B, 1, D) | None
        h = self.encode(self.embed_text(input_ids, token_type_ids, visual), attention_mask,
                        self.embed_media(features, boxes, masked_regions), region_mask)  # (B, L+R, D)
        return SingleStreamOutput(h[:, :L], h[:, L:], self.pool(h))

    # -- retrieval: cross-encoder score and dual-encoder vectors --

    @property
    def has_match_head(self) -> bool:
        return bool(self.config.itm_weight)

    def match_score(self, text_batch: Mapping[str, torch.Tensor],
                    media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """ITM logit (B,) of pair ``(text_batch[i], media_batch[i])``; ``sigmoid`` is P(match)."""
        out = self(text_batch["input_ids"], text_batch.get("attention_mask"), media_batch["features"],
                   media_batch["boxes"], media_batch.get("region_mask"), text_batch.get("token_type_ids"))
        return self.itm(out.pooled).squeeze(-1)

    def text_states(self, text_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, L, D) embedded text, "mask": (B, L)}`` (the only text-alone part; before
        the LayerNorm when the image adds to the words, :attr:`image_on_words`)."""
        ids, tt, attn = (text_batch.get(k) for k in ("input_ids", "token_type_ids", "attention_mask"))
        attn = torch.ones_like(ids) if attn is None else attn
        states = self.text_sum(ids, tt) if self.image_on_words else self.embed_text(ids, tt)
        return {"states": states, "mask": attn}

    def media_states(self, media_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"states": (B, R, D) embedded regions, "mask": (B, R)}``, and ``"visual"`` (B, 1, D),
        the words' image term, when :attr:`image_on_words`."""
        f, rm, boxes = media_batch["features"], media_batch.get("region_mask"), media_batch["boxes"]
        rm = torch.ones(f.shape[:2], dtype=torch.long, device=f.device) if rm is None else rm
        out = {"states": self.embed_media(f, boxes), "mask": rm}
        return out | ({"visual": self.text_visual(f, boxes, rm)} if self.image_on_words else {})

    def score_states(self, text: Mapping[str, torch.Tensor],
                     media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`match_score` from :meth:`text_states` and :meth:`media_states` of the pairs (B,)."""
        t, e = text["states"], self.embeddings
        if self.image_on_words:
            t = e.dropout(e.norm(t + media["visual"][:, :1]))                        # (B, L, D)
        h = self.encode(t, text["mask"], media["states"], media["mask"])
        return self.itm(self.pool(h)).squeeze(-1)

    def encode_text(self, text_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit text vectors (B, P): the transformer over the text alone (no image term on the words),
        pooled and projected."""
        attn = text_batch.get("attention_mask")
        h = self.encode(self.embed_text(text_batch["input_ids"], text_batch.get("token_type_ids")), attn,
                        None, None)                                                  # (B, L, D)
        return F.normalize(self.text_proj(pool(h, attn, first=self.config.text_pool == "cls")), dim=-1)

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unit media vectors (B, P): the transformer over the regions alone, mean-pooled (or the
        global token), projected."""
        rm = media_batch.get("region_mask")
        h = self.encode(None, None, self.embed_media(media_batch["features"], media_batch["boxes"]), rm)
        return F.normalize(self.media_proj(pool(h, rm, first=self.config.global_token)), dim=-1)

    # -- pretraining --

    def masked_inputs(self, batch: Mapping[str, torch.Tensor], text_index: torch.Tensor, regions: bool,
                      generator: torch.Generator | None = None) -> Masking:
        """:func:`fusion.models.single_stream_objectives.masked_inputs` with this model's config."""
        return masked_inputs(self.config, batch, text_index, regions, generator)

    def _masked_losses(self, out: SingleStreamOutput, m: Masking, batch: Mapping[str, torch.Tensor],
                       keep: torch.Tensor, labels_on: bool, losses: dict, weights: dict) -> None:
        masked_losses(self, out, m, batch, keep, labels_on, losses, weights)

    def _match_losses(self, out: SingleStreamOutput, attn: torch.Tensor, region_mask: torch.Tensor,
                      matched: torch.Tensor, losses: dict, weights: dict) -> None:
        match_losses(self, out, attn, region_mask, matched, losses, weights)

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"mlm", ["region_feat"], ["region_label"], "itm", ["wra"], ["contrastive"], "total"}``
        (objectives with weight 0 left out); total = the weighted sum. ``batch``: the
        :meth:`forward` inputs plus optionally ``special_tokens_mask`` and ``region_labels`` ((B, R)
        ids or (B, R, C) distributions). ``generator`` must live on the batch's device. The passes:
        :func:`fusion.models.single_stream_objectives.pretraining_loss`."""
        return pretraining_loss(self, batch, generator)

    def num_parameters(self, encoder_only: bool = False) -> int:
        return sum(p.numel() for n, p in self.named_parameters()
                   if not (encoder_only and n.startswith(HEADS)))

    def __repr__(self) -> str:
        c = self.config
        return summary(self, variant=c.variant, hidden_size=c.hidden_size, num_heads=c.num_heads,
                       num_layers=c.num_layers, visual_feat_dim=c.visual_feat_dim,
                       region_input=c.region_input, vocab_size=c.vocab_size)
