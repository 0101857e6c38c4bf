"""Per-position roles of training sequences (masks built from them arrive with phase 1)."""

from __future__ import annotations

from enum import IntEnum


class Role(IntEnum):
    """What a position of a sequence holds. Masks, labels and positions are computed from roles alone."""

    PAD = 0
    PROMPT = 1  # the prompt and the <think> that opens the reasoning
    CHUNK = 2  # explicit chain tokens
    LATENT = 3  # a latent slot (compress token in the encoder, Z in the decoder)
    ANSWER = 4  # </think>, the answer and the end token
