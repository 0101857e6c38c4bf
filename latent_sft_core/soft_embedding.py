"""Latent tokens as superpositions of vocabulary embeddings: alpha from a hidden state, then Z = alpha @ E.

Definitions (one place, used by the encoder in phase 1, the soft-label cache, stage-2 inputs and inference):

* logits over the vocabulary from a final hidden state ``h`` (after the final norm):
  ``projection="input_embeddings"`` uses ``E h`` with E the (detached) input-embedding matrix, as the reference
  code does; ``projection="lm_head"`` uses the LM head ``W h`` (the paper's notation). For tied embeddings the
  two are identical. Phase 2 trains the student's LM head towards alpha, so with untied embeddings only
  ``lm_head`` makes teacher and student speak about the same projection.
* ``alpha = softmax(logits / temperature)`` over the full vocabulary, or over the top-k logits renormalised
  (k >= 1); top-k alpha is held sparsely as (ids [.., k], probs [.., k]), full alpha densely (ids None).
* ``Z = sum_j alpha_j E[id_j]``: no scaling, no normalisation. E is detached, so gradients reach only the
  model that produced ``h``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseAlpha:
    """alpha as ``probs`` [..., k] (fp32, summing to 1 over the last axis) over the vocabulary ids ``ids``
    [..., k]; ``ids`` is None when alpha is dense over the whole vocabulary (k = V, id = index)."""

    ids: torch.Tensor | None
    probs: torch.Tensor


def vocabulary_logits(hidden: torch.Tensor, projection_weight: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] from hidden states [..., d] and a projection matrix [V, d] (computed in fp32)."""
    return hidden.float() @ projection_weight.detach().float().T


def alpha_from_logits(logits: torch.Tensor, top_k: int | None, temperature: float = 1.0) -> SparseAlpha:
    """alpha over the top ``top_k`` logits (renormalised) or, with ``top_k=None``, the full vocabulary.

    logits: [..., V]  ->  SparseAlpha with ids/probs [..., k] (k = V when full), probs in fp32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float() / temperature
    if top_k is None:
        return SparseAlpha(ids=None, probs=torch.softmax(scaled, dim=-1))
    if not 0 < top_k <= scaled.shape[-1]:
        raise ValueError(f"top_k must be in 1..{scaled.shape[-1]} (the vocabulary), got {top_k}")
    values, ids = scaled.topk(top_k, dim=-1)
    return SparseAlpha(ids=ids, probs=torch.softmax(values, dim=-1))


def mix_embeddings(alpha: SparseAlpha, embeddings: torch.Tensor | torch.nn.Embedding) -> torch.Tensor:
    """Z [..., d] = sum_k probs[..., k] * E[ids[..., k]], with E [V, d] detached; Z in E's dtype.

    ``embeddings`` is the matrix or the embedding module itself; with the module, rows are looked up by calling
    it, which also works when DeepSpeed ZeRO-3 partitions its weight (its forward hook gathers the rows).
    """
    if alpha.ids is None:
        table = embeddings.weight if isinstance(embeddings, torch.nn.Module) else embeddings
        return (alpha.probs @ table.detach().float()).to(table.dtype)
    rows = embeddings(alpha.ids) if isinstance(embeddings, torch.nn.Module) else embeddings[alpha.ids]
    rows = rows.detach()  # [..., k, d]
    return (alpha.probs.unsqueeze(-1) * rows.float()).sum(dim=-2).to(rows.dtype)


def gumbel_perturb(
    probs: torch.Tensor, scale: float, tau: float, clamp: tuple[float, float], generator: torch.Generator | None = None
) -> torch.Tensor:
    """The one Gumbel perturbation of a (top-k) distribution, used wherever noise is applied.

    ``p~ = softmax((log p + g) / tau)`` over the same support, with ``g = clamp(scale * G, *clamp)`` and G
    standard Gumbel noise, one draw per entry. probs [..., k] -> [..., k] (fp32). ``scale = 0`` and ``tau = 1``
    give ``p`` back. Zero-probability entries stay at zero.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device).clamp_(min=1e-10, max=1 - 1e-7)
    noise = (-torch.log(-torch.log(uniform)) * scale).clamp(*clamp)
    return torch.softmax((torch.log(probs.float()) + noise) / tau, dim=-1)
