"""The transformer blocks the fusion encoders share: one multi-head attention, one feed-forward block,
the encoder layer made of the two, LXMERT's cross-modality layer (LXMERT and the two-media model),
the padding mask they read and BERT's initialisation.

Vaswani et al. (2017), "Attention Is All You Need", NeurIPS, section 3, in the post-LN form BERT
uses (Devlin et al. 2019): each sub-layer is followed by dropout, the residual and a LayerNorm::

    Attention:    x' = LN(x + W_o MHA(W_q x, W_k c, W_v c))     c = x (self) or the context
    MHA(Q, K, V)  = [head_1; ...; head_h],  head_i = softmax(Q_i K_i^T / sqrt(d_h)) V_i
    FeedForward:  x' = LN(x + W_2 act(W_1 x + b_1) + b_2)

    x (B, L, D), c (B, S, D_c), Q_i (B, L, d_h), K_i and V_i (B, S, d_h), d_h = inner width / h

LXMERT (Tan & Bansal 2019) and the two-media model use them with queries, keys and values of one
width; ViLBERT (Lu et al. 2019) with a context of another width and an attention width of its own
(its co-attention); ERNIE's entity stream with a mask of its own. Masks are SDPA's: bool, True where
a query may attend to a key, broadcastable to (B, H, L, S); :func:`key_mask` builds one from a
padding mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation of that name (``"gelu"``: BERT's exact erf GELU)."""
    from transformers.activations import ACT2FN  # lazy, as in backbone.py

    return ACT2FN[name]


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) padding mask, 1 on real positions -> (B, 1, 1, S) bool for SDPA (None: no padding).
    A row without any real key may attend to all of them: SDPA would give NaN on an all-False row,
    an additive mask (LXMERT's reference) gives uniform attention, and that is what this reproduces."""
    if mask is None:
        return None
    m = mask.bool()                                                                  # (B, S)
    m = m | ~m.any(1, keepdim=True)
    return m[:, None, None, :]                                                       # (B, 1, 1, S)


def block_sizes(cfg: Any) -> dict[str, Any]:
    """The arguments of :class:`TransformerLayer` and :class:`CrossLayer` from a model config with
    BERT's field names (``hidden_size``, ``num_heads``, ``intermediate_size``, ``hidden_act``,
    ``dropout``, ``attention_dropout``, ``layer_norm_eps``)."""
    return {"dim": cfg.hidden_size, "num_heads": cfg.num_heads, "intermediate": cfg.intermediate_size,
            "act": cfg.hidden_act, "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
            "eps": cfg.layer_norm_eps}


def summary(model: nn.Module, **fields: Any) -> str:
    """``Name(field=value, ..., parameters=N)``, the models' ``repr``."""
    n = sum(p.numel() for p in model.parameters())
    listed = ", ".join(f"{k}={v}" for k, v in fields.items())
    return f"{type(model).__name__}({listed}, parameters={n:,})"


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation of every Linear, Embedding and LayerNorm inside ``module``, in module
    order: weights normal(0, std), biases zero, a padding row zero, LayerNorms (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()


class Attention(nn.Module):
    """Multi-head attention, output projection, dropout, Add & LN (see the module docstring):
    queries from ``x`` (width ``dim``), keys and values from ``context`` (width ``context_dim``;
    ``x`` itself for self-attention), attention at width ``inner`` in ``num_heads`` heads.

    Two layouts of the same projections, fixed by the checkpoints that use them: ``fused`` (one
    ``qkv`` Linear, rows W_q; W_k; W_v; needs ``dim = context_dim = inner``; LXMERT, ERNIE) or
    ``query``, ``key``, ``value`` (any widths; ViLBERT). :meth:`both_ways` is LXMERT's
    cross-attention: ``x`` attends to ``y`` and ``y`` to ``x`` with the same weights; the two
    directions need ``W_qkv`` applied to both streams, so one matmul over the concatenated streams
    computes all four projections (and one more the output projection).
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None,
                 inner: int | None = None, fused: bool = True, dropout: float = 0.0,
                 attention_dropout: float = 0.0, eps: float = 1e-12) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        inner = dim if inner is None else inner
        if fused and not dim == context_dim == inner:
            raise ValueError(f"a fused qkv projection needs one width, got dim={dim}, "
                             f"context_dim={context_dim}, inner={inner}")
        if inner % num_heads:
            raise ValueError(f"attention width {inner} is not a multiple of its {num_heads} heads")
        self.num_heads = num_heads
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)                   # rows: query, key, value
        else:
            self.query = nn.Linear(dim, inner)
            self.key = nn.Linear(context_dim, inner)
            self.value = nn.Linear(context_dim, inner)
        self.out = nn.Linear(inner, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = attention_dropout

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, L, n * inner) -> (n, B, H, L, inner/H): ``n`` projections split into heads."""
        B, L, _ = x.shape
        return x.view(B, L, n, self.num_heads, -1).permute(2, 0, 3, 1, 4)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, inner) -> (B, H, L, inner/H)."""
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, -1).transpose(1, 2)

    def _project(self, x: torch.Tensor, context: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused and context is None:
            q, k, v = self._heads(self.qkv(x), 3)                                    # (B, H, L, d) each
            return q, k, v
        if self.fused:
            D = x.shape[-1]
            w, b = self.qkv.weight, self.qkv.bias
            k, v = self._heads(F.linear(context, w[D:], b[D:]), 2)                   # (B, H, S, d) each
            return self._split(F.linear(x, w[:D], b[:D])), k, v                      # q: (B, H, L, d)
        c = x if context is None else context
        return self._split(self.query(x)), self._split(self.key(c)), self._split(self.value(c))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        B, H, L, d = a.shape                                                         # (B, H, L, d)
        return a.transpose(1, 2).reshape(B, L, H * d)                                # (B, L, inner)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, L, dim) attends to ``context`` (B, S, context_dim), or to itself when None;
        ``mask`` says which keys each query may see (SDPA's bool mask; None: all)."""
        q, k, v = self._project(x, context)
        return self.norm(x + self.dropout(self.out(self._attend(q, k, v, mask))))   # (B, L, dim)

    def both_ways(self, x: torch.Tensor, x_mask: torch.Tensor | None, y: torch.Tensor,
                  y_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x attending to y, y attending to x)``, one set of (fused) weights; ``x_mask`` and
        ``y_mask`` are the key masks of ``x`` and ``y``. Both directions read the inputs."""
        if not self.fused:
            raise ValueError("both_ways needs the fused qkv layout (one width for both streams)")
        L = x.shape[1]
        xy = torch.cat([x, y], 1)                                                    # (B, L+R, D)
        qkv_x, qkv_y = self.qkv(xy).split([L, y.shape[1]], 1)                        # (B, L, 3D), (B, R, 3D)
        qx, kx, vx = self._heads(qkv_x, 3)                                           # (B, H, L, D/H)
        qy, ky, vy = self._heads(qkv_y, 3)                                           # (B, H, R, D/H)
        a = torch.cat([self._attend(qx, ky, vy, y_mask),                             # x attends to y
                       self._attend(qy, kx, vx, x_mask)], 1)                         # y attends to x
        out = self.norm(xy + self.dropout(self.out(a)))                              # (B, L+R, D)
        return out[:, :L], out[:, L:]


class FeedForward(nn.Module):
    """The position-wise feed-forward block (BERT's intermediate + output): dim -> inner -> dim,
    dropout, Add & LN: ``LN(x + W_2 act(W_1 x + b_1) + b_2)``; ``act`` names a transformers
    activation."""

    def __init__(self, dim: int, inner: int, act: str = "gelu", dropout: float = 0.0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.inner = nn.Linear(dim, inner)
        self.act = activation(act)
        self.out = nn.Linear(inner, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.out(self.act(self.inner(x)))))       # (B, L, dim)


class TransformerLayer(nn.Module):
    """One post-LN encoder layer, a BERT layer: self-attention, then the feed-forward block."""

    def __init__(self, dim: int, num_heads: int, intermediate: int, act: str = "gelu", *,
                 dropout: float = 0.0, attention_dropout: float = 0.0, eps: float = 1e-12,
                 fused: bool = True) -> None:
        super().__init__()
        self.attention = Attention(dim, num_heads, fused=fused, dropout=dropout,
                                   attention_dropout=attention_dropout, eps=eps)
        self.ffn = FeedForward(dim, intermediate, act, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.ffn(self.attention(x, mask))                                     # (B, L, dim)


class CrossLayer(nn.Module):
    """LXMERT's cross-modality layer (Tan & Bansal 2019, section 2.2), used by LXMERT and the
    two-media model: one cross-attention shared by both directions, then each stream's own
    self-attention and feed-forward block::

        l' = CrossAtt(l -> v),  v' = CrossAtt(v -> l)      the same weights; both read the inputs
        l'' = FFN_l(SelfAtt_l(l')),  v'' = FFN_v(SelfAtt_v(v'))
    """

    def __init__(self, dim: int, num_heads: int, intermediate: int, act: str = "gelu", *,
                 dropout: float = 0.0, attention_dropout: float = 0.0, eps: float = 1e-12) -> None:
        super().__init__()
        attention = dict(dropout=dropout, attention_dropout=attention_dropout, eps=eps)
        self.cross = Attention(dim, num_heads, **attention)     # ONE module: l -> v and v -> l
        self.lang_self = Attention(dim, num_heads, **attention)
        self.vis_self = Attention(dim, num_heads, **attention)
        self.lang_ffn = FeedForward(dim, intermediate, act, dropout, eps)
        self.vis_ffn = FeedForward(dim, intermediate, act, dropout, eps)

    def forward(self, lang: torch.Tensor, lang_mask: torch.Tensor | None, vis: torch.Tensor,
                vis_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``lang`` (B, L, D), ``vis`` (B, R, D) and their key masks (:func:`key_mask`)."""
        l2, v2 = self.cross.both_ways(lang, lang_mask, vis, vis_mask)                # (B, L, D), (B, R, D)
        l2 = self.lang_self(l2, lang_mask)
        v2 = self.vis_self(v2, vis_mask)
        return self.lang_ffn(l2), self.vis_ffn(v2)                                   # (B, L, D), (B, R, D)
