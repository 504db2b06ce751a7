"""Prediction heads shared by the fusion encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.objectives import IGNORE


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, then the word-embedding matrix (tied) plus a
    bias, so the output space is the input vocabulary (Devlin et al. 2019)."""

    def __init__(self, word_embeddings: nn.Embedding, hidden_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.word_embeddings = word_embeddings  # tied: shared with the encoder's input embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def reset_parameters(self, std: float) -> None:
        """BERT's initialisation of the head's own parts (the tied embeddings are the encoder's)."""
        nn.init.normal_(self.dense.weight, std=std)
        nn.init.zeros_(self.dense.bias)
        self.norm.reset_parameters()
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))                    # (N, D)
        return h @ self.word_embeddings.weight.T + self.bias         # (N, V)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at the labelled positions only (the others are never projected onto the
        vocabulary: that matmul is the largest of a small model)."""
        at = labels != IGNORE
        if not at.any():
            return hidden.sum() * 0.0  # keeps the graph connected for DDP
        return F.cross_entropy(self(hidden[at]).float(), labels[at])
