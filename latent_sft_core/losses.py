"""Losses: pure functions with stated shapes, one definition each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latent_sft_core.layout import IGNORE_INDEX
from latent_sft_core.masks import Role
from latent_sft_core.soft_embedding import SparseAlpha


@dataclass(frozen=True)
class PositionLogits:
    """Vocabulary logits of some positions of a padded batch: ``values`` [n, V] for the n True cells of ``mask``
    [B, T], in row-major order (sample by sample, position by position).

    The training stages run the LM head only where a loss reads it (``loss_positions``, ``modeling.logits_only_at``),
    so a batch holds [n, V] floats instead of [B, T, V]; every loss below also takes a dense [B, T, V] tensor.
    """

    values: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor | PositionLogits) -> PositionLogits:
        """``logits`` as they are, or a dense [B, T, V] tensor as the logits of every position."""
        if isinstance(logits, PositionLogits):
            return logits
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        return cls(logits.reshape(-1, logits.shape[-1]), mask)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """[m, V]: the logits of the m True cells of ``positions`` [B, T] (row-major), each one of ``mask``'s."""
        if bool((positions & ~self.mask).any()):
            raise ValueError("logits asked for at positions where the LM head did not run")
        return self.values[self.mask.flatten().cumsum(0).sub(1).view_as(self.mask)[positions]]


def supervised_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the supervised labels, each predicted from the position before it (never the first position)."""
    targets = labels != IGNORE_INDEX
    targets[:, 0] = False
    return targets


def predicting_positions(positions: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions just before the True cells of ``positions`` [B, T] (e.g. the latent slots): the
    positions whose logits predict them."""
    predicting = torch.zeros_like(positions)
    predicting[:, :-1] = positions[:, 1:]
    return predicting


def loss_positions(labels: torch.Tensor, roles: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: where a training loss reads the logits: before every supervised label, and before every latent
    slot when ``roles`` are given (stage 2's KL)."""
    positions = predicting_positions(supervised_targets(labels))
    return positions if roles is None else positions | predicting_positions(roles == Role.LATENT)


def token_nll(logits: torch.Tensor | PositionLogits, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL under the causal shift.

    logits [B, T, V] (or ``PositionLogits`` of at least ``loss_positions(labels)``), labels [B, T] (IGNORE_INDEX where
    unsupervised) -> nll [B, T] (fp32), where nll[b, p] is the loss of predicting labels[b, p] from position p - 1;
    0 at p = 0 and at ignored labels.
    """
    targets = supervised_targets(labels)
    student = PositionLogits.of(logits).at(predicting_positions(targets)).float()  # [n, V]
    nll = F.cross_entropy(student, labels[targets], reduction="none")
    return torch.zeros(labels.shape, dtype=nll.dtype, device=nll.device).masked_scatter(targets, nll)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, T] over ``mask`` [B, T] (bool); 0 (with a gradient path) when the mask is empty."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


def supervision_loss(logits: torch.Tensor | PositionLogits, labels: torch.Tensor, roles: torch.Tensor) -> dict[str, torch.Tensor]:
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


def causal_lm_loss(logits: torch.Tensor | PositionLogits, labels: torch.Tensor) -> torch.Tensor:
    """CoT-SFT's loss: the token-mean NLL over the supervised labels (chain, ``</think>``, answer, end).

    logits [B, T, V] (or ``PositionLogits`` of at least ``loss_positions(labels)``), labels [B, T] -> fp32 scalar.
    """
    return masked_mean(token_nll(logits, labels), supervised_targets(labels))


def alpha_marginal_entropy(alpha: SparseAlpha, vocab_size: int) -> torch.Tensor:
    """Entropy (nats, fp32 scalar) of the batch's mean alpha: ``H(mean_i alpha_i)`` over the vocabulary.

    alpha: ids/probs [M, k] (ids None: dense [M, V]) for the M latents of a batch. High when the latents put
    their mass on many different tokens, ~0 when they all name the same one (a collapse); each alpha may stay
    sharp. Phase 1's diversity term (ours) maximises it; 0 for a batch without latents.
    """
    probs = alpha.probs.float()
    if probs.shape[0] == 0:
        return probs.sum()
    if alpha.ids is None:
        mean = probs.mean(0)
    else:
        mean = probs.new_zeros(vocab_size).index_add(0, alpha.ids.reshape(-1), probs.reshape(-1)) / probs.shape[0]
    return -torch.xlogy(mean, mean).sum()


def chunk_anchor_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, roles: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Ours: mean over latents of ``-log P(own chunk)``, P the full-vocabulary softmax of ``logits / temperature``
    summed over the distinct tokens of the latent's chunk (fp32 scalar; 0 for a batch without latents or chunks).

    logits [M, V]: the encoder's vocabulary logits at the M LATENT positions of the batch, sample by sample, slot
    by slot; input_ids, roles [B, T]: the encoder batch, where the CHUNK tokens after latent i-1 (or the prompt)
    and before latent i are latent i's chunk. The full softmax, not the top-k alpha, so that a chunk token outside
    the top k still receives a gradient. It keeps a latent a superposition of its own chunk's tokens, which is
    what the induction mask is meant to give and what a collapse loses.
    """
    is_latent = roles == Role.LATENT
    count = int(is_latent.sum())
    if count != logits.shape[0]:
        raise ValueError(f"{count} latent positions in the encoder batch but {logits.shape[0]} rows of logits")
    if count == 0:
        return logits.float().sum() * 0.0
    per_sample = is_latent.sum(1)
    first = torch.cumsum(per_sample, 0) - per_sample  # [B]: the flat index of each sample's first latent
    owner = first[:, None] + torch.cumsum(is_latent, 1) - is_latent.long()  # [B, T]: the latent a position precedes
    in_chunk = (roles == Role.CHUNK) & (owner < (first + per_sample)[:, None])
    membership = torch.zeros_like(logits, dtype=torch.bool)
    membership[owner[in_chunk], input_ids[in_chunk]] = True
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    has_chunk = membership.any(-1)  # a latent whose chunk is empty has nothing to anchor to
    chunk_log_mass = log_probs[has_chunk].masked_fill(~membership[has_chunk], float("-inf")).logsumexp(-1)
    return -chunk_log_mass.sum() / has_chunk.sum().clamp(min=1)


def latent_kl(
    logits: torch.Tensor | PositionLogits, slot_mask: torch.Tensor, teacher_ids: torch.Tensor | None, teacher_probs: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) at the latent slots of stage 2, mean over latents per sample, mean over samples.

    logits [B, T, V]: the student's; slot_mask [B, T] bool: the LATENT positions (M of them in the batch);
    teacher_ids [M, k] (None: dense over the vocabulary, k = V) and teacher_probs [M, k], in the order of
    ``slot_mask`` (sample by sample, slot by slot). The student's distribution for latent j is the full-vocabulary
    softmax of ``logits / temperature`` at the position *before* slot j (that position predicts Z_j, as in the
    reference). ``temperature`` is alpha's (``latent.temperature``): the teacher's alpha was made at it and the
    student makes its own alpha at it at inference, so only this student distribution is the one it will feed
    (the reference always uses 1, where the two readings agree):
    ``KL = sum_k q_k (log q_k - log p_student[id_k])``, with 0 log 0 = 0. Samples without latents are left out
    of the mean; a batch without any latent gives 0 (with a gradient path).
    """
    predicting = PositionLogits.of(logits).at(predicting_positions(slot_mask))
    student = torch.log_softmax(predicting.float() / temperature, dim=-1)  # [M, V]
    student_at = student if teacher_ids is None else student.gather(-1, teacher_ids)
    q = teacher_probs.float()
    return mean_per_sample((torch.xlogy(q, q) - q * student_at).sum(-1), slot_mask)


def latent_mse(hidden: torch.Tensor, slot_mask: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """The hidden-state ablation's latent loss: mean squared error between the student's final hidden state at
    the position before each latent slot and the teacher's latent (the encoder's hidden state).

    hidden [B, T, d] (after the final norm); slot_mask [B, T] bool (M slots); teacher_hidden [M, d] in slot
    order. Mean over d per latent, then averaged like ``latent_kl`` (per sample, then over samples).
    """
    student = hidden[predicting_positions(slot_mask)].float()  # [M, d]
    return mean_per_sample((student - teacher_hidden.float()).pow(2).mean(-1), slot_mask)


def latent_stop_unlikelihood(logits: torch.Tensor | PositionLogits, slot_mask: torch.Tensor, stop_id: int) -> torch.Tensor:
    """Ours, for the hidden-state ablation: ``-log(1 - p(stop))`` at the position before each latent slot, averaged
    like ``latent_kl``; it keeps the LM head from choosing the stop token where the model should go on thinking.

    Free-running, latent steps continue while the greedy token is not ``</think>``. Alpha latents get this for free
    (the KL pins those logits to chunk tokens); hidden-state latents are trained by MSE on the hidden state alone,
    and CE teaches ``</think>`` at the last slot's output only, so nothing else keeps it from winning earlier.
    logits [B, T, V] (or ``PositionLogits`` holding the positions before the slots); slot_mask [B, T] bool.
    """
    predicting = PositionLogits.of(logits).at(predicting_positions(slot_mask)).float()  # [M, V]
    log_stop = torch.log_softmax(predicting, dim=-1)[:, stop_id]
    return mean_per_sample(-torch.log1p(-log_stop.exp().clamp(max=1 - 1e-6)), slot_mask)


def mean_per_sample(per_latent: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_latent`` [M] over each sample's latents, then over the samples that have any (0 if none)."""
    sample_of_latent = torch.arange(slot_mask.shape[0], device=per_latent.device)[:, None].expand_as(slot_mask)[slot_mask]
    counts = slot_mask.sum(1)
    per_sample = torch.zeros(slot_mask.shape[0], device=per_latent.device).index_add(0, sample_of_latent, per_latent)
    return masked_mean(per_sample / counts.clamp(min=1), counts > 0)


def stage2_losses(
    logits: torch.Tensor | PositionLogits,
    labels: torch.Tensor,
    roles: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_probs: torch.Tensor,
    ce_weight: float,
    kl_weight: float,
    hidden: torch.Tensor | None = None,
    temperature: float = 1.0,
    stop_id: int | None = None,
    stop_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Stage 2: ``loss = ce_weight * CE + kl_weight * latent term`` with both components (detached) for logging.

    CE is the token mean NLL of the ANSWER side (``</think>``, answer, end). The latent term is ``latent_kl``
    at the LATENT slots ("kl_loss", student logits divided by alpha's ``temperature``), or, for the hidden-state ablation (``hidden`` [B, T, d] given, teacher_probs
    then the teacher's hidden states [M, d]), ``latent_mse`` ("mse_loss"), plus ``stop_weight`` times
    ``latent_stop_unlikelihood`` of ``stop_id`` ("stop_loss", ours) when that weight is set. Shapes as in
    ``supervision_loss``.
    """
    if stop_weight and (hidden is None or stop_id is None):
        raise ValueError("the stop term is for hidden-state latents and needs the stop token's id")
    nll = token_nll(logits, labels)
    ce = masked_mean(nll, labels != IGNORE_INDEX)
    slots = roles == Role.LATENT
    if hidden is None:
        name, latent = "kl_loss", latent_kl(logits, slots, teacher_ids, teacher_probs, temperature)
    else:
        name, latent = "mse_loss", latent_mse(hidden, slots, teacher_probs)
    components = {"ce_loss": ce.detach(), name: latent.detach()}
    if stop_weight:
        stop = latent_stop_unlikelihood(logits, slots, stop_id)
        latent = latent + stop_weight * stop
        components["stop_loss"] = stop.detach()
    return {"loss": ce_weight * ce + kl_weight * latent, **components}
