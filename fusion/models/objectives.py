"""Pretraining objectives shared by the fusion encoders.

Masked language modelling (Devlin et al. 2019, BERT): 15% of the maskable tokens are chosen; of
those, 80% become ``[MASK]``, 10% a random token, 10% stay as they are; the loss is the cross-entropy
of predicting the original token at the chosen positions only (label -100 elsewhere, PyTorch's
ignore index).
"""

from __future__ import annotations

import torch

IGNORE = -100


def mlm_mask(input_ids: torch.Tensor, maskable: torch.Tensor, mask_token_id: int, vocab_size: int,
             generator: torch.Generator | None = None, prob: float = 0.15,
             mask_share: float = 0.8, random_share: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(corrupted ids, labels)`` for MLM. ``maskable`` (bool, same shape) excludes special tokens
    and padding; labels are the original ids at chosen positions and ``IGNORE`` elsewhere."""
    def rand(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=input_ids.device)

    chosen = (rand(input_ids.shape) < prob) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    u = rand(input_ids.shape)
    to_mask = chosen & (u < mask_share)
    to_random = chosen & (u >= mask_share) & (u < mask_share + random_share)
    ids = input_ids.clone()
    ids[to_mask] = mask_token_id
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator,
                               device=input_ids.device)
    ids[to_random] = random_ids[to_random]
    return ids, labels
