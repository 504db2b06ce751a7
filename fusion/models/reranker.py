"""A listwise re-ranker: an LXMERT cross-encoder trained to order a dual encoder's candidates.

Not one paper's model: it puts together three published ideas so that a cross-encoder adds to its
first stage instead of starting from nothing (a binary matching head on uniform negatives stays at
ln 2 on the emoji set; BENCHMARKS.md, issue 28):

* **Align before fuse** (ALBEF, Li et al. 2021, "Align before Fuse", arXiv:2107.07651): the
  single-modality encoders start aligned. Here they start as a trained dual encoder's (the
  ``fusion.pretrain`` recipe ``dual``: LXMERT's language and object-relationship encoders with
  no cross layers): :meth:`ListwiseReranker.load_first_stage`.
* **Hard negatives from the first stage** (DPR, Karpukhin et al. 2020, arXiv:2004.04906; ANCE,
  Xiong et al. 2021, arXiv:2007.00808): each training group is a caption's item and the ``n - 1``
  training items the dual encoder ranks highest for it (a ``fusion.retrieval`` run on the train
  split), i.e. the candidates the re-ranker must later tell apart.
* **Listwise training on a group** (the localized contrastive estimation of Gao, Dai & Callan
  2021, "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline", arXiv:2101.08751):
  a softmax over the group's candidates instead of a per-pair binary label.

**Score.** The cross-modality layers (``x_layers``, new) read the two single-stream outputs
``H^L`` (B, L, D) and ``H^V`` (B, R, D); the pair's score is the cosine of the dual encoder's
projections of the *cross-encoded* outputs, scaled by the dual encoder's learned temperature::

    (X^L, X^V) = Cross(H^L, H^V)
    s(t, m) = min(exp(logit_scale), 100) * cos(W_t mean(X^L), W_m pool(X^V))

A cross layer is post-LayerNorm residual (``LN(x + f(x))``) with BERT's small initialisation, so
before training ``X ~ H`` and ``s`` is close to the dual encoder's own score: the cross layers learn
a correction of the first stage's ranking, not a ranking from scratch.

**Loss.** A batch is ``G`` groups of ``n`` items (position 0 the anchor, then its hard negatives),
each item with one caption: ``B = G n`` texts and media. Every text is scored against every medium
of its group, ``S_g`` (n, n), and the loss is the softmax cross-entropy of the matched pairs in
both directions, with several positives where two texts or two media are the same::

    L_list = -1/(2Gn) sum_g sum_i [ log sum_{j in P_g(i)} softmax(S_g[i, :])_j
                                   + log sum_{j in P_g(i)} softmax(S_g[:, i])_j ]

beside the dual encoder's symmetric in-batch InfoNCE on the single streams over all ``B`` pairs
(same positives rule; ``contrastive_weight``), which keeps them aligned as its own first stage:
``L = w_list L_list + w_c L_c``. Retrieval: ``text_states`` / ``media_states`` are the single
streams (once per caption / item), ``score_states`` is ``s`` of each pair.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import nn

from fusion.models.lxmert import Lxmert
from fusion.models.objectives import multi_positive_ce

# The first stage's parameters (a dual encoder's state dict holds them under these names); the
# cross layers and the unused pretraining heads are new.
STREAMS = ("embeddings.", "l_layers.", "visual_embedding.", "r_layers.", "text_proj.", "media_proj.",
           "logit_scale")


@dataclasses.dataclass
class RerankerConfig:
    listwise_weight: float = 1.0
    contrastive_weight: float = 1.0      # the single streams' InfoNCE (their own first stage)
    stream_lr_scale: float = 0.2         # lr of the loaded streams relative to the cross layers; 0: frozen

    def __post_init__(self) -> None:
        if self.listwise_weight == 0 and self.contrastive_weight == 0:
            raise ValueError("listwise_weight and contrastive_weight are both 0: nothing to train")
        if self.stream_lr_scale == 0 and self.contrastive_weight:
            raise ValueError("frozen streams (stream_lr_scale 0) leave the contrastive loss nothing to "
                             "train: set contrastive_weight 0")


def positives(keys: torch.Tensor, group: int) -> torch.Tensor:
    """(G, n, n) bool: pair (i, j) of a group is a positive when the keys of i and j agree (the same
    item, or the same caption text). ``keys`` (G * n,) int64."""
    k = keys.view(-1, group)
    return k[:, :, None] == k[:, None, :]


class ListwiseReranker(nn.Module):
    """See the module docstring. ``encoder``: the LXMERT whose streams, projections and cross
    layers score pairs (its ITM and masked-modelling heads are not used)."""

    def __init__(self, encoder: Lxmert, config: RerankerConfig) -> None:
        super().__init__()
        if encoder.config.x_layers < 1:
            raise ValueError("a re-ranker needs at least one cross-modality layer (x_layers >= 1)")
        self.encoder = encoder
        self.config = config
        if config.stream_lr_scale == 0:   # the first stage's streams as they are: only the cross layers learn
            for name, p in encoder.named_parameters():
                if name.startswith(STREAMS):
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ListwiseReranker":
        """Frozen streams stay in evaluation mode (no dropout) while the cross layers train: they
        then feed the cross layers what they feed them when re-ranking."""
        super().train(mode)
        if self.config.stream_lr_scale == 0:
            for name, module in self.encoder.named_modules():
                if name and f"{name}.".startswith(STREAMS):
                    module.eval()
        return self

    def scale(self) -> torch.Tensor:
        """``s`` = 1 / temperature, capped at 100 as the dual encoder's (CLIP's cap)."""
        return self.encoder.logit_scale.clamp(max=math.log(100.0)).exp()

    # -- the first stage's weights and the optimiser's groups --

    def load_first_stage(self, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
        """Copy a dual encoder's single streams, projections and temperature (``STREAMS``) from
        ``state`` (its state dict); every one of them must be there with this model's shape.
        Returns the names copied."""
        own = self.encoder.state_dict()
        wanted = [k for k in own if k.startswith(STREAMS)]
        missing = [k for k in wanted if k not in state]
        wrong = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            raise ValueError(f"{source} is not a dual encoder of this shape: missing {missing[:4]}, "
                             f"other shapes {wrong[:4]}")
        self.encoder.load_state_dict({k: state[k] for k in wanted}, strict=False)
        return wanted

    def param_groups(self, lr: float) -> list[dict]:
        """AdamW groups: the cross layers at ``lr``, the loaded streams at ``lr * stream_lr_scale``
        (none when they are frozen)."""
        streams, new = [], []
        for name, p in self.encoder.named_parameters():
            if p.requires_grad:
                (streams if name.startswith(STREAMS) else new).append(p)
        groups = [{"params": new, "lr": lr}, {"params": streams, "lr": lr * self.config.stream_lr_scale}]
        return [g for g in groups if g["params"]]

    # -- retrieval --

    @property
    def has_match_head(self) -> bool:
        return True

    def encode_text(self, text_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder.encode_text(text_batch)                                   # (B, P)

    def encode_media(self, media_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder.encode_media(media_batch)                                 # (B, P)

    def text_states(self, text_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.encoder.text_states(text_batch)

    def media_states(self, media_batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.encoder.media_states(media_batch)

    def score_states(self, text: Mapping[str, torch.Tensor],
                     media: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``s(t, m)`` (B,) of pairs from :meth:`text_states` and :meth:`media_states`."""
        enc = self.encoder
        lang, vis = enc.cross(text["states"], text["mask"], media["states"], media["mask"])
        t = enc._text_vector(lang, text["mask"])                                     # (B, P)
        m = enc._media_vector(vis, media["mask"])                                    # (B, P)
        return (t * m).sum(-1) * self.scale()                                        # (B,)

    # -- training --

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"listwise", "contrastive", "total"}`` on a batch of ``group``-sized groups: ``input_ids``,
        ``attention_mask`` (B, L); ``features`` (B, R, F), ``boxes`` (B, R, 4), ``region_mask``
        (B, R); ``media_key``, ``text_key`` (B,) int64 (equal keys: the same item / caption);
        ``group`` (n, a plain int)."""
        enc, cfg, n = self.encoder, self.config, int(batch["group"])
        B = batch["input_ids"].shape[0]
        if B % n:
            raise ValueError(f"a batch of {B} pairs is not whole groups of {n}")
        G = B // n
        text = enc.text_states(batch)
        media = enc.media_states({"features": batch["features"].to(torch.float32),
                                  "boxes": batch["boxes"], "region_mask": batch["region_mask"]})
        # every (text, medium) pair inside each group: G * n * n cross passes
        g = torch.arange(G, device=batch["input_ids"].device).repeat_interleave(n * n)
        a = torch.arange(n, device=g.device).repeat_interleave(n).repeat(G)
        b = torch.arange(n, device=g.device).repeat(n * G)
        scores = self.score_states({k: v[g * n + a] for k, v in text.items()},
                                   {k: v[g * n + b] for k, v in media.items()}).view(G, n, n)
        pos = positives(batch["media_key"], n) | positives(batch["text_key"], n)     # (G, n, n)
        out: dict[str, torch.Tensor] = {}
        total = scores.new_zeros(())
        if cfg.listwise_weight:
            out["listwise"] = (multi_positive_ce(scores.reshape(B, n), pos.reshape(B, n))
                               + multi_positive_ce(scores.transpose(1, 2).reshape(B, n),
                                                   pos.transpose(1, 2).reshape(B, n))) / 2
            total = total + cfg.listwise_weight * out["listwise"]
        if cfg.contrastive_weight:
            t = enc._text_vector(text["states"], text["mask"])                       # (B, P)
            m = enc._media_vector(media["states"], media["mask"])                    # (B, P)
            logits = self.scale() * t @ m.T                                          # (B, B)
            same = (positives(batch["media_key"], B) | positives(batch["text_key"], B))[0]   # (B, B)
            out["contrastive"] = (multi_positive_ce(logits, same) + multi_positive_ce(logits.T, same.T)) / 2
            total = total + cfg.contrastive_weight * out["contrastive"]
        out["total"] = total
        return out

    def num_parameters(self, encoder_only: bool = False) -> int:
        return self.encoder.num_parameters(encoder_only)
