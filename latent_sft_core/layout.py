"""Training sequences built from chunked rows, each position tagged with a Role.

CoT-SFT (the explicit baseline and the base model of phase 1)::

    [prompt] <think> [t_1 .. t_L] </think> [answer] <end>
    PROMPT   PROMPT   CHUNK ...    ANSWER   ANSWER   ANSWER

Labels, attention masks and padding are derived from the roles (``labels_from_roles``), never by searching
token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from latent_sft_core.masks import Role
from latent_sft_core.text import SpecialIds

if TYPE_CHECKING:
    from latent_sft_core.chunking import ChunkedRow

IGNORE_INDEX = -100  # labels only (the loss's convention); never placed in input_ids
SUPERVISED_ROLES = (Role.CHUNK, Role.ANSWER)


@dataclass(frozen=True)
class TokenSequence:
    input_ids: list[int]
    roles: list[int]


def cot_sft_sequence(row: ChunkedRow, ids: SpecialIds) -> TokenSequence:
    """``[prompt] <think> chain </think> answer <end>`` with its roles."""
    prompt = [*row.prompt_ids, ids.think_open]
    answer = [ids.think_close, *row.answer_ids, ids.end]
    return TokenSequence(
        input_ids=prompt + row.cot_ids + answer,
        roles=[Role.PROMPT] * len(prompt) + [Role.CHUNK] * len(row.cot_ids) + [Role.ANSWER] * len(answer),
    )


def labels_from_roles(input_ids: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """Labels [B, T]: the input id where the role is supervised (chain and answer), IGNORE_INDEX elsewhere."""
    supervised = torch.zeros_like(roles, dtype=torch.bool)
    for role in SUPERVISED_ROLES:
        supervised |= roles == role
    return torch.where(supervised, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def pad_sequences(sequences: Sequence[TokenSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``roles`` (PAD on padding), ``attention_mask`` [B, T] long tensors."""
    length = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    roles = torch.full((len(sequences), length), int(Role.PAD), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence.input_ids)] = torch.tensor(sequence.input_ids, dtype=torch.long)
        roles[row, : len(sequence.roles)] = torch.tensor(sequence.roles, dtype=torch.long)
    return {"input_ids": input_ids, "roles": roles, "attention_mask": (roles != Role.PAD).long()}
