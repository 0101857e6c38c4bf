"""Scoring answers. Only the text after ``</think>`` is an answer; reasoning text is never graded."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from latent_sft_core.inference import Decoded


def answer_text(decoded: Decoded, tokenizer: PreTrainedTokenizerBase) -> str:
    """The decoded answer; empty when the model never closed its reasoning."""
    return tokenizer.decode(decoded.answer_ids, skip_special_tokens=True).strip() if decoded.closed else ""


def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)
