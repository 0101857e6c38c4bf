"""Prompt template, special tokens and tokenizers: the one place that defines how text becomes ids.

Every sequence the pipeline builds is ``[prompt] <think> [chain] </think> [answer] <end>``. The three method
tokens are *single* ids, added as special tokens to whichever tokenizer is in use:

* ``<think>`` opens the reasoning, ``</think>`` closes it (and is the one stop id of latent decoding; the
  reference code splits it into sub-tokens and stops on the first one, which we do not repeat);
* ``<|latent|>`` is the compress token placed after every chunk in the encoder's sequence.

The embedded default trains a small byte-level BPE tokenizer on the training split that, like Llama 3's, keeps
runs of up to three digits together (frequent numbers become single tokens). A latent is a superposition of
token embeddings, i.e. an unordered bag: with one digit per token "21" and "12" would be the same bag, and the
tiny model's phase-1 latents collapsed (see BENCHMARKS.md). A real model keeps its own tokenizer, gains the
three tokens (and a pad token when it has none) and has its embeddings resized to match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from latent_sft_core import paths
from latent_sft_core.config import Params, TextParams
from latent_sft_core.data.schema import read_examples
from latent_sft_core.errors import ArtifactError
from latent_sft_core.io import atomic_dir

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
LATENT = "<|latent|>"
METHOD_TOKENS = (THINK_OPEN, THINK_CLOSE, LATENT)
# Only the embedded tokenizer defines these two; a real model keeps its own end token (and pad, if any).
EMBEDDED_PAD = "<|pad|>"
EMBEDDED_END = "<|end|>"


@dataclass(frozen=True)
class SpecialIds:
    """The ids every layout, mask and decoder needs; each one a single token."""

    think_open: int
    think_close: int
    latent: int
    pad: int
    end: int


def _single_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ArtifactError(f"tokenizer encodes {token!r} as {len(ids)} ids {ids}; it must be one special token")
    return ids[0]


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """Look up (and check) the single ids of the method tokens, pad and end."""
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ArtifactError("tokenizer has no pad or end (eos) token; build it with latent_sft_core.text")
    return SpecialIds(
        think_open=_single_id(tokenizer, THINK_OPEN),
        think_close=_single_id(tokenizer, THINK_CLOSE),
        latent=_single_id(tokenizer, LATENT),
        pad=tokenizer.pad_token_id,
        end=tokenizer.eos_token_id,
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` alone: no BOS/EOS added (templates carry whatever markers they need)."""
    return tokenizer.encode(text, add_special_tokens=False)


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """``encode`` for many texts in one call (the fast tokenizer batches them)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


@dataclass(frozen=True)
class TextFormat:
    """Renders a question into the prompt and a gold answer into the answer text, from ``base.text``."""

    params: TextParams

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
        """The text before ``<think>``; the chat template needs the model's tokenizer, the plain one does not."""
        if self.params.template == "plain":
            return f"{question}\n"
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ArtifactError("base.text.template is 'chat' but the tokenizer has no chat template")
        messages = [
            {"role": "system", "content": self.params.instruction},
            {"role": "user", "content": question},
        ]
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as error:  # e.g. a template without a system role raises from inside Jinja
            raise ArtifactError(f"{tokenizer.name_or_path}: its chat template cannot render the system instruction "
                                f"and the question (base.text.template 'chat'): {error}; use template 'plain' or "
                                "a model whose template has a system role") from None

    def answer(self, answer: str) -> str:
        return self.params.answer_template.replace("{answer}", answer)


def train_embedded_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    """Train the embedded default's byte-level BPE tokenizer (numbers split into runs of at most 3 digits)."""
    core = Tokenizer(models.BPE())
    # Pieces: up to 3 digits (with a leading space), a run of other non-space characters, or whitespace.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\d{1,3}| ?[^\s\d]+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    specials = [EMBEDDED_PAD, EMBEDDED_END, *METHOD_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=EMBEDDED_PAD,
        eos_token=EMBEDDED_END,
        additional_special_tokens=list(METHOD_TOKENS),
        model_max_length=1_000_000,
    )


def extend_model_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add the method tokens (and a pad token when missing) to a real model's tokenizer, in place."""
    missing = [token for token in METHOD_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        # A dedicated pad: masks come from roles, but pad == eos would still make ids ambiguous in outputs.
        tokenizer.add_special_tokens({"pad_token": EMBEDDED_PAD})
    if tokenizer.eos_token is None:
        raise ArtifactError("the model's tokenizer has no eos token to end answers with")
    return tokenizer


def pipeline_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the tokens ``extend_model_tokenizer`` adds to a real model's vocabulary (their embedding rows start
    untrained): the method tokens, and the pad where the model had none."""
    ids = special_ids(tokenizer)
    return [ids.think_open, ids.think_close, ids.latent, *([ids.pad] if tokenizer.pad_token == EMBEDDED_PAD else [])]


def load_model_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A real model's own tokenizer from a local folder (never from the network)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: cannot load a tokenizer ({error})") from None
    return extend_model_tokenizer(tokenizer)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved by the tokenizer stage; checks that the special tokens are single ids."""
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file():
        raise ArtifactError(f"{path}: no tokenizer here (missing tokenizer_config.json); run the tokenizer stage")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    special_ids(tokenizer)
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary and rules, recorded in artefacts to catch a mismatched tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def build_tokenizer(params: Params, raw_dir: Path, out_dir: Path,
                    pretrained_dir: Path = paths.PRETRAINED_DIR) -> PreTrainedTokenizerBase:
    """The tokenizer stage: train the embedded tokenizer on the train split, or extend a real model's own
    (from its checkpoint: ``base.model.path``, or the import_model stage's ``pretrained_dir``).

    The result is saved to ``out_dir`` atomically as a Hugging Face tokenizer.
    """
    if params.base.model.source != "tiny":
        folder = params.base.model.checkpoint_dir(pretrained_dir)
        tokenizer = load_model_tokenizer(folder, params.base.model.trust_remote_code)
        TextFormat(params.base.text).prompt("How many?", tokenizer)  # a template that cannot render fails here
    else:
        text_format = TextFormat(params.base.text)
        train = read_examples(Path(raw_dir) / "train.parquet")
        texts = (
            piece
            for example in train
            for piece in (text_format.prompt(example.question, None), example.cot, text_format.answer(example.answer))
        )
        tokenizer = train_embedded_tokenizer(texts, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    special_ids(tokenizer)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return tokenizer
