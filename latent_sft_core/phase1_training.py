"""The phase-1 stages: train_encoder, train_decoder, train_joint (LoRA trainings) and merge_lora.

| stage          | encoder                              | decoder                              | writes            |
|----------------|--------------------------------------|--------------------------------------|-------------------|
| train_encoder  | base + new LoRA (with embed_tokens)  | base, frozen                         | encoder adapter   |
| train_decoder  | base + encoder adapter, merged, frozen | base + new LoRA                    | decoder adapter   |
| train_joint    | base + encoder adapter + new LoRA    | base + decoder adapter + new LoRA    | both adapters     |
| merge_lora     | all adapters merged                  | all adapters merged                  | plain HF models   |

Adapters are peft adapters (``<stage dir>/encoder``, ``<stage dir>/decoder``); merged models are plain Hugging
Face checkpoints with the tokenizer (``models/stage1_merged/{encoder,decoder}``). Every training picks its
best checkpoint by the validation split's L_sup (lowest wins), never by the test split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from peft.utils.constants import EMBEDDING_LAYER_NAMES
from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from latent_sft_core.chunking import read_chunked
from latent_sft_core.config import Params, check_top_k
from latent_sft_core.distributed import World, whole_parameters
from latent_sft_core.errors import ArtifactError, DataError
from latent_sft_core.io import atomic_dir, atomic_outputs, write_json
from latent_sft_core.latent_health import measure_encoder_health, report_health
from latent_sft_core.modeling import frozen, load_pretrained_model, merged, save_model, with_lora
from latent_sft_core.phase1_model import Stage1Collator, Stage1Model, stage1_example, warn_on_untied_input_projection
from latent_sft_core.text import SpecialIds, load_tokenizer, special_ids, tokenizer_fingerprint
from latent_sft_core.training import (
    SCRATCH_ROOT,
    SequenceDataset,
    TrainableStateTrainer,
    check_sequence_lengths,
    dir_digest,
    finish_scratch,
    run_fingerprint,
    run_training,
    write_loss_curve,
)

log = logging.getLogger(__name__)

Stage1Name = Literal["train_encoder", "train_decoder", "train_joint"]
ENCODER = "encoder"
DECODER = "decoder"


@dataclass(frozen=True)
class Stage1Inputs:
    """Folders a phase-1 stage reads: the base model, the chunked data, and earlier stages' adapters."""

    base_dir: Path
    chunked_dir: Path
    encoder_stage_dir: Path | None = None  # train_encoder's output (encoder adapter)
    decoder_stage_dir: Path | None = None  # train_decoder's output (decoder adapter)


HEALTH_TRACE_KEYS = ("distinct_top1", "chunk_mass", "mean_entropy", "collapsed")


class LatentHealthTrace(TrainerCallback):
    """After every validation, alpha's health on the validation rows (the full statistics), appended to the
    trainer's log history (saved with each checkpoint, so a resumed run keeps it): the metrics then show where a
    collapse began, and the best checkpoint's statistics need no second measurement."""

    def __init__(self, measure: Callable[[], dict | None]):
        self.measure = measure

    def on_evaluate(self, args, state, control, **kwargs):
        health = self.measure()
        if health is not None:
            state.log_history.append({"step": state.global_step, "latent_health": health})
            log.info("step %d: latents on the validation rows: %s", state.global_step, trace_entry(health))


def trace_entry(health: dict) -> dict:
    """The statistics of one validation that ``latent_health_by_step`` keeps."""
    return {key: health[key] for key in HEALTH_TRACE_KEYS}


def health_by_step(log_history: list[dict]) -> dict[str, dict]:
    """step -> the LatentHealthTrace statistics of that step, from a trainer's log history."""
    return {str(entry["step"]): entry["latent_health"] for entry in log_history if "latent_health" in entry}


def _required(folder: Path | None, stage: str) -> Path:
    if folder is None:
        raise ArtifactError(f"{stage} needs the output of an earlier phase-1 stage")
    return folder


def stage1_models(params: Params, stage: Stage1Name, inputs: Stage1Inputs) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Encoder and decoder of a phase-1 stage, with new LoRA on what it trains and the rest frozen."""
    section = getattr(params, stage)
    encoder = load_pretrained_model(inputs.base_dir)
    decoder = load_pretrained_model(inputs.base_dir)
    warn_on_untied_input_projection(decoder, params.latent, inputs.base_dir)
    if stage in ("train_decoder", "train_joint"):
        encoder = merged(encoder, _required(inputs.encoder_stage_dir, stage) / ENCODER)
    if stage == "train_joint":
        decoder = merged(decoder, _required(inputs.decoder_stage_dir, stage) / DECODER)
    seed = params.base.seed
    encoder = with_lora(encoder, section.encoder_lora, seed) if section.encoder_lora else frozen(encoder)
    decoder = with_lora(decoder, section.decoder_lora, seed + 1) if section.decoder_lora else frozen(decoder)
    return encoder, decoder


def _examples(params: Params, stage: Stage1Name, path: Path, ids: SpecialIds, tokenizer_id: str, limit: int | None):
    """The split's first ``limit`` rows and their phase-1 examples."""
    rows = read_chunked(path, params.base.compression_rate, tokenizer_id)[:limit]
    examples = [stage1_example(row, ids) for row in rows]
    lengths = [max(len(e.encoder.input_ids), len(e.decoder.input_ids)) for e in examples]
    max_len = getattr(params, stage).train.max_seq_len
    check_sequence_lengths(path, [r.id for r in rows], lengths, max_len, f"{stage}.train.max_seq_len")
    return rows, SequenceDataset(examples)


def train_stage1(
    params: Params,
    stage: Stage1Name,
    inputs: Stage1Inputs,
    out_dir: Path,
    metrics_path: Path,
    loss_curve_path: Path,
    scratch_dir: Path | None = None,
) -> dict | None:
    """Run one phase-1 training; rank 0 writes its adapter(s) to ``out_dir``, metrics and the loss curve and
    returns the metrics (the other processes of a distributed run return None)."""
    section = getattr(params, stage)
    scratch_dir = scratch_dir or SCRATCH_ROOT / stage
    tokenizer = load_tokenizer(inputs.base_dir)
    chunked = Path(inputs.chunked_dir)
    ids, tokenizer_id = special_ids(tokenizer), tokenizer_fingerprint(tokenizer)
    _, train = _examples(params, stage, chunked / "train.parquet", ids, tokenizer_id, section.max_train_rows)
    val_rows, val = _examples(params, stage, chunked / "val.parquet", ids, tokenizer_id, section.max_eval_rows)
    if not val:
        raise DataError(f"{chunked / 'val.parquet'}: the validation split is empty; phase 1 selects checkpoints on it")
    encoder, decoder = stage1_models(params, stage, inputs)
    check_top_k(params, encoder.get_input_embeddings().weight.shape[0], inputs.base_dir)  # peft wraps the module
    model = Stage1Model(encoder, decoder, params.latent, params.base.top_k, section.diversity_weight,
                        section.chunk_anchor_weight)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %d trainable parameters, %d train / %d validation rows", stage, trainable, len(train), len(val))

    fingerprint = run_fingerprint(
        stage=stage,
        section=section.model_dump(mode="json"),
        latent=params.latent.model_dump(mode="json"),
        base=params.base.model_dump(mode="json", include={"seed", "compression_rate", "top_k"}),
        inputs={name: dir_digest(folder) for name, folder in vars(inputs).items() if folder is not None},
    )
    def measure_health() -> dict | None:
        return measure_encoder_health(encoder, decoder, params, val_rows, ids, section.train.batch_size)

    trace = LatentHealthTrace(measure_health)
    result = run_training(
        model, train, Stage1Collator(ids.pad), section.train, scratch_dir,
        params.base.seed, fingerprint, trainer_cls=TrainableStateTrainer, eval_dataset=val, callbacks=[trace],
        deepspeed=section.deepspeed, compute=params.compute,
    )
    metrics = {"trainable_parameters": trainable, **result.summary()}
    traced = health_by_step(result.log_history)
    if traced:
        metrics["latent_health_by_step"] = {step: trace_entry(health) for step, health in traced.items()}
    # the best checkpoint's latents on the validation rows: a collapse must show here, not three stages later
    health = traced.get(str(result.best_checkpoint_step)) or measure_health()
    # under ZeRO-3 each process holds a partition of what is saved: every process gathers, rank 0 writes
    with whole_parameters(saved_parameters(model)):
        if not World.from_environment().is_main:
            return None
        if health is not None:
            report_health(f"{stage} (validation)", health, params.collapse_guard)
            metrics["latent_health"] = health
        with atomic_outputs() as outputs:
            adapters = outputs.folder(out_dir)
            for name, part, lora in ((ENCODER, encoder, section.encoder_lora),
                                     (DECODER, decoder, section.decoder_lora)):
                if lora is not None:
                    part.save_pretrained(str(adapters / name))
            write_json(outputs.path(metrics_path), metrics)
            write_loss_curve(outputs.path(loss_curve_path), result)
    finish_scratch(scratch_dir)
    return metrics


def saved_parameters(model: Stage1Model) -> list[nn.Parameter]:
    """What the stage's adapters are saved from: the trainable (LoRA) weights, and the embedding matrices (peft
    saves them beside an adapter that covers ``embed_tokens``: the encoder's, whose new rows its merge needs)."""
    return [parameter for name, parameter in model.named_parameters()
            if parameter.requires_grad or any(f".{layer}." in name for layer in EMBEDDING_LAYER_NAMES)]


def merge_stage1(base_dir: Path, encoder_stage_dir: Path, decoder_stage_dir: Path, joint_dir: Path, out_dir: Path) -> None:
    """Merge every phase-1 adapter into plain Hugging Face encoder and decoder checkpoints (with tokenizer).

    encoder = base + train_encoder's adapter + train_joint's encoder adapter; decoder likewise.
    """
    tokenizer = load_tokenizer(base_dir)
    parts = {}
    for name, stage_dir in ((ENCODER, encoder_stage_dir), (DECODER, decoder_stage_dir)):
        parts[name] = merged(merged(load_pretrained_model(base_dir), Path(stage_dir) / name), Path(joint_dir) / name)
    with atomic_dir(out_dir) as tmp:
        for name, model in parts.items():
            save_model(model, tokenizer, tmp / name)
