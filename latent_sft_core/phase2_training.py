"""Stage 2 (train_latent): the LLM learns to produce its latents itself.

Sequence ``[prompt] <think> Z_1 ... Z_N </think> [answer] <end>`` (plain causal attention, positions 0..T-1),
Z_j = alpha_j @ E with alpha_j the cached soft label of latent j (optionally Gumbel-perturbed; the perturbed
alpha is then both the input mixture and the KL target) and E the LLM's own input embeddings (detached).
Loss = ce_weight * CE(``</think>``, answer, end) + kl_weight * KL(alpha_j || student at the position before
Z_j); with ``loss_schedule: alternate`` the steps cycle KL only, CE only, both. For the hidden-state ablation
(``latent.kind: hidden_state``) the cached targets are the encoder's hidden states h_j: they are the inputs at
the slots, and the latent term is the MSE between the student's final hidden state before slot j and h_j
(plus, with ``train_latent.hidden_state_stop_weight``, ours, an unlikelihood term on ``</think>`` there).
Scheduled sampling (ours, ``train_latent.scheduled_sampling``): with a probability rising over training, a slot
is fed the student's own latent (from a no-grad teacher-forced pass) instead of the teacher's; the KL target
stays the teacher's, so the student learns to recover from its own mixtures as it must at inference.

Training runs through DeepSpeed ZeRO (stage 2 by default, 3 optional) when ``train_latent.deepspeed.enabled``;
in one process by default, or under ``torchrun`` / ``deepspeed`` with several (only rank 0 writes outputs).
The result is a plain Hugging Face checkpoint (LoRA merged) with its tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import PreTrainedModel

from latent_sft_core.chunking import ChunkedRow, read_chunked
from latent_sft_core.config import Params
from latent_sft_core.errors import ArtifactError, DataError
from latent_sft_core.inference import LatentMode
from latent_sft_core.io import atomic_outputs, write_json
from latent_sft_core.layout import TokenSequence, labels_from_roles, pad_sequences, stage2_sequence
from latent_sft_core.losses import PositionLogits, loss_positions, predicting_positions, stage2_losses
from latent_sft_core.masks import Role
from latent_sft_core.modeling import load_pretrained_model, logits_only_at, merged, save_model, with_lora
from latent_sft_core.soft_embedding import SparseAlpha, alpha_from_logits, gumbel_perturb, mix_embeddings
from latent_sft_core.soft_label_caching import encoder_fingerprint
from latent_sft_core.soft_labels import SoftLabelReader, open_soft_labels
from latent_sft_core.text import SpecialIds, load_tokenizer, special_ids, tokenizer_fingerprint
from latent_sft_core.training import (
    SCRATCH_ROOT,
    ComponentLoggingTrainer,
    check_sequence_lengths,
    dir_digest,
    finish_scratch,
    run_fingerprint,
    run_training,
    save_whole_weights,
    write_loss_curve,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentExample:
    sequence: TokenSequence
    teacher_ids: torch.Tensor | None  # [N, k] long; None for dense full-vocabulary labels
    teacher_probs: torch.Tensor  # [N, k] float32


class LatentDataset(torch.utils.data.Dataset):
    """Chunked rows joined with their soft labels; labels are read lazily from the memory-mapped cache."""

    def __init__(self, rows: Sequence[ChunkedRow], labels: SoftLabelReader, ids, source: Path):
        self.rows = list(rows)
        self.labels = labels
        self.special = ids
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> LatentExample:
        row = self.rows[index]
        teacher_ids, teacher_probs = self.labels.by_id(row.id)
        if teacher_probs.shape[0] != row.num_chunks:
            raise ArtifactError(
                f"{self.source}: row {row.id} has {teacher_probs.shape[0]} cached latents but {row.num_chunks} "
                "chunks; the cache belongs to other chunked data"
            )
        return LatentExample(stage2_sequence(row, self.special), teacher_ids, teacher_probs)


@dataclass(frozen=True)
class LatentCollator:
    """Pads a batch; teacher labels concatenated in (sample, slot) order; Gumbel noise drawn per batch."""

    pad_id: int
    gumbel: tuple[float, float, tuple[float, float]] | None = None  # (scale, tau, clamp) when enabled

    def __call__(self, batch: Sequence[LatentExample]) -> dict[str, torch.Tensor]:
        padded = pad_sequences([example.sequence for example in batch], self.pad_id)
        probs = torch.cat([example.teacher_probs for example in batch])
        if self.gumbel is not None:
            scale, tau, clamp = self.gumbel
            probs = gumbel_perturb(probs, scale, tau, clamp)
        inputs = {
            "input_ids": padded["input_ids"],
            "attention_mask": padded["attention_mask"],
            "roles": padded["roles"],
            "labels": labels_from_roles(padded["input_ids"], padded["roles"]),
            "teacher_probs": probs,
        }
        if batch[0].teacher_ids is not None:
            inputs["teacher_ids"] = torch.cat([example.teacher_ids for example in batch])
        return inputs


def scheduled_inputs(
    teacher: torch.Tensor, student: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scheduled sampling's slot inputs: each of the M latents [M, d] is the student's with ``probability``,
    else the teacher's. Returns (inputs [M, d], replaced [M] bool)."""
    replaced = torch.rand(teacher.shape[0], generator=generator, device=teacher.device) < probability
    return torch.where(replaced[:, None], student.to(teacher.dtype), teacher), replaced


def latent_forward(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], ce_weight: float, kl_weight: float,
    hidden_state: bool = False, student_probability: float = 0.0, student: LatentMode | None = None,
    stop_id: int | None = None, stop_weight: float = 0.0,
):
    """Stage-2 losses for one padded batch (see ``LatentCollator`` for the inputs); ``hidden_state``: the
    teacher values are hidden states, fed as they are (the hidden-state ablation). With ``student_probability``
    > 0 (scheduled sampling) each slot's input is, with that probability, the student's own latent from a no-grad
    pass over the teacher's inputs; the targets stay the teacher's. ``student`` (alpha as inference makes it) also
    sets the temperature of the student's distribution in the KL (``losses.latent_kl``). ``stop_weight`` > 0 adds the
    hidden-state stop term on ``stop_id`` (``</think>``; ours, ``losses.latent_stop_unlikelihood``) to the latent term."""
    embedding = extract_model_from_parallel(model).get_input_embeddings()
    embeds = embedding(inputs["input_ids"])
    slots = inputs["roles"] == Role.LATENT
    teacher_ids = inputs.get("teacher_ids")
    teacher = inputs["teacher_probs"]
    if bool(slots.any()):
        embeds = embeds.clone()
        latents = teacher if hidden_state else mix_embeddings(SparseAlpha(ids=teacher_ids, probs=teacher), embedding)
        embeds[slots] = latents.to(embeds.dtype)
        if student_probability > 0:
            own = _student_latents(model, embeds, inputs["attention_mask"], slots, hidden_state, student)
            embeds[slots], _ = scheduled_inputs(embeds[slots], own, student_probability)
    positions = loss_positions(inputs["labels"], inputs["roles"])
    with logits_only_at(model, positions):
        output = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=False,
                       output_hidden_states=hidden_state)
    return stage2_losses(PositionLogits(output.logits, positions), inputs["labels"], inputs["roles"], teacher_ids, teacher, ce_weight,
                         kl_weight, hidden=output.hidden_states[-1] if hidden_state else None,
                         temperature=student.temperature if student is not None else 1.0,
                         stop_id=stop_id, stop_weight=stop_weight)


@torch.no_grad()
def _student_latents(model, embeds, attention_mask, slots, hidden_state: bool, student: LatentMode | None):
    """[M, d]: what the student would feed at each slot, given the teacher's latents before it."""
    before = predicting_positions(slots)
    with logits_only_at(model, before):
        output = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                       output_hidden_states=hidden_state)
    if hidden_state:
        return output.hidden_states[-1][before]
    if student is None:
        raise ValueError("scheduled sampling on soft embeddings needs the LatentMode (top-k and temperature)")
    alpha = alpha_from_logits(output.logits, student.top_k, student.temperature)  # [M, V]: the slots' logits
    return mix_embeddings(alpha, extract_model_from_parallel(model).get_input_embeddings())


class LatentTrainer(ComponentLoggingTrainer):
    """Computes the stage-2 loss; with ``schedule='alternate'`` training steps cycle KL, CE, both; with a
    ``max_student_probability`` slots are fed the student's own latents with a probability rising linearly
    from 0 to it over the training steps (scheduled sampling); ``stop_id`` and ``stop_weight`` as in ``latent_forward``."""

    def __init__(self, *args, ce_weight: float, kl_weight: float, schedule: str, hidden_state: bool = False,
                 max_student_probability: float = 0.0, student: LatentMode | None = None,
                 stop_id: int | None = None, stop_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = (ce_weight, kl_weight)
        self.schedule = schedule
        self.hidden_state = hidden_state
        self.max_student_probability = max_student_probability
        self.student = student
        self.stop_id, self.stop_weight = stop_id, stop_weight

    def step_weights(self) -> tuple[float, float]:
        ce_weight, kl_weight = self.weights
        if self.schedule == "sum" or not self.model.training:
            return ce_weight, kl_weight
        return ((0.0, kl_weight), (ce_weight, 0.0), (ce_weight, kl_weight))[self.state.global_step % 3]

    def student_probability(self) -> float:
        """0 at evaluation (validation loss is always teacher-forced), else the linear ramp to the maximum."""
        if not self.model.training or not self.max_student_probability:
            return 0.0
        return self.max_student_probability * self.state.global_step / max(self.state.max_steps, 1)

    def loss_outputs(self, model, inputs):
        return latent_forward(model, inputs, *self.step_weights(), hidden_state=self.hidden_state,
                              student_probability=self.student_probability(), student=self.student,
                              stop_id=self.stop_id, stop_weight=self.stop_weight)


def _latent_rows(
    params: Params, chunked: Path, split: str, ids: SpecialIds, tokenizer_id: str, limit: int | None,
    labels_dir: Path, encoder_id: str,
) -> LatentDataset:
    source = chunked / f"{split}.parquet"
    rows = read_chunked(source, params.base.compression_rate, tokenizer_id)[:limit]
    lengths = [len(stage2_sequence(row, ids).input_ids) for row in rows]
    check_sequence_lengths(source, [r.id for r in rows], lengths, params.train_latent.train.max_seq_len,
                           "train_latent.train.max_seq_len")
    labels = open_soft_labels(
        labels_dir / f"{split}.parquet",
        compression_rate=params.base.compression_rate,
        top_k=None if params.latent.full_vocab else params.base.top_k,
        tokenizer_fingerprint=tokenizer_id,
        encoder_fingerprint=encoder_id,
        latent_kind=params.latent.kind,
        # the student decodes with this alpha definition at inference: its teacher must have used the same
        temperature=params.latent.temperature,
        projection=params.latent.projection,
    )
    return LatentDataset(rows, labels, ids, labels_dir / f"{split}.parquet")


def train_latent(
    params: Params,
    merged_dir: Path,
    chunked_dir: Path,
    soft_labels_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    loss_curve_path: Path,
    scratch_dir: Path = SCRATCH_ROOT / "train_latent",
) -> dict | None:
    """Train stage 2 from the merged stage-1 decoder; rank 0 writes the merged model, metrics and curve."""
    section = params.train_latent
    decoder_dir = Path(merged_dir) / "decoder"
    tokenizer = load_tokenizer(decoder_dir)
    ids, tokenizer_id, encoder_id = special_ids(tokenizer), tokenizer_fingerprint(tokenizer), encoder_fingerprint(merged_dir)
    train = _latent_rows(params, Path(chunked_dir), "train", ids, tokenizer_id, section.max_train_rows,
                         soft_labels_dir, encoder_id)
    val = _latent_rows(params, Path(chunked_dir), "val", ids, tokenizer_id, section.max_eval_rows,
                       soft_labels_dir, encoder_id)
    if not len(val):
        raise DataError(f"{Path(chunked_dir) / 'val.parquet'}: the validation split is empty; stage 2 selects "
                        "checkpoints on it")

    model = load_pretrained_model(decoder_dir)
    model = with_lora(model, section.lora, params.base.seed) if section.finetune == "lora" else model
    gumbel = section.gumbel
    collator = LatentCollator(
        ids.pad,
        (gumbel.scale, gumbel.tau, (gumbel.clamp_min, gumbel.clamp_max)) if gumbel.enabled else None,
    )
    fingerprint = run_fingerprint(
        section=section.model_dump(mode="json"),
        latent=params.latent.model_dump(mode="json"),
        base=params.base.model_dump(mode="json", include={"seed", "compression_rate", "top_k"}),
        inputs={name: dir_digest(p) for name, p in (("merged", decoder_dir), ("labels", soft_labels_dir))},
    )
    sampling = section.scheduled_sampling
    trainer_cls = partial(LatentTrainer, ce_weight=section.ce_weight, kl_weight=section.kl_weight,
                          schedule=section.loss_schedule, hidden_state=params.latent.kind == "hidden_state",
                          max_student_probability=sampling.max_probability if sampling.enabled else 0.0,
                          student=LatentMode.from_params(params),
                          stop_id=ids.think_close, stop_weight=section.hidden_state_stop_weight)
    result = run_training(model, train, collator, section.train, scratch_dir, params.base.seed, fingerprint,
                          trainer_cls=trainer_cls, eval_dataset=val, deepspeed=section.deepspeed,
                          compute=params.compute)
    final_dir = save_whole_weights(result, scratch_dir)
    if not result.trainer.is_world_process_zero():
        return None
    metrics = result.summary()
    if section.finetune == "lora":
        final = merged(load_pretrained_model(decoder_dir), final_dir)
    else:
        final = load_pretrained_model(final_dir)
    with atomic_outputs() as outputs:
        save_model(final, tokenizer, outputs.path(out_dir))
        write_json(outputs.path(metrics_path), metrics)
        write_loss_curve(outputs.path(loss_curve_path), result)
    finish_scratch(scratch_dir)
    return metrics

