"""Decoding. Explicit CoT decoding (the CoT-SFT model): prompt + ``<think>``, then greedy tokens to ``<end>``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from latent_sft_core.text import SpecialIds


@dataclass(frozen=True)
class Decoded:
    """One generated continuation after ``<think>``, split at the first ``</think>``."""

    reasoning_ids: list[int]  # chain tokens before </think> (all of them if it never came)
    answer_ids: list[int]  # tokens after </think>, up to (not including) <end>
    closed: bool  # whether </think> was generated


def split_generation(generated: Sequence[int], ids: SpecialIds) -> Decoded:
    """Cut a continuation into reasoning and answer; only the text after ``</think>`` is ever scored."""
    tokens = list(generated)
    if ids.end in tokens:
        tokens = tokens[: tokens.index(ids.end)]
    if ids.think_close not in tokens:
        return Decoded(reasoning_ids=tokens, answer_ids=[], closed=False)
    cut = tokens.index(ids.think_close)
    return Decoded(reasoning_ids=tokens[:cut], answer_ids=tokens[cut + 1 :], closed=True)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[row, length - len(prompt) :] = 1
    return input_ids, attention


@torch.no_grad()
def generate_cot(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    ids: SpecialIds,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
) -> list[Decoded]:
    """Greedy explicit decoding of ``[prompt] <think>`` for every prompt, in batches."""
    model.eval()
    results: list[Decoded] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="decoding", unit="batch", disable=not progress):
        batch = [[*prompt, ids.think_open] for prompt in prompts[start : start + batch_size]]
        input_ids, attention = left_pad(batch, ids.pad)
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=ids.end,
            pad_token_id=ids.pad,
        )
        results.extend(split_generation(row.tolist(), ids) for row in output[:, input_ids.shape[1] :])
    return results
