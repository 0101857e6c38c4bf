"""Phase 1: the Latent Token Encoder and the LLM (decoder) trained together through soft embeddings.

Per batch there is exactly one encoder forward and one decoder forward:

1. encoder over ``[prompt, <think>, S_1, L_1, ..., S_N, L_N, </think>]`` with the induction mask (LTIM);
   the final hidden state at every LATENT position gives alpha_i and Z_i = alpha_i @ E
   (or h_i itself for the hidden-state ablation);
2. decoder over ``[prompt, <think>, Z_1, S_2, ..., Z_N, </think>, answer, end]`` with the supervision mask
   (LTSuM) and dual-track positions; the Z's replace the input embeddings at its LATENT positions;
3. L_sup = token-mean NLL of the chunk tokens and the answer side; two terms of ours, training only, can be
   added: ``- diversity_weight * H(batch-mean alpha)`` (``losses.alpha_marginal_entropy``) and
   ``+ chunk_anchor_weight * mean -log P(own chunk)`` (``losses.chunk_anchor_loss``).
   Validation (checkpoint choice) is always L_sup alone.

Both sequences of a sample carry the same N latents in the same order, so scattering is one boolean-mask
assignment over the whole batch (no per-sample loop).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from latent_sft_core.chunking import ChunkedRow
from latent_sft_core.config import LatentParams
from latent_sft_core.distributed import gathered_in_order, partitioned, whole_parameters
from latent_sft_core.errors import loud_warning
from latent_sft_core.layout import TokenSequence, decoder_sequence, encoder_sequence, labels_from_roles, pad_sequences
from latent_sft_core.losses import (
    PositionLogits,
    alpha_marginal_entropy,
    chunk_anchor_loss,
    loss_positions,
    supervision_loss,
)
from latent_sft_core.masks import Role, attention_bias, decoder_mask, encoder_mask
from latent_sft_core.modeling import logits_only_at
from latent_sft_core.soft_embedding import SparseAlpha, alpha_from_logits, mix_embeddings, vocabulary_logits
from latent_sft_core.text import SpecialIds

log = logging.getLogger(__name__)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, also through a peft wrapper (LoRA layers stay in)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def warn_on_untied_input_projection(model: PreTrainedModel, latent: LatentParams, model_dir: object) -> bool:
    """Warn (and return True) when alpha would come from the input embeddings of a model whose output embeddings
    are a different matrix: then only ``lm_head`` is a readout the model was trained with (see soft_embedding)."""
    output = model.get_output_embeddings()
    untied = output is not None and output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    if not (untied and latent.kind == "soft_embedding" and latent.projection == "input_embeddings"):
        return False
    loud_warning(log, f"{model_dir}: the model's input and output embeddings are not tied, and latent.projection is "
                 "'input_embeddings' (E h, the reference code's): alpha then comes from a readout the model was never "
                 "trained with, while stage 2 trains the student's LM head W towards it. For an untied model set "
                 "latent.projection: lm_head (W h, the paper's notation).")
    return True


def output_projection(decoder: nn.Module, latent: LatentParams) -> torch.Tensor:
    """The [V, d] matrix that turns a hidden state into vocabulary logits for alpha (see soft_embedding)."""
    if latent.projection == "lm_head":
        return decoder.get_output_embeddings().weight
    return decoder.get_input_embeddings().weight


def vocabulary_weights(decoder: nn.Module, latent: LatentParams) -> list[nn.Parameter]:
    """The decoder's matrices phase 1 reads as whole tensors, not through their modules: the input embeddings E
    (Z = alpha @ E) and alpha's output projection (once when they are one tied matrix). Under ZeRO-3, within a
    forward DeepSpeed's parameter getter gathers them for the running module; outside one (``encode_rows``, the
    health pass) they must be gathered explicitly."""
    weights = (decoder.get_input_embeddings().weight, output_projection(decoder, latent))
    return list({id(weight): weight for weight in weights}.values())


@dataclass(frozen=True)
class EncodedLatents:
    """The encoder's latents of a batch, flattened in (sample, step) order: M = total latents."""

    hidden: torch.Tensor  # [M, d] final hidden states at the LATENT positions
    alpha: SparseAlpha | None  # [M, k] (None for the hidden-state ablation)
    inputs: torch.Tensor  # [M, d] what the decoder receives: Z = alpha @ E, or h
    logits: torch.Tensor | None = None  # [M, V] the vocabulary logits alpha comes from (None: hidden-state ablation)


def encode_latents(
    encoder: nn.Module, decoder: nn.Module, latent: LatentParams, top_k: int, input_ids: torch.Tensor,
    roles: torch.Tensor,
) -> EncodedLatents:
    """Run the encoder once over a padded batch [B, T_enc] and form the latent inputs for the decoder."""
    embeddings = decoder.get_input_embeddings().weight
    bias = attention_bias(encoder_mask(roles, latent.encoder_mask), embeddings.dtype)
    hidden = backbone(encoder)(input_ids=input_ids, attention_mask=bias, use_cache=False).last_hidden_state
    latent_hidden = hidden[roles == Role.LATENT]
    if latent.kind == "hidden_state":
        return EncodedLatents(hidden=latent_hidden, alpha=None, inputs=latent_hidden)
    logits = vocabulary_logits(latent_hidden, output_projection(decoder, latent))
    alpha = alpha_from_logits(logits, None if latent.full_vocab else top_k, latent.temperature)
    return EncodedLatents(hidden=latent_hidden, alpha=alpha, inputs=mix_embeddings(alpha, embeddings), logits=logits)


@torch.no_grad()
def encode_rows(
    encoder: nn.Module, decoder: nn.Module, latent: LatentParams, top_k: int, rows: Sequence[ChunkedRow],
    ids: SpecialIds, batch_size: int,
) -> Iterator[tuple[Sequence[ChunkedRow], EncodedLatents]]:
    """The encoder's latents of ``rows`` (their gold chains), ``batch_size`` rows per packed forward; under several
    processes the batches are shared out and every process receives all of them, in order (``distributed``). Every
    process must consume the whole iterator (under ZeRO-3 it gathers weights, a collective)."""

    def encode(batch: Sequence[ChunkedRow]) -> EncodedLatents:
        padded = pad_sequences([encoder_sequence(row, ids) for row in batch], ids.pad)
        device = encoder.get_input_embeddings().weight.device
        latents = encode_latents(encoder, decoder, latent, top_k, padded["input_ids"].to(device),
                                 padded["roles"].to(device))
        # the [M, V] logits serve only the training loss: not kept per batch, nor gathered between processes
        return replace(latents, logits=None)

    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    with whole_parameters(vocabulary_weights(decoder, latent)):
        if partitioned(encoder.parameters()):
            # ZeRO-3 (phase 1's health pass): every module's forward gathers its weights from all processes, a
            # collective, so each process encodes every batch rather than its share
            for batch in batches:
                yield batch, encode(batch)
        else:
            yield from gathered_in_order(batches, encode)


def embed_with_latents(decoder: nn.Module, input_ids: torch.Tensor, roles: torch.Tensor, latents: torch.Tensor):
    """Decoder input embeddings [B, T, d] with ``latents`` [M, d] written at the LATENT positions, in order."""
    embeds = decoder.get_input_embeddings()(input_ids)
    slots = roles == Role.LATENT
    if int(slots.sum()) != latents.shape[0]:
        raise ValueError(f"{int(slots.sum())} latent slots in the decoder batch but {latents.shape[0]} latents")
    embeds = embeds.clone()
    embeds[slots] = latents.to(embeds.dtype)
    return embeds


class Stage1Model(nn.Module):
    """Encoder + decoder of phase 1; ``forward`` returns the loss and its components for one padded batch."""

    def __init__(
        self, encoder: PreTrainedModel, decoder: PreTrainedModel, latent: LatentParams, top_k: int,
        diversity_weight: float = 0.0, chunk_anchor_weight: float = 0.0,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent = latent
        self.top_k = top_k
        self.diversity_weight = diversity_weight
        self.chunk_anchor_weight = chunk_anchor_weight

    def forward(
        self,
        encoder_input_ids: torch.Tensor,
        encoder_roles: torch.Tensor,
        input_ids: torch.Tensor,
        roles: torch.Tensor,
        steps: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        latents = encode_latents(self.encoder, self.decoder, self.latent, self.top_k, encoder_input_ids, encoder_roles)
        embeds = embed_with_latents(self.decoder, input_ids, roles, latents.inputs)
        bias = attention_bias(decoder_mask(roles, steps, self.latent.decoder_mask), embeds.dtype)
        positions = loss_positions(labels)
        with logits_only_at(self.decoder, positions):
            logits = self.decoder(
                inputs_embeds=embeds, attention_mask=bias, position_ids=position_ids, use_cache=False
            ).logits
        losses = supervision_loss(PositionLogits(logits, positions), labels, roles)
        if not self.training or latents.alpha is None:
            return losses
        if self.diversity_weight:
            vocab_size = self.decoder.get_input_embeddings().num_embeddings
            diversity_loss = -alpha_marginal_entropy(latents.alpha, vocab_size)
            losses = {**losses, "loss": losses["loss"] + self.diversity_weight * diversity_loss,
                      "diversity_loss": diversity_loss.detach()}
        if self.chunk_anchor_weight:
            anchor_loss = chunk_anchor_loss(latents.logits, encoder_input_ids, encoder_roles, self.latent.temperature)
            losses = {**losses, "loss": losses["loss"] + self.chunk_anchor_weight * anchor_loss,
                      "chunk_anchor_loss": anchor_loss.detach()}
        return losses


@dataclass(frozen=True)
class Stage1Example:
    encoder: TokenSequence
    decoder: TokenSequence


def stage1_example(row: ChunkedRow, ids: SpecialIds) -> Stage1Example:
    return Stage1Example(encoder=encoder_sequence(row, ids), decoder=decoder_sequence(row, ids))


@dataclass(frozen=True)
class Stage1Collator:
    """Pads encoder and decoder sequences of a batch; labels from roles."""

    pad_id: int

    def __call__(self, batch: Sequence[Stage1Example]) -> dict[str, torch.Tensor]:
        encoder = pad_sequences([example.encoder for example in batch], self.pad_id)
        decoder = pad_sequences([example.decoder for example in batch], self.pad_id)
        return {
            "encoder_input_ids": encoder["input_ids"],
            "encoder_roles": encoder["roles"],
            "input_ids": decoder["input_ids"],
            "roles": decoder["roles"],
            "steps": decoder["steps"],
            "position_ids": decoder["position_ids"],
            "labels": labels_from_roles(decoder["input_ids"], decoder["roles"]),
        }
