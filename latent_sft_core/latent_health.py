"""The collapse guard: is the encoder's alpha a superposition that carries its chunk, or one token repeated?

A collapsed phase 1 looks fine in every loss curve: the decoder learns to read whatever rides on the
probability tail, and stage 2 copies the near-constant latent perfectly. Seen on a fresh clone of the default
run: 1,402 of 1,458 validation latents put ~1.00 on the token ``-``, the rest on ``>>`` (2 distinct top-1
tokens, entropy 0.004 nats), and the "latent model" scored what extra forward passes give. So each phase-1
stage and the soft-label cache measure alpha over the rows they see:

* ``mean_entropy``: mean over latents of ``-sum_j alpha_j log alpha_j`` (nats, over alpha's support);
* ``distinct_top1``: how many different tokens are some latent's most probable token, and
  ``distinct_top1_fraction``: that count over the number of distinct tokens in the latents' chunks (the
  vocabulary the latents are about);
* ``mass_outside_top1``: mean of ``1 - max_j alpha_j``;
* ``chunk_ecr@K`` (the teacher's ECR@K): mean over latents of how many tokens of the latent's *own* chunk S_i
  sit among alpha_i's K most probable tokens (K = ``base.top_k``, every position of the chunk counted once);
* ``chunk_mass``: mean over latents of the probability alpha puts on its chunk's tokens.

A latent summarises the chain up to its chunk (induction mask), so a healthy one names tokens of its chunk.
Measured (c = 4, k = 10, validation rows; BENCHMARKS.md): healthy phase-1 runs have 83-100 distinct top-1
tokens out of 96-108 distinct chunk tokens (fraction 0.86-0.99) and put 0.19 (temperature 4) to 0.71
(temperature 1) of their mass on their chunk without the chunk anchor, 0.88-0.93 with it (the default); the collapse reported on another machine had 2 distinct top-1
tokens (fraction ~0.02) on ``-`` / ``>>``, and an encoder-only stage trained 4x longer here drifted to 10
(0.10) with 0.004 of its mass on its chunk. An 8-layer base at temperature 4 put 0.08 of alpha's mass on the
chunk, near-uniform over its ten tokens, with 53 distinct top-1 tokens: the phase-1 decoder then answered only
31% of the test questions from those latents. The guard flags a phase 1 as collapsed when

* ``distinct_top1_fraction < collapse_guard.min_distinct_top1_fraction`` (default 0.3: well clear of both
  regimes), or
* ``chunk_mass < collapse_guard.min_chunk_mass`` (default 0.1: a latent that gives its own chunk less than
  a tenth of its mass does not carry it, however many chunk tokens its tail lists; between the 0.08 of the
  31%-ceiling run and the 0.19 of the least concentrated healthy one).

Entropy alone is no criterion: a healthy run at temperature 1 has low entropy too (0.35 nats), its mass on
the chunk's key token. The hidden-state ablation has no alpha and is not checked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from latent_sft_core.chunking import ChunkedRow
from latent_sft_core.config import CollapseGuardParams, Params
from latent_sft_core.errors import PipelineError, loud_warning
from latent_sft_core.phase1_model import encode_rows
from latent_sft_core.soft_embedding import SparseAlpha
from latent_sft_core.text import SpecialIds

log = logging.getLogger(__name__)
DECIMALS = 4


class LatentCollapseError(PipelineError):
    """Phase 1's latents are degenerate and ``collapse_guard.on_collapse`` is ``error``."""


@dataclass
class AlphaHealth:
    """Accumulates alpha statistics over batches of latents (``update``), then judges them (``summary``)."""

    top_k: int  # K of chunk_ecr@K
    latents: int = 0
    entropy_sum: float = 0.0
    outside_top1_sum: float = 0.0
    chunk_hits_sum: float = 0.0
    chunk_mass_sum: float = 0.0
    top1_tokens: set[int] = field(default_factory=set)
    chunk_tokens: set[int] = field(default_factory=set)

    def update(self, alpha: SparseAlpha, chunks: list[list[int]]) -> None:
        """Add M latents: alpha ids/probs [M, k] (ids None: dense over the vocabulary) and each latent's own
        chunk (M lists of token ids, in the same order)."""
        probs = alpha.probs.float()
        if probs.shape[0] != len(chunks):
            raise ValueError(f"{probs.shape[0]} latents but {len(chunks)} chunks")
        if not chunks:
            return
        ids = alpha.ids if alpha.ids is not None else torch.arange(probs.shape[-1]).expand_as(probs)
        ranked_ids = ids.gather(-1, probs.argsort(dim=-1, descending=True))
        width = max(len(chunk) for chunk in chunks)
        chunk_ids = torch.tensor([chunk + [-1] * (width - len(chunk)) for chunk in chunks], device=ids.device)  # -1: none
        in_chunk = (ids[:, :, None] == chunk_ids[:, None, :]).any(-1)  # [M, k]: alpha's token is in the chunk
        in_top = (chunk_ids[:, :, None] == ranked_ids[:, None, : self.top_k]).any(-1)  # [M, c]: chunk token in top-K
        self.latents += len(chunks)
        self.entropy_sum += float(-torch.xlogy(probs, probs).sum())
        self.outside_top1_sum += float((1 - probs.max(-1).values).sum())
        self.chunk_hits_sum += float(in_top.sum())
        self.chunk_mass_sum += float((probs * in_chunk).sum())
        self.top1_tokens.update(ranked_ids[:, 0].tolist())
        self.chunk_tokens.update(token for chunk in chunks for token in chunk)

    def summary(self, guard: CollapseGuardParams) -> dict:
        """The statistics (module docstring), ``collapsed`` and the reasons, as JSON-able metrics."""
        if not self.latents:
            return {"latents": 0, "collapsed": False, "collapse_reasons": []}
        count = self.latents
        stats = {
            "latents": count,
            "mean_entropy": round(self.entropy_sum / count, DECIMALS),
            "distinct_top1": len(self.top1_tokens),
            "distinct_chunk_tokens": len(self.chunk_tokens),
            "distinct_top1_fraction": round(len(self.top1_tokens) / max(len(self.chunk_tokens), 1), DECIMALS),
            "mass_outside_top1": round(self.outside_top1_sum / count, DECIMALS),
            f"chunk_ecr@{self.top_k}": round(self.chunk_hits_sum / count, DECIMALS),
            "chunk_mass": round(self.chunk_mass_sum / count, DECIMALS),
        }
        reasons = []
        if stats["distinct_top1_fraction"] < guard.min_distinct_top1_fraction:
            reasons.append(f"only {stats['distinct_top1']} distinct top-1 tokens for {stats['distinct_chunk_tokens']} "
                           f"distinct chunk tokens (fraction {stats['distinct_top1_fraction']} < "
                           f"collapse_guard.min_distinct_top1_fraction={guard.min_distinct_top1_fraction})")
        if stats["chunk_mass"] < guard.min_chunk_mass:
            reasons.append(f"alpha puts {stats['chunk_mass']} of its mass on its own chunk's tokens "
                           f"(< collapse_guard.min_chunk_mass={guard.min_chunk_mass})")
        return {**stats, "collapsed": bool(reasons), "collapse_reasons": reasons}


def report_health(where: str, health: dict, guard: CollapseGuardParams) -> None:
    """Log the statistics; a collapse is a loud warning, or a LatentCollapseError with ``on_collapse: error``."""
    if not health.get("collapsed"):
        log.info("%s: latents look healthy: %s", where, health)
        return
    message = (f"{where}: THE LATENTS HAVE COLLAPSED: " + "; ".join(health["collapse_reasons"])
               + ". Latent-SFT results from these latents measure extra forward passes, not a superposition "
               "(see latent_sft_core/latent_health.py for the statistics and what to change).")
    if guard.on_collapse == "error":
        raise LatentCollapseError(message)
    loud_warning(log, message)


def measure_encoder_health(
    encoder: nn.Module, decoder: nn.Module, params: Params, rows: Sequence[ChunkedRow], ids: SpecialIds,
    batch_size: int,
) -> dict | None:
    """The statistics and verdict (``AlphaHealth.summary``) of the encoder's alpha on ``rows``, without reporting
    them (None for the hidden-state ablation)."""
    if params.latent.kind != "soft_embedding":
        return None
    was_training = encoder.training
    encoder.eval()
    health = AlphaHealth(params.base.top_k)
    for batch, latents in encode_rows(encoder, decoder, params.latent, params.base.top_k, rows, ids, batch_size):
        health.update(latents.alpha, [chunk for row in batch for chunk in row.chunks()])
    encoder.train(was_training)
    return health.summary(params.collapse_guard)
