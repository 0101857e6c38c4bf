"""Building, loading and saving models: plain Hugging Face causal LMs with safetensors weights."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from latent_sft_core import paths
from latent_sft_core.config import ComputeParams, LoraParams, ModelSourceParams, TinyModelParams
from latent_sft_core.distributed import compute_device, compute_dtype
from latent_sft_core.errors import ArtifactError
from latent_sft_core.io import atomic_dir
from latent_sft_core.text import SpecialIds, load_tokenizer, special_ids

log = logging.getLogger(__name__)


def build_tiny_model(tiny: TinyModelParams, vocab_size: int, ids: SpecialIds, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given sizes (the embedded default's model), seeded."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=tiny.tie_word_embeddings,
        pad_token_id=ids.pad,
        eos_token_id=ids.end,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _check_weights(path: Path) -> None:
    if not any(path.glob("*.safetensors")):
        raise ArtifactError(f"{path}: no *.safetensors weights in this model folder (only safetensors are loaded)")


def load_pretrained_model(path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """A local causal-LM checkpoint, weights from safetensors only, never from the network."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path}: no config.json; not a Hugging Face model folder")
    _check_weights(path)
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        local_files_only=True,
        attn_implementation="sdpa",
        dtype=torch.float32,
    )


def load_base_model(source: ModelSourceParams, tiny: TinyModelParams, tokenizer: PreTrainedTokenizerBase, seed: int,
                    pretrained_dir: Path = paths.PRETRAINED_DIR):
    """The model CoT-SFT starts from: a config-built tiny Llama, or the pretrained checkpoint (``base.model.path``
    or the import_model stage's ``pretrained_dir``) fitted to the tokenizer."""
    ids = special_ids(tokenizer)
    if source.source == "tiny":
        return build_tiny_model(tiny, len(tokenizer), ids, seed)
    model = load_pretrained_model(source.checkpoint_dir(pretrained_dir), source.trust_remote_code)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        log.info("resizing embeddings %d -> %d for the added special tokens",
                 model.get_input_embeddings().num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = ids.pad
    model.config.eos_token_id = ids.end
    return model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path | str) -> None:
    """Model (safetensors) and tokenizer side by side, written atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))  # safetensors: the only format transformers 5 writes
        tokenizer.save_pretrained(str(tmp))


def load_model(path: Path | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model saved by ``save_model`` with its tokenizer."""
    path = Path(path)
    model = load_pretrained_model(path)
    return model, load_tokenizer(path)


def merged(model: PreTrainedModel, adapter_dir: Path | str) -> PreTrainedModel:
    """``model`` with the peft adapter in ``adapter_dir`` merged into its weights."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ArtifactError(f"{adapter_dir}: no peft adapter here (missing adapter_config.json)")
    # peft would fall back to adapter_model.bin, a pickle
    _check_weights(adapter_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")  # see with_lora
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def with_lora(model: PreTrainedModel, lora: LoraParams, seed: int) -> PeftModel:
    """``model`` wrapped with a new LoRA adapter, initialised from ``seed`` (reruns start identically)."""
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), bias="none")
    with warnings.catch_warnings():
        # peft warns when an adapter covers embeddings tied to the LM head. Only the phase-1 encoder adapts
        # embed_tokens, and its LM head is never used: merging into the tied matrix is what we want.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return get_peft_model(model, config)


def frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.requires_grad_(False)
    return model


@contextmanager
def logits_only_at(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model``'s LM head runs only at ``positions`` [B, T] (bool): a forward over [B, T] returns
    ``logits`` [n, V] for its n selected positions, row-major (``losses.PositionLogits``), instead of [B, T, V].

    A forward pre-hook on the output embedding picks the hidden states, so the head's weights, names and wrappers
    (peft, DDP, DeepSpeed) stay as they are. ``model`` may be wrapped (DDP, DeepSpeed).
    """
    head = extract_model_from_parallel(model).get_output_embeddings()

    def select(module, args):
        hidden = args[0]
        if hidden.shape[:2] != positions.shape:
            raise ValueError(f"the LM head got hidden states {tuple(hidden.shape)} for positions {tuple(positions.shape)}")
        return (hidden[positions], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def for_inference(model: PreTrainedModel, compute: ComputeParams) -> PreTrainedModel:
    """``model`` in evaluation mode on this process's device, in the compute dtype, with ``compute.attention``."""
    device = compute_device(compute)
    use_attention(model, compute.attention)
    return model.to(device=device, dtype=compute_dtype(compute, device)).eval()


def use_attention(model: torch.nn.Module, attention: str) -> None:
    """Every Hugging Face model in ``model`` (one, or phase 1's encoder and decoder) computes attention with
    ``attention`` ('sdpa' or 'eager')."""
    for hf_model in outermost_hf_models(model):
        if hf_model.config._attn_implementation != attention:
            hf_model.set_attn_implementation(attention)


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Activation checkpointing (non-reentrant, so frozen models with LoRA and DDP work) on every outermost Hugging
    Face model in ``model`` (the model itself, the one inside a peft wrapper, phase 1's encoder and decoder)."""
    for hf_model in outermost_hf_models(model):
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_model.config.use_cache = False


def outermost_hf_models(module: torch.nn.Module) -> Iterator[PreTrainedModel]:
    if isinstance(module, PreTrainedModel):
        yield module
        return
    for child in module.children():
        yield from outermost_hf_models(child)
