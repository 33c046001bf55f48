"""The language-modelling loss: one definition for the trainer, the scripts and the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:]: logits (B, T, V) from tokens[:, :-1],
    tokens (B, T + 1). Computed in at least fp32 (bf16 logits lose the softmax's tail), in fp64
    for an fp64 model."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
