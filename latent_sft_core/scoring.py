"""Scoring answers with math-verify. Only the text after ``</think>`` is an answer; reasoning is never graded.

math-verify bounds its parsing and comparison with ``signal.alarm``, which works only in the main thread: stages
score in their own process's main thread; elsewhere (a worker thread) the time limits are switched off.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from math_verify import parse, verify
from transformers import PreTrainedTokenizerBase

from latent_sft_core.inference import Decoded

TIMEOUT_SECONDS = 5


def answer_text(decoded: Decoded, tokenizer: PreTrainedTokenizerBase) -> str:
    """The decoded answer; empty when the model never closed its reasoning."""
    return tokenizer.decode(decoded.answer_ids, skip_special_tokens=True).strip() if decoded.closed else ""


def is_correct(prediction: str, gold: str) -> bool:
    """Whether ``prediction`` states ``gold``: math-verify ``verify(parse(gold), parse(prediction))``.

    Equal values count whatever their form (``1,000`` and ``1000``, ``\\frac{1}{2}`` and ``0.5``, ``18`` and
    ``The answer is 18.``, ``\\boxed{18}``); an empty prediction or one with nothing to extract is wrong.
    """
    if not prediction.strip():
        return False
    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    target = parse(prediction, parsing_timeout=timeout)
    if not target:
        return False
    return bool(verify(parse(gold, parsing_timeout=timeout), target, timeout_seconds=timeout))


def pass_at_1(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of predictions that ``is_correct`` against their gold answer (one sample per question)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    if not golds:
        return 0.0
    return sum(is_correct(p, g) for p, g in zip(predictions, golds)) / len(golds)
