"""Typed pipeline parameters: the only reader of ``params.yaml``.

Every section of ``params.yaml`` maps to one pydantic model below. Models forbid unknown keys, so a typo
fails at once with the offending key path (``base.data.sorce``) and, for enumerations, the allowed values.
Stages load the whole file (so any error surfaces in whichever stage runs first) and use their own section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from latent_sft_core.errors import PipelineError

DEFAULT_PARAMS_PATH = Path("params.yaml")
# multipliers and divisors of the synthetic in-distribution problems stay 2..9: products are table facts
SYNTHETIC_MAX_FACTOR = 9


class ParamsError(PipelineError):
    """A params file that cannot be read or does not validate; the message names file and key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- base


class DataSourceParams(Strict):
    source: Literal["synthetic", "gsm8k_aug_txt", "jsonl", "hub"] = "synthetic"


class ModelSourceParams(Strict):
    """The model CoT-SFT starts from; the import_model stage (``latent_sft_core.model_import``) brings it in."""

    source: Literal["tiny", "path", "gguf", "hub"] = "tiny"
    path: str | None = Field(default=None, description="local Hugging Face checkpoint folder (source 'path')")
    gguf_file: str | None = Field(default=None, description="a GGUF file, converted to safetensors (source 'gguf')")
    repo_id: str | None = Field(default=None, description="a Hugging Face model repository (source 'hub')")
    revision: str = Field(default="main", description="branch, tag or commit of repo_id; a commit is reproducible")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _location_given_for_its_source(self) -> ModelSourceParams:
        key = {"path": "path", "gguf": "gguf_file", "hub": "repo_id"}.get(self.source)
        if key is not None and not getattr(self, key):
            raise ValueError(f"model.{key} is required when model.source is {self.source!r}")
        return self

    def checkpoint_dir(self, imported_dir: Path | str) -> Path:
        """The Hugging Face checkpoint of a pretrained source: its own folder ('path'), or ``imported_dir``, where
        the import_model stage converted ('gguf') or downloaded ('hub') it."""
        if self.source == "tiny":
            raise ValueError("base.model.source 'tiny' has no pretrained checkpoint")
        return Path(self.path) if self.source == "path" else Path(imported_dir)


class TextParams(Strict):
    """How question and answer are rendered; see ``latent_sft_core.text`` for the template itself."""

    template: Literal["plain", "chat"] = "plain"
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    answer_template: str = "{answer}"

    @model_validator(mode="after")
    def _answer_template_has_slot(self) -> TextParams:
        if "{answer}" not in self.answer_template:
            raise ValueError("text.answer_template must contain the placeholder '{answer}'")
        return self


class BaseParams(Strict):
    seed: int = 0
    compression_rate: int = Field(default=4, ge=1, description="c: chain tokens per latent")
    top_k: int = Field(default=10, ge=1, description="k of the top-k soft embedding (0 < k <= vocab)")
    data: DataSourceParams = DataSourceParams()
    model: ModelSourceParams = ModelSourceParams()
    text: TextParams = TextParams()


# -------------------------------------------------------------------------------------- prepare_data


class SyntheticParams(Strict):
    """Sizes and ranges of the generated GSM8k-Aug-style data set (see ``data/synthetic.py``)."""

    train_size: int = Field(default=75000, ge=1)
    val_size: int = Field(default=300, ge=0)
    test_size: int = Field(default=500, ge=0)
    ood_size: int = Field(default=300, ge=0, description="rows of each out-of-distribution split")
    min_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=3, ge=1)
    max_operand: int = Field(default=10, ge=2, description="largest number stated in a problem")
    hard_max_factor: int = Field(
        default=10, ge=2, description="largest multiplier or divisor in the 'hard' split (training: 2..9)"
    )
    reworded_distractors: int = Field(default=1, ge=0, description="irrelevant sentences per 'reworded' problem")
    alt_chains: int = Field(default=3, ge=0, description="alternative valid chains stored per test problem")

    @property
    def max_factor(self) -> int:
        """The largest multiplier or divisor of the in-distribution splits."""
        return min(SYNTHETIC_MAX_FACTOR, self.max_operand)

    @model_validator(mode="after")
    def _ranges(self) -> SyntheticParams:
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must be <= max_steps")
        if self.hard_max_factor <= self.max_factor:
            # every 'hard' problem multiplies or divides by a number above the trained ones, so there must be room
            raise ValueError(f"hard_max_factor must be > min({SYNTHETIC_MAX_FACTOR}, max_operand)")
        return self


class FieldNames(Strict):
    """Column names in a jsonl source; the reference data uses problem / cot / cot_answer for training and
    problem / solution / answer for its test files. ``id`` names an optional id column; without it rows get
    ``{split}-{line}`` ids."""

    id: str | None = Field(default=None, min_length=1)
    question: str = Field(default="question", min_length=1)
    cot: str = Field(default="cot", min_length=1)
    answer: str = Field(default="answer", min_length=1)


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


class FileSourceParams(Strict):
    """Files per split. Split names other than train/val/test are evaluation-only (e.g. OOD sets).

    ``fields`` applies to every split unless ``split_fields`` overrides it for that split: the reference
    data names its columns differently in training and test files.
    """

    files: dict[str, str] = Field(default_factory=dict)
    fields: FieldNames = FieldNames()
    split_fields: dict[str, FieldNames] = Field(default_factory=dict, description="per-split override of fields")

    @model_validator(mode="after")
    def _split_names(self) -> FileSourceParams:
        # split names become file names ({split}.parquet), so keep them plain
        bad = sorted(name for name in self.files if not _SPLIT_NAME.fullmatch(name))
        if bad:
            raise ValueError(f"split names may use only letters, digits, '_' and '-': {', '.join(bad)}")
        unknown = sorted(set(self.split_fields) - set(self.files))
        if unknown:
            raise ValueError(f"split_fields names splits without a file: {', '.join(unknown)}")
        return self

    def fields_for(self, split: str) -> FieldNames:
        """The column names to read ``split`` with."""
        return self.split_fields.get(split, self.fields)


class HubParams(FileSourceParams):
    """A Hugging Face dataset repository; ``files`` are paths inside the repository, read as ``format``."""

    repo_id: str = "DJCheng/Latent-Reasoning-Data"
    revision: str = "main"
    format: Literal["jsonl", "gsm8k_aug_txt"] = "jsonl"
    # the reference repository's training files; its test files need split_fields (problem / solution / answer)
    fields: FieldNames = FieldNames(question="problem", cot="cot", answer="cot_answer")


class PrepareDataParams(Strict):
    on_bad_row: Literal["error", "skip"] = "error"
    val_from_train: int = Field(default=0, ge=0, description="rows moved from train to val when no val file")
    max_rows: int | None = Field(default=None, ge=1, description="cap per split (quick trials)")
    synthetic: SyntheticParams = SyntheticParams()
    gsm8k_aug_txt: FileSourceParams = FileSourceParams()
    jsonl: FileSourceParams = FileSourceParams()
    hub: HubParams = HubParams()


# ------------------------------------------------------------------------------------------ tokenizer


class TokenizerParams(Strict):
    vocab_size: int = Field(default=512, ge=64, description="BPE vocabulary of the embedded tokenizer")
    min_frequency: int = Field(default=2, ge=1)


# ------------------------------------------------------------------------------------------ training


class TrainParams(Strict):
    """One training run; shared by every training stage."""

    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, description="overrides epochs when > 0")
    batch_size: int = Field(
        default=64, ge=1, description="rows per forward pass over all processes: each of N processes takes "
        "batch_size / N, so the optimizer sees the same rows per step whatever N is")
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(default=1.0, gt=0)
    save_steps: int = Field(default=200, ge=1, description="resume checkpoint interval")
    logging_steps: int = Field(default=20, ge=1)
    max_seq_len: int = Field(default=512, ge=8, description="longer training sequences are an error")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each layer's activations in the backward pass: less memory, ~30% more time")
    dataloader_workers: int = Field(default=0, ge=0)


class DeepSpeedParams(Strict):
    """DeepSpeed ZeRO for one training stage (latent_sft_core/deepspeed_config.py builds its config). Off: the
    stage trains in one process, or with DDP under several (``launch``)."""

    enabled: bool = False
    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = Field(default=False, description="ZeRO-3 only")
    persistence_threshold: int | None = Field(
        default=None, ge=0,
        description="ZeRO-3 only: parameters of fewer elements stay whole on every process instead of partitioned "
        "(DeepSpeed's stage3_param_persistence_threshold); null: DeepSpeed's default, 1e5",
    )

    @model_validator(mode="after")
    def _zero3_options_need_zero3(self) -> DeepSpeedParams:
        chosen = {"offload_params": self.offload_params, "persistence_threshold": self.persistence_threshold is not None}
        for name, set_here in chosen.items():
            if set_here and self.zero_stage != 3:
                raise ValueError(f"{name} needs zero_stage 3")
        return self


class TinyModelParams(Strict):
    """Sizes of the config-built Llama of the embedded default."""

    hidden_size: int = Field(default=128, ge=8)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    intermediate_size: int = Field(default=512, ge=8)
    max_position_embeddings: int = Field(default=512, ge=16)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelParams:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        return self


class BaseModelParams(Strict):
    skip_sft: bool = Field(default=False, description="with model.source 'path': keep the checkpoint as is")
    reasoning: Literal["cot", "none"] = Field(
        default="cot", description="none: train to answer right after <think></think> (the no-CoT baseline)"
    )
    tiny: TinyModelParams = TinyModelParams()
    train: TrainParams = TrainParams(epochs=1.0, lr=3e-3, logging_steps=50)
    deepspeed: DeepSpeedParams = DeepSpeedParams()
    new_token_lr: float | None = Field(
        default=None, gt=0, description="learning rate of the rows of the tokens added to a pretrained model's "
        "vocabulary (<think>, </think>, <|latent|>, a pad); null: train.lr (a tiny model's rows are all new)")
    eval_rows: int = Field(default=300, ge=0, description="validation rows decoded for the stage's metric")
    eval_batch_size: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=96, ge=1)

    @model_validator(mode="after")
    def _new_token_lr_needs_whole_rows(self) -> BaseModelParams:
        if self.new_token_lr is not None and self.deepspeed.enabled and self.deepspeed.zero_stage == 3:
            raise ValueError("new_token_lr rescales rows of the embedding matrix, which ZeRO-3 partitions; use "
                             "deepspeed.zero_stage 2 or leave new_token_lr null")
        return self


# ---------------------------------------------------------------------------------------------- phase 1


class LatentParams(Strict):
    """How latent tokens are formed and masked; shared by phase 1, the soft-label cache, stage 2 and inference."""

    kind: Literal["soft_embedding", "hidden_state"] = Field(
        default="soft_embedding", description="hidden_state: the paper's ablation feeding h instead of alpha @ E"
    )
    full_vocab: bool = Field(default=False, description="alpha over the whole vocabulary instead of base.top_k")
    temperature: float = Field(default=1.0, gt=0)
    projection: Literal["input_embeddings", "lm_head"] = Field(
        default="input_embeddings", description="logits E h (reference code) or W h (LM head); equal when tied"
    )
    encoder_mask: Literal["ltim", "causal"] = Field(default="ltim", description="causal: the 'w/o LTIM' ablation")
    decoder_mask: Literal["ltsum", "prefix", "causal"] = Field(
        default="ltsum", description="prefix: the paper's Pi_i reading; causal: the 'w/o LTSuM' ablation"
    )


class CollapseGuardParams(Strict):
    """When phase 1's latents count as collapsed (``latent_health``); checked by every phase-1 stage and the
    soft-label cache on the rows they see."""

    min_distinct_top1_fraction: float = Field(
        default=0.3, ge=0, le=1, description="distinct top-1 tokens over distinct chunk tokens, at least"
    )
    min_chunk_mass: float = Field(default=0.1, ge=0, le=1, description="alpha's mass on its own chunk, at least")
    on_collapse: Literal["warn", "error"] = Field(
        default="warn", description="warn: a loud warning and collapsed=true in the metrics; error: fail the stage"
    )


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraParams(Strict):
    """A LoRA adapter (peft). Real models in the paper: rank 64, alpha 128, dropout 0.1."""

    rank: int = Field(default=32, ge=1)
    alpha: int = Field(default=64, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: tuple[str, ...] = Field(default=DEFAULT_LORA_TARGETS, min_length=1)


class Stage1Params(Strict):
    """One phase-1 training (encoder, decoder or joint). ``*_lora`` null = that model stays frozen."""

    encoder_lora: LoraParams | None = None
    decoder_lora: LoraParams | None = None
    train: TrainParams = TrainParams(epochs=1.0, lr=1e-3, save_steps=100, logging_steps=20)
    deepspeed: DeepSpeedParams = DeepSpeedParams()
    max_train_rows: int | None = Field(default=12800, ge=1, description="first rows of the train split used")
    max_eval_rows: int = Field(default=256, ge=1, description="validation rows scored to pick the best checkpoint")
    diversity_weight: float = Field(
        default=0.0, ge=0,
        description="ours: training loss L_sup - weight * entropy of the batch's mean alpha, against a collapse "
        "onto a few tokens; 0 = the paper's L_sup (phase1_model.Stage1Model)",
    )
    chunk_anchor_weight: float = Field(
        default=0.0, ge=0,
        description="ours: training loss L_sup + weight * mean over latents of -log P(the latent's own chunk) under "
        "the encoder's full-vocabulary softmax, against latents drifting off their chunk; 0 = the paper's L_sup",
    )


ENCODER_LORA = LoraParams(targets=(*DEFAULT_LORA_TARGETS, "embed_tokens"))  # embed_tokens: the new latent row


# ---------------------------------------------------------------------------------------------- phase 2


class CacheSoftLabelsParams(Strict):
    splits: tuple[str, ...] = Field(default=("train", "val"), min_length=1, description="chunked splits to cache")
    batch_size: int = Field(default=128, ge=1)
    prob_dtype: Literal["float16", "float32"] = "float16"
    row_group_rows: int = Field(default=256, ge=1, description="small groups keep shuffled reads cheap")
    max_rows: int | None = Field(default=25600, ge=1, description="first rows of each split")


class GumbelParams(Strict):
    """Teacher noise ``p~ = softmax((log alpha + clamp(scale * G)) / tau)`` (soft_embedding.gumbel_perturb)."""

    enabled: bool = False
    scale: float = Field(default=1.0, ge=0)
    tau: float = Field(default=1.0, gt=0)
    clamp_min: float = -1.5
    clamp_max: float = 3.0

    @model_validator(mode="after")
    def _clamp_order(self) -> GumbelParams:
        if self.clamp_min >= self.clamp_max:
            raise ValueError("clamp_min must be < clamp_max")
        return self


class ScheduledSamplingParams(Strict):
    """Ours, beyond the paper: stage 2 feeds some slots the student's own latent instead of the teacher's.

    A no-grad teacher-forced pass gives the student's alpha at every slot (as inference would make it from that
    prefix); each slot's input becomes the student's mixture with probability ``p``, rising linearly from 0 to
    ``max_probability`` over training. The KL target stays the teacher's alpha. Costs one extra no-grad forward.
    """

    enabled: bool = False
    max_probability: float = Field(default=0.5, ge=0, le=1)


class TrainLatentParams(Strict):
    """Stage 2: the LLM learns to produce the latents itself (KL on latent slots, CE on the answer)."""

    finetune: Literal["lora", "full"] = Field(
        default="full", description="full: every weight, ZeRO-sharded (the tiny default); lora: an adapter (paper)"
    )
    lora: LoraParams = LoraParams()
    # stage 2 is where the embedded default's accuracy is won or lost (BENCHMARKS.md): long and fast
    train: TrainParams = TrainParams(epochs=8.0, lr=3e-3, save_steps=200, logging_steps=20)
    ce_weight: float = Field(default=1.0, ge=0)
    kl_weight: float = Field(default=1.0, ge=0, description="latent term: KL, or MSE for hidden_state latents")
    # the hidden-state ablation's free-running models stopped thinking at once: nothing but this term keeps the LM
    # head off </think> at its latent slots (BENCHMARKS.md, "Hidden state")
    hidden_state_stop_weight: float = Field(
        default=0.0, ge=0, description="ours: weight of -log(1 - p(</think>)) at hidden-state latent slots, in the latent term"
    )
    loss_schedule: Literal["sum", "alternate"] = Field(
        default="sum", description="alternate: KL-only, CE-only and joint steps in turn (the paper's schedule)"
    )
    gumbel: GumbelParams = GumbelParams()
    scheduled_sampling: ScheduledSamplingParams = ScheduledSamplingParams()
    deepspeed: DeepSpeedParams = DeepSpeedParams(enabled=True)
    max_train_rows: int | None = Field(default=25600, ge=1)
    max_eval_rows: int = Field(default=256, ge=1)


# ------------------------------------------------------------------------------------------ evaluation


class SamplingParams(Strict):
    """How explicit tokens are chosen: greedy when ``temperature`` is 0, else temperature + nucleus sampling.

    The latent-mode stop decision is always the greedy token (``</think>`` or not), as in the reference.
    """

    temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 777


class DecodingParams(Strict):
    batch_size: int = Field(default=64, ge=1, description="questions decoded together on one KV cache")
    max_latent_steps: int = Field(default=32, ge=0, description="latent-step cap; then </think> is forced")
    max_new_tokens: int = Field(
        default=96, ge=1, description="explicit tokens: the CoT-SFT chain and answer, or the answer after latents"
    )
    sampling: SamplingParams = SamplingParams()
    gumbel: GumbelParams = GumbelParams()


ModelName = Literal["cot_sft", "latent_sft"]  # cot_sft: models/base (explicit CoT); latent_sft: models/latent


class EvaluateParams(Strict):
    """The evaluate stage: every model of the pipeline on every evaluation split, same decoder, same scorer."""

    models: tuple[ModelName, ...] = Field(default=get_args(ModelName), min_length=1)
    splits: tuple[str, ...] | None = Field(
        default=None, description="chunked splits to evaluate; null = every split except train and val"
    )
    max_rows: int | None = Field(default=None, ge=1, description="first rows of each split (quick trials)")
    decoding: DecodingParams = DecodingParams()
    ecr_k: tuple[int, ...] = Field(default=(1, 2, 5, 10, 20, 50), min_length=1, description="K values of ECR@K")
    analysis_top_k: int = Field(
        default=100, ge=1, description="tokens of each latent step's distribution kept for ECR@K and N_eff"
    )
    heatmap_questions: int = Field(default=4, ge=0, description="test questions shown in the top-token heat map")
    heatmap_tokens: int = Field(default=5, ge=1, description="top tokens per latent step in the heat map")

    @model_validator(mode="after")
    def _ecr_k_within_kept_tokens(self) -> EvaluateParams:
        if max(self.ecr_k) > self.analysis_top_k or min(self.ecr_k) < 1:
            raise ValueError(f"ecr_k values must be in 1..analysis_top_k ({self.analysis_top_k}), got {self.ecr_k}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models lists a model twice: {self.models}")
        return self


# ------------------------------------------------------------------------------------------- compute


class ComputeParams(Strict):
    """Where and in what precision the model stages compute (training, soft-label caching, evaluation).

    ``auto`` picks the GPU of the process (``cuda:<local rank>``) when there is one, else the CPU; and bf16 on a
    GPU that supports it, fp32 elsewhere. Training in bf16 is mixed precision (fp32 weights and optimizer, bf16
    autocast, DeepSpeed's bf16 mode under ZeRO); inference loads the models in the dtype.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    attention: Literal["sdpa", "eager"] = Field(default="sdpa", description="the models' attention kernels")


DEFAULT_COMPUTE = ComputeParams()


# -------------------------------------------------------------------------------------------- launch


class LaunchParams(Strict):
    """How many processes run each distributed stage (``latent_sft_core.launcher``; every dvc.yaml command
    goes through it). One process on one node runs the stage exactly as ``python -m tasks.<stage>``.

    Several nodes: ``torchrun`` is started on every node with its own ``node_rank`` (the environment variable
    ``LATENT_SFT_NODE_RANK`` overrides it, so all nodes can share one params.yaml); ``deepspeed`` starts every
    node of ``hostfile`` from this one over ssh.
    """

    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    processes_per_node: int = Field(default=1, ge=1, description="one per GPU; CPU runs use gloo")
    nodes: int = Field(default=1, ge=1)
    node_rank: int = Field(default=0, ge=0, description="this node's rank (torchrun on several nodes)")
    master_addr: str = Field(default="127.0.0.1", min_length=1, description="address of the node of rank 0")
    master_port: int = Field(default=29500, ge=1, le=65535)
    hostfile: str | None = Field(default=None, description="deepspeed's hostfile ('host slots=N' per line)")

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes

    @model_validator(mode="after")
    def _nodes_are_reachable(self) -> LaunchParams:
        if self.node_rank >= self.nodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nodes ({self.nodes})")
        if self.nodes > 1 and self.launcher == "deepspeed" and not self.hostfile:
            raise ValueError("launch.hostfile is required when launch.launcher is 'deepspeed' with several nodes")
        if self.nodes > 1 and self.master_addr in ("127.0.0.1", "localhost"):
            raise ValueError("launch.master_addr must be the address of node 0 when launch.nodes > 1 "
                             f"(got {self.master_addr!r}, which every node would take for itself)")
        return self


# ------------------------------------------------------------------------------------------- the file


class Params(Strict):
    base: BaseParams = BaseParams()
    prepare_data: PrepareDataParams = PrepareDataParams()
    tokenizer: TokenizerParams = TokenizerParams()
    base_model: BaseModelParams = BaseModelParams()
    latent: LatentParams = LatentParams()
    collapse_guard: CollapseGuardParams = CollapseGuardParams()
    # both trainings of the encoder can pull every latent onto a few tokens or off its chunk, depending on the
    # seed, the base model and the floating-point path; the diversity and chunk-anchor terms (ours) keep them out of
    # those basins (BENCHMARKS.md, "Phase-1 collapse")
    train_encoder: Stage1Params = Stage1Params(encoder_lora=ENCODER_LORA, max_train_rows=6400, diversity_weight=0.05,
                                               chunk_anchor_weight=0.1)
    train_decoder: Stage1Params = Stage1Params(decoder_lora=LoraParams(), max_train_rows=6400)
    train_joint: Stage1Params = Stage1Params(
        encoder_lora=ENCODER_LORA, decoder_lora=LoraParams(), max_train_rows=12800, diversity_weight=0.05,
        chunk_anchor_weight=0.1,
    )
    cache_soft_labels: CacheSoftLabelsParams = CacheSoftLabelsParams()
    train_latent: TrainLatentParams = TrainLatentParams()
    evaluate: EvaluateParams = EvaluateParams()
    compute: ComputeParams = ComputeParams()
    launch: LaunchParams = LaunchParams()

    @model_validator(mode="after")
    def _gumbel_noise_needs_soft_embeddings(self) -> Params:
        noisy = [key for key, gumbel in (("train_latent.gumbel", self.train_latent.gumbel),
                                         ("evaluate.decoding.gumbel", self.evaluate.decoding.gumbel)) if gumbel.enabled]
        if noisy and self.latent.kind == "hidden_state":
            raise ValueError(f"{', '.join(noisy)}: Gumbel noise perturbs alpha; latent.kind 'hidden_state' has none")
        return self

    @model_validator(mode="after")
    def _stop_term_needs_hidden_states(self) -> Params:
        if self.train_latent.hidden_state_stop_weight and self.latent.kind != "hidden_state":
            raise ValueError("train_latent.hidden_state_stop_weight: the stop term is for latent.kind 'hidden_state' "
                             "(the KL term already keeps alpha latents off </think>)")
        return self

    @model_validator(mode="after")
    def _phase1_sections_train_their_models(self) -> Params:
        expected = {"train_encoder": (True, False), "train_decoder": (False, True), "train_joint": (True, True)}
        for name, (encoder, decoder) in expected.items():
            section: Stage1Params = getattr(self, name)
            if (section.encoder_lora is not None, section.decoder_lora is not None) != (encoder, decoder):
                wanted = " and ".join(n for n, on in (("encoder_lora", encoder), ("decoder_lora", decoder)) if on)
                raise ValueError(f"{name} trains exactly {wanted}: set {wanted} and leave the other null")
        pointless = [f"{name}.{term}" for name in expected for term in ("diversity_weight", "chunk_anchor_weight")
                     if getattr(getattr(self, name), term) and (
                         getattr(self, name).encoder_lora is None or self.latent.kind != "soft_embedding")]
        if pointless:
            raise ValueError(f"{', '.join(pointless)}: the diversity and chunk-anchor terms act on the alpha of a "
                             "trained encoder (encoder_lora set, latent.kind 'soft_embedding'); set each to 0")
        return self

    @model_validator(mode="after")
    def _skip_sft_needs_a_checkpoint(self) -> Params:
        if self.base_model.skip_sft and self.base.model.source == "tiny":
            raise ValueError("base_model.skip_sft needs a pretrained base.model.source: a tiny model starts untrained")
        return self


def check_top_k(params: Params, vocab_size: int, model_dir: Path | str) -> None:
    """``base.top_k`` must fit the vocabulary of the model it selects tokens from, known once a model is loaded."""
    uses_top_k = params.latent.kind == "soft_embedding" and not params.latent.full_vocab
    if uses_top_k and params.base.top_k > vocab_size:
        raise ParamsError(f"base.top_k={params.base.top_k} is larger than the vocabulary of {model_dir} "
                          f"({vocab_size} tokens); set base.top_k to at most {vocab_size}")


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied key by key (nested mappings merged, other values replaced)."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def parse_params(data: object, source: Path | str = "<params>") -> Params:
    """Validate an already-loaded mapping; raise ParamsError naming ``source`` and every bad key."""
    source = Path(source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(_format_validation_error(source, error)) from None


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ParamsError(f"{path}: cannot read params file ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(data, path)
