"""Losses: pure functions with stated shapes, one definition each."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latent_sft_core.layout import IGNORE_INDEX
from latent_sft_core.masks import Role


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL under the causal shift.

    logits [B, T, V], labels [B, T] (IGNORE_INDEX where unsupervised) -> nll [B, T] (fp32), where nll[b, p] is
    the loss of predicting labels[b, p] from position p - 1; 0 at p = 0 and at ignored labels.
    """
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return torch.cat([torch.zeros_like(nll[:, :1]), nll], dim=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, T] over ``mask`` [B, T] (bool); 0 (with a gradient path) when the mask is empty."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


def supervision_loss(logits: torch.Tensor, labels: torch.Tensor, roles: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_sup of phase 1: token-mean NLL over every supervised position (chunk tokens, ``</think>``, answer, end).

    logits [B, T, V], labels [B, T], roles [B, T] -> {"loss", "chunk_loss", "answer_loss"} scalars; the two
    components (chunk tokens / answer side) are for logging, ``loss`` is the flat mean the reference trains.
    """
    nll = token_nll(logits, labels)
    supervised = labels != IGNORE_INDEX
    return {
        "loss": masked_mean(nll, supervised),
        "chunk_loss": masked_mean(nll, supervised & (roles == Role.CHUNK)).detach(),
        "answer_loss": masked_mean(nll, supervised & (roles == Role.ANSWER)).detach(),
    }
