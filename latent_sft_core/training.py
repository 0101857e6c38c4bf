"""Resumable training on the Hugging Face Trainer, shared by every training stage.

Under several processes (``latent_sft_core.launcher``) the Trainer trains with DDP, or with DeepSpeed ZeRO when
the stage's ``deepspeed.enabled``; ``train.batch_size`` is the batch of all processes together, so each takes
``batch_size / N`` rows and every optimizer step sees the same rows as one process would. Rank 0 prepares the
scratch folder and writes the stage's outputs.

Resume checkpoints live in a scratch folder outside the DVC outs (``.scratch/<stage>``). The folder carries a
fingerprint of everything the run depends on (params, input data, tokenizer); a rerun with the same
fingerprint resumes from the newest checkpoint (weights, optimizer, scheduler, RNG states), a rerun with
another fingerprint starts over. The folder is removed once the stage's outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from latent_sft_core.config import DEFAULT_COMPUTE, ComputeParams, DeepSpeedParams, ParamsError, TrainParams
from latent_sft_core.deepspeed_config import deepspeed_config
from latent_sft_core.distributed import (
    World,
    barrier,
    clear_stale_build_locks,
    compute_device,
    compute_dtype,
    ensure_distributed_env,
    whole_parameters,
)
from latent_sft_core.errors import ArtifactError, DataError
from latent_sft_core.io import atomic_path, file_digest
from latent_sft_core.layout import TokenSequence, labels_from_roles, pad_sequences
from latent_sft_core.losses import PositionLogits, causal_lm_loss, loss_positions
from latent_sft_core.modeling import checkpoint_activations, logits_only_at, outermost_hf_models, use_attention

log = logging.getLogger(__name__)
SCRATCH_ROOT = Path(".scratch")
FINGERPRINT_FILE = "fingerprint.json"


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, sequences: Sequence[TokenSequence]):
        self.sequences = list(sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> TokenSequence:
        return self.sequences[index]


@dataclass(frozen=True)
class CausalLMCollator:
    """Pads a batch of TokenSequences; labels from roles (chain and answer supervised)."""

    pad_id: int

    def __call__(self, batch: Sequence[TokenSequence]) -> dict[str, torch.Tensor]:
        padded = pad_sequences(batch, self.pad_id)
        return {
            "input_ids": padded["input_ids"],
            "attention_mask": padded["attention_mask"],
            "labels": labels_from_roles(padded["input_ids"], padded["roles"]),
        }


def check_sequence_lengths(source: Path, row_ids: Sequence[str], lengths: Sequence[int], max_len: int, key: str) -> None:
    """A DataError naming file, row and params key for the first sequence longer than ``max_len``."""
    for row_id, length in zip(row_ids, lengths):
        if length > max_len:
            raise DataError(f"{source}: row {row_id} has {length} tokens, more than {key}={max_len}")


def dir_digest(path: Path | str) -> str:
    """Digest of every file under ``path`` (names and contents); a file's digest when ``path`` is a file."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()


def run_fingerprint(**parts: object) -> str:
    """Stable hash of JSON-able parts (params dumps, file digests, tokenizer fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_scratch(scratch_dir: Path, fingerprint: str) -> str | None:
    """Make ``scratch_dir`` belong to this run; return the checkpoint to resume from, if any."""
    marker = scratch_dir / FINGERPRINT_FILE
    if scratch_dir.exists():
        previous = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        if previous != fingerprint:
            log.info("%s holds checkpoints of another run (params or inputs changed); starting over", scratch_dir)
            shutil.rmtree(scratch_dir)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint}))
    checkpoint = latest_complete_checkpoint(scratch_dir)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    return checkpoint


def latest_complete_checkpoint(scratch_dir: Path) -> str | None:
    """The newest checkpoint whose trainer state (written last by the Trainer) is intact.

    A checkpoint cut short by a kill is deleted, so the run falls back to the one before it.
    """
    while (checkpoint := get_last_checkpoint(str(scratch_dir))) is not None:
        try:
            json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
            return checkpoint
        except (OSError, ValueError):
            log.warning("removing incomplete checkpoint %s", checkpoint)
            shutil.rmtree(checkpoint)
    return None


def per_process_batch_size(train: TrainParams, world_size: int) -> int:
    """Rows each of ``world_size`` processes takes of the ``train.batch_size`` rows of one forward pass."""
    if train.batch_size % world_size:
        raise ParamsError(f"train.batch_size={train.batch_size} does not divide among {world_size} processes")
    return train.batch_size // world_size


def training_arguments(
    train: TrainParams, output_dir: Path, seed: int, compute: ComputeParams = DEFAULT_COMPUTE, **overrides: object,
) -> TrainingArguments:
    """TrainingArguments from a TrainParams section and the compute params; one definition for every stage."""
    device = compute_device(compute)
    values = dict(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=per_process_batch_size(train, World.from_environment().size),
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,
        lr_scheduler_type=train.lr_scheduler,
        max_grad_norm=train.max_grad_norm,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=train.dataloader_workers,
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        bf16=compute_dtype(compute, device) == torch.bfloat16,  # mixed precision: fp32 weights, bf16 autocast
        disable_tqdm=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


TRAINABLE_WEIGHTS = "trainable.safetensors"


class ComponentLoggingTrainer(Trainer):
    """A Trainer for modules whose forward returns a dict: ``loss`` plus detached components (``*_loss``).

    The components are averaged over each logging interval and logged beside the loss. Subclasses change how
    the outputs are computed by overriding ``loss_outputs``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # our losses are means over one micro-batch, not sums for the Trainer's token count: the Trainer must divide
        # them by the accumulation steps (it skips that for a model whose forward takes **kwargs, as HF models do)
        self.model_accepts_loss_kwargs = False
        self._component_sums: dict[str, float] = {}
        self._component_count = 0

    def loss_outputs(self, model, inputs) -> dict[str, torch.Tensor]:
        return model(**inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = self.loss_outputs(model, inputs)
        if model.training:
            for name, value in outputs.items():
                if name != "loss":
                    self._component_sums[name] = self._component_sums.get(name, 0.0) + float(value)
            self._component_count += 1
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_count:
            logs |= {name: round(total / self._component_count, 6) for name, total in self._component_sums.items()}
            self._component_sums, self._component_count = {}, 0
        super().log(logs, start_time)


def causal_lm_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CoT-SFT's loss (``losses.causal_lm_loss``) for a ``CausalLMCollator`` batch, the LM head run only at the
    positions that predict a label."""
    positions = loss_positions(inputs["labels"])
    with logits_only_at(model, positions):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
    return {"loss": causal_lm_loss(PositionLogits(logits, positions), inputs["labels"])}


class CausalLMTrainer(ComponentLoggingTrainer):
    """CoT-SFT through ``causal_lm_forward``."""

    def loss_outputs(self, model, inputs):
        return causal_lm_forward(model, inputs)


class TrainableStateTrainer(ComponentLoggingTrainer):
    """A Trainer for a module of several models, most of them frozen.

    Checkpoints hold only the trainable parameters (the LoRA weights), beside the optimizer, scheduler and
    RNG state, so a resume checkpoint of a 1B model is megabytes, not gigabytes. Under ZeRO-3 only the
    trainable parameters are gathered to be saved, and the best checkpoint's are written back into every
    process's partitions.
    """

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_deepspeed_enabled and self.deepspeed.zero_optimization_partition_weights():
            # a collective (every process calls save_model); the Trainer's own path would gather the frozen models too
            state = self.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
            if self.args.should_save:
                self._save(output_dir, state_dict=state)
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        # state_dict: the weights DeepSpeed gathered (whole tensors); the module's own parameters are whole otherwise
        source = self._trainable() if state_dict is None else state_dict
        trainable = {name: source[name].detach().cpu().contiguous() for name in self._trainable()}
        save_file(trainable, str(folder / TRAINABLE_WEIGHTS))

    def _load_trainable(self, checkpoint: str | Path) -> None:
        weights = load_file(str(Path(checkpoint) / TRAINABLE_WEIGHTS))
        parameters = self._trainable()
        if set(weights) != set(parameters):
            raise ArtifactError(f"{checkpoint}: its trainable weights do not match this run's model")
        with whole_parameters(parameters.values(), modifier_rank=0), torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_trainable(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        log.info("loading the best checkpoint %s (eval loss %s)", self.state.best_model_checkpoint,
                 self.state.best_metric)
        self._load_trainable(self.state.best_model_checkpoint)


class EmbeddingRowsLearningRate(TrainerCallback):
    """Trains some rows of the token embeddings (and of an untied output embedding) at ``factor`` times the
    learning rate of the rest of the model.

    Adam's step does not grow with the gradient, so scaling the rows' gradient would change nothing: the
    callback scales the rows' update instead, after each optimizer step (weight decay included, as a larger
    learning rate would). Used for the tokens the pipeline adds to a pretrained vocabulary, whose rows start
    from the mean embedding and must be learnt in a few hundred steps.
    """

    def __init__(self, model: PreTrainedModel, row_ids: Sequence[int], factor: float) -> None:
        output = model.get_output_embeddings()
        matrices = [model.get_input_embeddings().weight, *([output.weight] if output is not None else [])]
        self.matrices = list({id(matrix): matrix for matrix in matrices}.values())  # one, when tied
        self.rows = torch.tensor(sorted(set(row_ids)), dtype=torch.long)
        self.factor = factor
        self.before: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.before = [matrix.detach()[self.rows].clone() for matrix in self.matrices]

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        with torch.no_grad():
            for matrix, before in zip(self.matrices, self.before):
                matrix[self.rows] = before + self.factor * (matrix[self.rows] - before)


@dataclass
class TrainResult:
    log_history: list[dict]
    seconds: float
    global_step: int

    best_checkpoint_step: int | None = None
    best_eval_loss: float | None = None
    world_size: int = 1
    zero_stage: int | None = None  # None: no DeepSpeed
    trainer: Trainer | None = field(default=None, repr=False)  # the finished trainer (saving, rank checks)

    def losses(self) -> list[tuple[int, float]]:
        return [(entry["step"], entry["loss"]) for entry in self.log_history if "loss" in entry]

    def curve(self) -> list[dict[str, float]]:
        """Training log rows (step, loss and any logged loss components), for a loss-curve plot."""
        return [
            {key: value for key, value in entry.items() if key == "step" or key.endswith("loss")}
            for entry in self.log_history
            if "loss" in entry
        ]

    def eval_losses(self) -> list[tuple[int, float]]:
        return [(entry["step"], entry["eval_loss"]) for entry in self.log_history if "eval_loss" in entry]

    def summary(self) -> dict:
        """What a training stage reports in its metrics file."""
        losses = self.losses()
        summary = {
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "steps": self.global_step,
            "train_seconds": round(self.seconds, 1),
            "final_loss": losses[-1][1] if losses else None,
        }
        if self.best_checkpoint_step is not None:
            summary |= {
                "best_step": self.best_checkpoint_step,
                "best_val_loss": self.best_eval_loss,
                "val_loss_by_step": {str(step): loss for step, loss in self.eval_losses()},
            }
        return summary


def run_training(
    model: PreTrainedModel,
    dataset: torch.utils.data.Dataset,
    collator: Callable,
    train: TrainParams,
    scratch_dir: Path,
    seed: int,
    fingerprint: str,
    trainer_cls: Callable[..., Trainer] = Trainer,
    eval_dataset: torch.utils.data.Dataset | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    deepspeed: DeepSpeedParams | None = None,
    compute: ComputeParams = DEFAULT_COMPUTE,
    **argument_overrides: object,
) -> TrainResult:
    """Train ``model`` in place, resuming from the scratch folder's newest checkpoint when it matches.

    With an ``eval_dataset`` the validation loss is computed at every checkpoint and the best checkpoint
    (lowest validation loss) is loaded at the end. ``callbacks`` are added to the Trainer's. With ``deepspeed``
    enabled the Trainer runs DeepSpeed ZeRO (one process too); otherwise several processes train with DDP.
    ``compute``: the device and precision (bf16: mixed precision) the model trains in, and its attention kernels.
    Checkpoints of a run with another number of processes are not resumed (each process keeps its own RNG state).
    """
    world = World.from_environment()
    zero_stage = deepspeed.zero_stage if deepspeed is not None and deepspeed.enabled else None
    if eval_dataset is not None:
        argument_overrides = {
            "eval_strategy": "steps",
            "eval_steps": train.save_steps,
            "per_device_eval_batch_size": per_process_batch_size(train, world.size),
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
            "prediction_loss_only": True,
            **argument_overrides,
        }
    if zero_stage is not None:
        ensure_distributed_env()
        clear_stale_build_locks()
        device = compute_device(compute)
        hidden_size = next((hf_model.config.hidden_size for hf_model in outermost_hf_models(model)), None)
        argument_overrides["deepspeed"] = deepspeed_config(deepspeed, compute_dtype(compute, device) == torch.bfloat16,
                                                           hidden_size)
    args = training_arguments(train, scratch_dir, seed, compute, **argument_overrides)
    use_attention(model, compute.attention)
    if train.gradient_checkpointing:
        checkpoint_activations(model)
    fingerprint = run_fingerprint(run=fingerprint, world_size=world.size)
    log.info("training: rank %d of %d%s", world.rank, world.size, f", DeepSpeed ZeRO-{zero_stage}" if zero_stage else "")
    # rank 0 clears another run's checkpoints before any process looks for one to resume from
    with args.main_process_first(local=False, desc="scratch folder"):
        checkpoint = prepare_scratch(scratch_dir, fingerprint) if world.is_main else latest_complete_checkpoint(scratch_dir)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, data_collator=collator,
        callbacks=list(callbacks),
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    best = trainer.state.best_model_checkpoint
    return TrainResult(
        trainer.state.log_history,
        time.perf_counter() - started,
        trainer.state.global_step,
        best_checkpoint_step=int(best.rsplit("-", 1)[1]) if best else None,
        best_eval_loss=trainer.state.best_metric,
        world_size=world.size,
        zero_stage=zero_stage,
        trainer=trainer,
    )


def save_whole_weights(result: TrainResult, scratch_dir: Path) -> Path:
    """Save the trained model whole into ``scratch_dir / "final"`` and return the folder. Under ZeRO-3 this gathers
    every process's partition (a collective: every process calls it); models loaded afterwards are plain ones."""
    final_dir = scratch_dir / "final"
    result.trainer.save_model(str(final_dir))
    barrier()  # rank 0 writes the gathered weights; the others may read them only once they are there
    unset_hf_deepspeed_config()  # training is over: from_pretrained must not partition what it loads
    return final_dir


def write_loss_curve(path: Path, result: TrainResult) -> None:
    """CSV of the training log (step, loss and the logged loss components), written atomically."""
    rows = result.curve()
    columns = ["step", "loss", *sorted({key for row in rows for key in row} - {"step", "loss"})]
    lines = [",".join(columns)] + [",".join(f"{row.get(c, '')}" for c in columns) for row in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def finish_scratch(scratch_dir: Path) -> None:
    """Drop the resume checkpoints once the stage's outputs are safely written."""
    shutil.rmtree(scratch_dir, ignore_errors=True)
