"""SpeechBERT: spoken audio and text in ONE single-stream BERT.

Chuang, Liu, Lee & Lee 2020, "SpeechBERT: An Audio-and-text Jointly Learned Language Model for
End-to-end Spoken Question Answering", Interspeech (arXiv:1910.11559). The paper's pipeline:

1. *Audio tokens.* The speech is cut into spoken words (forced alignment); each word segment ``x``
   (MFCC frames) is embedded by an Audio Word2Vec encoder (a sequence-to-sequence autoencoder,
   Chung et al. 2016), ``z = Enc(x)``, trained to reconstruct its segment.
2. *Initial phonetic-semantic joint embedding.* ``z`` is mapped onto BERT's word-embedding space:
   the encoder is trained so that a spoken word's vector lies close (an L1 distance) to the
   embedding of the word it says, so that text and audio tokens start in one space.
3. *Pretraining.* One BERT reads ``[CLS] text [SEP] audio tokens``, each element its token (or
   audio) embedding plus a position and a segment embedding, with masked language modelling over
   both parts; then fine-tuning for spoken question answering.

What stele does, and where it differs (the model is :class:`~fusion.models.single_stream.SingleStream`
with another input for its media and the media pooled into segments; nothing of the transformer,
the heads or the objectives is re-implemented here):

* **Segments.** stele's speech features (:mod:`speech.features`) are frames with time spans, not
  word segments, and no forced alignment is at hand. The audio tokens are *fixed-length* segments:
  ``k = segment_frames`` consecutive real frames averaged (a documented choice standing in for the
  paper's word segments; with 40 ms frames the default k = 8 is 320 ms, about a short word), the
  segment's span the union of its frames' spans. A global token (region 0 of a ``global_token``
  artifact) stays a token of its own, in front::

      s_j = (1 / n_j) sum_{t in seg j} m_t f_t,   n_j = sum_{t in seg j} m_t      (B, S, F)
      S = ceil(R / k)  (R frames after the global token);  span_j = (min start, 0, max end, 1)

* **Audio embedding** (steps 1 and 2 in one linear map ``W_a``, learnt end to end: stele has no
  word-level labels for the L1 joint-embedding stage, so the in-batch InfoNCE on the two
  single-modality passes aligns the spaces instead, as every single-stream recipe here does)::

      e_t = LN(word(w_t) + pos(t) + seg(0))                              text, BERT's own
      e_j = LN(W_a s_j + b_a + pos(j) + seg(1))                          audio token j   (B, S, D)
      H   = Transformer([e_1..e_L ; e_1..e_S])                                           (B, L+S, D)

  One embedding LayerNorm, position table and segment table, the text backbone's: the audio
  tokens are ordered in time, so unlike regions they take positions (counted from 0 in the audio
  part, so that the media alone is encoded as it is inside the pair, for retrieval).
* **Objectives.** MLM on the text (15%, 80/10/10); *masked acoustic modelling* (MAM): 15% of the
  real audio tokens are zeroed and the output there regresses the segment's mean frame through
  the tied decoder of UNITER's MRFR, ``s_hat = W_a^T g(h_j) + c``, by default with smooth L1
  (equal to L1 where ``|error| > 1``, the scale of log-mel errors; ``region_loss: mse`` for L2).
  The paper masks spoken words and predicts the words they say, which needs the word alignment
  stele lacks; reconstruction (Mockingjay's, Liu et al. 2020, from the same lab) is what the
  features allow. Not in the paper, for stele's retrieval protocol: a matching head (ITM, 50%
  mismatched pairs, masked losses on matched pairs only) gives the pair score, and the recipe adds
  the InfoNCE whose vectors are the dual-encoder first stage (``itm_weight: 0`` and
  ``contrastive_weight: 0`` for the paper's two objectives).

Inputs everywhere are the feature artifact's frames (``features`` (B, R, F), ``boxes`` (B, R, 4),
``region_mask`` (B, R)); :meth:`SpeechBert.segments` pools them on the way in, so retrieval
(:mod:`fusion.retrieval.scorer`) and the spoken cloze (:mod:`fusion.pretrain.speech_recipes`) call
the model as they call any single-stream one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fusion.models.backbone import TextBackbone
from fusion.models.hf_visualbert import single_stream_backbone
from fusion.models.layers import init_bert_weights, summary
from fusion.models.lxmert import TextEmbeddings
from fusion.models.single_stream import SingleStream, SingleStreamConfig, SingleStreamOutput
from fusion.models.single_stream_objectives import pretraining_loss

# the single-stream fields a SpeechBERT config may not change (its audio input is its own)
_PINNED = {"variant": "speechbert", "region_input": "visualbert", "early_fusion": False}
# what single_stream_backbone reads off the backbone (sizes, activation, dropout, special ids)
FROM_BACKBONE = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_layers", "max_position",
                 "type_vocab_size", "hidden_act", "layer_norm_eps", "dropout", "attention_dropout",
                 "initializer_range", "pad_token_id", "mask_token_id")


@dataclasses.dataclass
class SpeechBertConfig(SingleStreamConfig):
    """:class:`SingleStreamConfig` plus ``segment_frames``; defaults are SpeechBERT's objectives.

    ``region_input`` only names the module :class:`SingleStream` builds before :class:`SpeechBert`
    puts its audio input (:class:`AudioSegments`) in its place; it is pinned."""

    variant: str = "speechbert"
    segment_frames: int = 8              # k: frames averaged into one audio token
    region_feat_weight: float = 1.0      # MAM
    region_loss: str = "smooth_l1"
    itm_weight: float = 1.0              # not in the paper: the pair score for retrieval

    def __post_init__(self) -> None:
        for field, value in _PINNED.items():
            if getattr(self, field) != value:
                raise ValueError(f"SpeechBERT's {field} is fixed to {value!r}, got {getattr(self, field)!r}")
        if self.segment_frames < 1:
            raise ValueError(f"segment_frames must be >= 1, got {self.segment_frames}")
        super().__post_init__()


def segment_pool(features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor | None, k: int,
                 global_token: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames -> fixed-length segments (module docstring): ``features`` (B, R, F), ``boxes`` (B, R, 4)
    time spans ``(start, 0, end, 1)``, ``region_mask`` (B, R) (None: all real) -> ``(features (B, S', F)
    float32, boxes (B, S', 4), mask (B, S') bool)``, ``S' = ceil(R' / k)`` (+1 for a global token,
    kept first as it is). Segment j averages the real frames among ``j k .. j k + k - 1``; a segment
    without one is padding (zeros)."""
    B, R, Fdim = features.shape
    mask = (torch.ones(B, R, dtype=torch.bool, device=features.device) if region_mask is None
            else region_mask.bool())
    head = int(global_token and R > 0)
    f, b, m = features[:, head:].float(), boxes[:, head:].float(), mask[:, head:]
    pad = -f.shape[1] % k
    if pad:
        f = torch.cat([f, f.new_zeros(B, pad, Fdim)], 1)
        b = torch.cat([b, b.new_zeros(B, pad, 4)], 1)
        m = torch.cat([m, m.new_zeros(B, pad)], 1)
    S = f.shape[1] // k
    w = m.reshape(B, S, k, 1).to(f.dtype)                                          # (B, S, k, 1)
    n = w.sum(2)                                                                   # (B, S, 1)
    seg = (f.reshape(B, S, k, Fdim) * w).sum(2) / n.clamp_min(1)                   # (B, S, F)
    real = n.squeeze(-1) > 0                                                       # (B, S)
    starts = b[..., 0].masked_fill(~m, float("inf")).reshape(B, S, k).amin(2)
    ends = b[..., 2].masked_fill(~m, float("-inf")).reshape(B, S, k).amax(2)
    span = torch.stack([starts, torch.zeros_like(starts), ends, torch.ones_like(starts)], -1)
    span = span.masked_fill(~real[..., None], 0)                                   # (B, S, 4)
    if head:
        seg = torch.cat([features[:, :1].float(), seg], 1)
        span = torch.cat([boxes[:, :1].float(), span], 1)
        real = torch.cat([mask[:, :1], real], 1)
    return seg, span, real


class AudioSegments(nn.Module):
    """``LN_text(W_a s_j + b_a + pos_text(j) + seg_text(1))`` (B, S, D): the text's LayerNorm, position
    and segment tables and dropout, passed in (module docstring)."""

    def __init__(self, cfg: SpeechBertConfig) -> None:
        super().__init__()
        self.feat = nn.Linear(cfg.visual_feat_dim, cfg.hidden_size)               # W_a, b_a (MAM ties W_a)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, text: TextEmbeddings,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        S = features.shape[1]
        if S > text.position.num_embeddings:
            raise ValueError(f"{S} audio tokens exceed the {text.position.num_embeddings} positions: "
                             f"raise segment_frames or cut the frames (max_regions)")
        x = self.feat(features) + text.position.weight[:S] + text.token_type.weight[1]  # (B, S, D)
        return text.dropout(text.norm(x))


class _OnSegments:
    """``model`` seen by :func:`~fusion.models.single_stream_objectives.pretraining_loss` after the
    batch was pooled: calling it and its ``encode_media`` read segments as they are (SingleStream's
    own methods), everything else is the model's."""

    def __init__(self, model: SpeechBert) -> None:
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> SingleStreamOutput:
        return SingleStream.forward(self._model, *args, **kwargs)

    def encode_media(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return SingleStream.encode_media(self._model, batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class SpeechBert(SingleStream):
    """SpeechBERT over text and a clip's frames (module docstring); the frames are pooled into
    audio tokens by :meth:`segments` in every entry point."""

    config: SpeechBertConfig

    def __init__(self, config: SpeechBertConfig) -> None:
        super().__init__(config)
        self.regions = AudioSegments(config)
        init_bert_weights(self.regions, config.initializer_range)

    def segments(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``batch`` with its frames (``features``, ``boxes``, ``region_mask``) pooled into audio
        tokens (:func:`segment_pool`); other keys as they are."""
        f, b, m = segment_pool(batch["features"], batch["boxes"], batch.get("region_mask"),
                               self.config.segment_frames, self.config.global_token)
        return {**batch, "features": f, "boxes": b, "region_mask": m}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, features: torch.Tensor,
                boxes: torch.Tensor, region_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                masked_regions: torch.Tensor | None = None) -> SingleStreamOutput:
        """:meth:`SingleStream.forward` over frames: text (B, L, D), audio tokens (B, S, D), pooled."""
        if masked_regions is not None:
            raise ValueError("SpeechBert masks audio tokens, not frames: loss() draws the masks")
        s = self.segments({"features": features, "boxes": boxes, "region_mask": region_mask})
        return super().forward(input_ids, attention_mask, s["features"], s["boxes"], s["region_mask"],
                               token_type_ids)

    def media_states(self, media_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return super().media_states(self.segments(media_batch))

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return super().encode_media(self.segments(media_batch))

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """:meth:`SingleStream.loss` on the pooled batch: ``{"mlm", "region_feat" (MAM), "itm",
        ["contrastive"], "total"}`` (objectives of weight 0 left out); masks are drawn over the audio
        tokens (never a global token nor padding)."""
        return pretraining_loss(_OnSegments(self), self.segments(batch), generator)

    def __repr__(self) -> str:
        c = self.config
        return summary(self, variant=c.variant, hidden_size=c.hidden_size, num_layers=c.num_layers,
                       audio_feat_dim=c.visual_feat_dim, segment_frames=c.segment_frames,
                       vocab_size=c.vocab_size)


def speechbert_backbone(backbone: TextBackbone, **config: Any) -> SpeechBert:
    """A :class:`SpeechBert` whose embeddings, layers and heads start as
    :func:`~fusion.models.hf_visualbert.single_stream_backbone` starts a single-stream model (the
    backbone's embeddings and layers, its sizes); the audio input starts random."""
    own = {f.name for f in dataclasses.fields(SpeechBertConfig)} - {f.name for f in
                                                                     dataclasses.fields(SingleStreamConfig)}
    base = single_stream_backbone(backbone, "visualbert", **{k: v for k, v in config.items() if k not in own})
    sized = {k: getattr(base.config, k) for k in FROM_BACKBONE}
    model = SpeechBert(SpeechBertConfig(**(config | sized)))
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in base.state_dict().items() if not k.startswith("regions.")}, strict=False)
    if unexpected or any(not k.startswith("regions.") for k in missing):
        raise ValueError(f"backbone weights do not fit SpeechBert: missing {missing}, "
                         f"unexpected {unexpected}")
    return model
