"""Training sequences built from chunked rows, each position tagged with a Role, a step and a position id.

``P`` = PROMPT, ``C`` = CHUNK, ``L`` = LATENT, ``A`` = ANSWER; steps in brackets (0 where not shown).

CoT-SFT (the explicit baseline and the base model of phase 1), plain positions 0..T-1::

    [prompt] <think> [t_1 .. t_L] </think> [answer] <end>
     P        P       C ...        A        A        A

Stage-1 encoder (``encoder_sequence``), plain positions 0..T-1; ``L_i`` is the latent (compress) token id::

    [prompt] <think> S_1    L_1    S_2    L_2   ...  S_N    L_N    </think>
     P        P      C[1]   L[1]   C[2]   L[2]       C[N]   L[N]   A

Stage-1 decoder (``decoder_sequence``); S_1 is never reconstructed, Z_i is followed by S_{i+1}::

    [prompt] <think> Z_1    S_2    Z_2    S_3   ...  Z_{N-1} S_N      Z_N    </think> [answer] <end>
     P        P      L[1]   C[1]   L[2]   C[2]       L[N-1]  C[N-1]   L[N]   A         A        A

Stage 2 (``stage2_sequence``), plain positions 0..T-1, no chunk tokens::

    [prompt] <think> Z_1 ... Z_N </think> [answer] <end>
     P        P      L[1]    L[N] A        A        A

Z slots hold no real token: their input id is the pad id (a valid embedding row, never a placeholder such as
-100) and the model overwrites their embeddings with soft inputs at ``roles == Role.LATENT``. With N = 0 the
encoder is ``[prompt, <think>, </think>]`` and the decoder ``[prompt, <think>, </think>, answer, end]``.

Decoder positions are *dual track* (``dual_track_position_ids``): every non-chunk position gets the position it
has in the stage-2 / inference layout, and the chunk after Z_i continues ``pos(Z_i)+1, +2, ...``.

Labels (``labels_from_roles``): CHUNK and ANSWER positions carry their id, all others IGNORE_INDEX. Under the
standard causal shift (the logits at position p are scored against the label at p+1), in the decoder:
Z_i's position predicts the first token of S_{i+1}; Z_N's position predicts ``</think>``; the last token of a
chunk (followed by a latent) and ``<think>`` (followed by Z_1) have no target, because Z slots are unlabelled.

Masks, labels, positions and latent slots are derived from roles and steps, never by searching token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

from latent_sft_core.masks import Role
from latent_sft_core.text import SpecialIds

if TYPE_CHECKING:
    from latent_sft_core.chunking import ChunkedRow

IGNORE_INDEX = -100  # labels only (the loss's convention); never placed in input_ids
SUPERVISED_ROLES = (Role.CHUNK, Role.ANSWER)


@dataclass(frozen=True)
class TokenSequence:
    """One unpadded sequence: ids and, per position, its role, step and position id (all of length T).

    ``steps`` and ``position_ids`` may be omitted for sequences without latents and with plain positions
    (CoT-SFT): they then default to all 0 and to 0..T-1.
    """

    input_ids: list[int]
    roles: list[int]
    steps: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        length = len(self.input_ids)
        if not self.steps:
            object.__setattr__(self, "steps", [0] * length)
        if not self.position_ids:
            object.__setattr__(self, "position_ids", list(range(length)))
        if not len(self.roles) == len(self.steps) == len(self.position_ids) == length:
            raise ValueError(
                f"TokenSequence tracks differ in length: ids {length}, roles {len(self.roles)}, "
                f"steps {len(self.steps)}, position_ids {len(self.position_ids)}"
            )


def cot_sft_sequence(row: ChunkedRow, ids: SpecialIds, with_chain: bool = True) -> TokenSequence:
    """``[prompt] <think> chain </think> answer <end>`` with its roles; ``with_chain=False`` leaves the chain
    out (``[prompt] <think> </think> answer <end>``: the no-CoT baseline answers at once)."""
    prompt = [*row.prompt_ids, ids.think_open]
    chain = row.cot_ids if with_chain else []
    answer = [ids.think_close, *row.answer_ids, ids.end]
    return TokenSequence(
        input_ids=prompt + chain + answer,
        roles=[Role.PROMPT] * len(prompt) + [Role.CHUNK] * len(chain) + [Role.ANSWER] * len(answer),
    )


def encoder_sequence(row: ChunkedRow, ids: SpecialIds) -> TokenSequence:
    """``[prompt, <think>, S_1, L_1, ..., S_N, L_N, </think>]``; S_i and L_i have step i; plain positions."""
    input_ids = [*row.prompt_ids, ids.think_open]
    roles = [int(Role.PROMPT)] * len(input_ids)
    steps = [0] * len(input_ids)
    for step, chunk in enumerate(row.chunks(), start=1):
        input_ids += [*chunk, ids.latent]
        roles += [int(Role.CHUNK)] * len(chunk) + [int(Role.LATENT)]
        steps += [step] * (len(chunk) + 1)
    input_ids.append(ids.think_close)
    roles.append(int(Role.ANSWER))
    steps.append(0)
    return TokenSequence(input_ids, roles, steps, list(range(len(input_ids))))


def decoder_sequence(row: ChunkedRow, ids: SpecialIds) -> TokenSequence:
    """``[prompt, <think>, Z_1, S_2, Z_2, ..., S_N, Z_N, </think>, answer, end]`` with dual-track positions.

    Z_i (pad id, LATENT, step i) is followed by S_{i+1} (CHUNK, step i); S_1 is dropped.
    """
    chunks = row.chunks()
    input_ids = [*row.prompt_ids, ids.think_open]
    roles = [int(Role.PROMPT)] * len(input_ids)
    steps = [0] * len(input_ids)
    for step in range(1, len(chunks) + 1):
        following = chunks[step] if step < len(chunks) else []  # S_{i+1}; nothing after Z_N
        input_ids += [ids.pad, *following]
        roles += [int(Role.LATENT)] + [int(Role.CHUNK)] * len(following)
        steps += [step] * (len(following) + 1)
    answer = [ids.think_close, *row.answer_ids, ids.end]
    input_ids += answer
    roles += [int(Role.ANSWER)] * len(answer)
    steps += [0] * len(answer)
    position_ids = dual_track_position_ids(torch.tensor([roles]))[0].tolist()
    return TokenSequence(input_ids, roles, steps, position_ids)


def stage2_sequence(row: ChunkedRow, ids: SpecialIds) -> TokenSequence:
    """``[prompt, <think>, Z_1, ..., Z_N, </think>, answer, end]`` (the inference layout); plain positions.

    Z_i (pad id, LATENT, step i) are the slots of the soft inputs built from the cached latent labels.
    """
    prompt = [*row.prompt_ids, ids.think_open]
    answer = [ids.think_close, *row.answer_ids, ids.end]
    count = row.num_chunks
    input_ids = prompt + [ids.pad] * count + answer
    return TokenSequence(
        input_ids=input_ids,
        roles=[int(Role.PROMPT)] * len(prompt) + [int(Role.LATENT)] * count + [int(Role.ANSWER)] * len(answer),
        steps=[0] * len(prompt) + list(range(1, count + 1)) + [0] * len(answer),
        position_ids=list(range(len(input_ids))),
    )


def dual_track_position_ids(roles: torch.Tensor) -> torch.Tensor:
    """Dual-track position ids [B, T] of decoder sequences, from roles alone.

    Rule: a non-chunk, non-pad position gets the number of non-chunk, non-pad positions before it (its
    position in the stage-2 / inference layout: prompt 0.., Z_i = pos(<think>) + i, ``</think>`` =
    pos(Z_N) + 1, the answer after it). A CHUNK token gets pos(last non-chunk position before it) + its
    1-based offset in its run of chunk tokens: the chunk S_{i+1} after Z_i runs pos(Z_i)+1, pos(Z_i)+2, ...
    PAD positions get 0. With no chunk tokens (stage 2) this is plain 0..T-1.

    Args:
        roles: LongTensor [B, T] of :class:`Role` values.

    Returns:
        LongTensor [B, T].
    """
    is_chunk = (roles == Role.CHUNK).long()
    is_main = ((roles != Role.CHUNK) & (roles != Role.PAD)).long()
    main_position = is_main.cumsum(dim=-1) - 1
    chunks_so_far = is_chunk.cumsum(dim=-1)
    # chunk tokens counted up to the latest main position (non-decreasing, so a running max carries it forward)
    chunks_at_last_main = (chunks_so_far * is_main).cummax(dim=-1).values
    offset = chunks_so_far - chunks_at_last_main  # 1, 2, ... inside a chunk run; 0 on main positions
    positions = main_position + offset
    return torch.where(roles == Role.PAD, torch.zeros_like(positions), positions)


def labels_from_roles(input_ids: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """Labels [B, T]: the input id where the role is supervised (chain and answer), IGNORE_INDEX elsewhere."""
    supervised = torch.zeros_like(roles, dtype=torch.bool)
    for role in SUPERVISED_ROLES:
        supervised |= roles == role
    return torch.where(supervised, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def pad_sequences(sequences: Sequence[TokenSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into [B, T] long tensors.

    Keys: ``input_ids`` (pad id on padding), ``roles`` (PAD), ``steps`` (0), ``position_ids`` (0) and
    ``attention_mask`` (1 on real positions, 0 on padding).
    """

    def track(name: str, fill: int) -> torch.Tensor:
        rows = [torch.tensor(getattr(s, name), dtype=torch.long) for s in sequences]
        return pad_sequence(rows, batch_first=True, padding_value=fill)

    roles = track("roles", int(Role.PAD))
    return {
        "input_ids": track("input_ids", pad_id),
        "roles": roles,
        "steps": track("steps", 0),
        "position_ids": track("position_ids", 0),
        "attention_mask": (roles != Role.PAD).long(),
    }
