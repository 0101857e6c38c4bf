"""Per-position roles and the attention masks of Latent-SFT, computed from roles and steps alone.

Every training sequence carries two integer tracks next to its ids (see ``latent_sft_core.layout``):

* ``roles`` [B, T]: a :class:`Role` per position;
* ``steps`` [B, T]: for a LATENT its index i (1-based); for a CHUNK the index of the latent it belongs to
  (encoder: chunk S_i before L_i has step i; decoder: chunk S_{i+1} after Z_i has step i); 0 elsewhere.

Masks are boolean ``mask[b, q, k]`` [B, T, T], True where query position q may attend key position k. They
are built by broadcasting comparisons of these tracks to [B, T, T] (no per-sample loops, no token-id
searches), so a ``</think>`` inside a chain or a pad id equal to a real token cannot corrupt them. PAD rows
and PAD columns are always all False. :func:`attention_bias` turns a mask into the additive float bias a
Hugging Face model takes as a 4D ``attention_mask``.

Masks (paper names; "Role X" abbreviates "a key whose role is X"):

* encoder, ``"ltim"`` — Latent Token Induction Mask: causal, minus every LATENT key strictly before the query.
  A latent L_i sees the prompt, ``<think>``, S_1..S_i and itself (no earlier latent); text never sees a latent.
* encoder, ``"causal"`` — the "w/o LTIM" ablation: causal over non-pad positions.
* decoder, ``"ltsum"`` — Latent Token Supervision Mask as in the reference code (below, all rules also ANDed
  with causality k <= q):

  ==========================  ============================================================
  query row                   may attend keys
  ==========================  ============================================================
  PROMPT                      PROMPT
  LATENT Z_i (step i)         PROMPT; LATENT with step <= i (Z_1..Z_i)
  CHUNK, step i (S_{i+1})     LATENT with step i (Z_i); CHUNK with step i (its own chunk)
  ANSWER                      PROMPT; every LATENT; ANSWER
  ==========================  ============================================================

* decoder, ``"prefix"`` — the paper's Pi_i reading: as ``"ltsum"`` but CHUNK rows with step i also see PROMPT
  and every LATENT with step <= i, i.e. S_{i+1} is decoded from ``[prompt, <think>, Z_1..Z_i]``.
* decoder, ``"causal"`` — the "w/o LTSuM" ablation: causal over non-pad positions.

No rule lets a latent or the answer see a chunk token: the answer is produced from prompt + latents only,
exactly the context it has at inference.
"""

from __future__ import annotations

from enum import IntEnum

import torch

ENCODER_VARIANTS = ("ltim", "causal")
DECODER_VARIANTS = ("ltsum", "prefix", "causal")


class Role(IntEnum):
    """What a position of a sequence holds. Masks, labels and positions are computed from roles alone."""

    PAD = 0
    PROMPT = 1  # the prompt and the <think> that opens the reasoning
    CHUNK = 2  # explicit chain tokens
    LATENT = 3  # a latent slot (compress token in the encoder, Z in the decoder)
    ANSWER = 4  # </think>, the answer and the end token


def _check_variant(variant: str, allowed: tuple[str, ...], what: str) -> None:
    if variant not in allowed:
        raise ValueError(f"unknown {what} mask variant {variant!r}; allowed: {', '.join(allowed)}")


def _causal_valid(roles: torch.Tensor) -> torch.Tensor:
    """Bool [B, T, T]: k <= q and both q and k non-pad."""
    length = roles.shape[-1]
    positions = torch.arange(length, device=roles.device)
    causal = positions[None, :, None] >= positions[None, None, :]
    valid = roles != Role.PAD
    return causal & valid[:, :, None] & valid[:, None, :]


def encoder_mask(roles: torch.Tensor, variant: str = "ltim") -> torch.Tensor:
    """Attention mask of the encoder sequence ``[prompt, <think>, S_1, L_1, ..., S_N, L_N, </think>]``.

    Args:
        roles: LongTensor [B, T] of :class:`Role` values (padding anywhere is allowed, PAD positions are cut).
        variant: ``"ltim"`` (Latent Token Induction Mask: causal minus every LATENT key strictly before the
            query; a latent still sees itself) or ``"causal"`` (the "w/o LTIM" ablation).

    Returns:
        BoolTensor [B, T, T], ``mask[b, q, k]`` True where query q may attend key k; PAD rows/columns False.

    Raises:
        ValueError: unknown ``variant``.
    """
    _check_variant(variant, ENCODER_VARIANTS, "encoder")
    mask = _causal_valid(roles)
    if variant == "causal":
        return mask
    length = roles.shape[-1]
    positions = torch.arange(length, device=roles.device)
    earlier = positions[None, None, :] < positions[None, :, None]  # k < q
    earlier_latent_key = (roles == Role.LATENT)[:, None, :] & earlier
    return mask & ~earlier_latent_key


def decoder_mask(roles: torch.Tensor, steps: torch.Tensor, variant: str = "ltsum") -> torch.Tensor:
    """Attention mask of the stage-1 decoder sequence ``[prompt, <think>, Z_1, S_2, ..., Z_N, </think>, answer, end]``.

    Rules per query row (module docstring has the table); every variant is additionally causal (k <= q) and
    cuts PAD rows and columns.

    Args:
        roles: LongTensor [B, T] of :class:`Role` values.
        steps: LongTensor [B, T]; LATENT Z_i has step i, the CHUNK S_{i+1} that follows Z_i has step i.
        variant: ``"ltsum"`` (reference LTSuM: a chunk sees only its own latent and itself), ``"prefix"``
            (a chunk after Z_i also sees the prompt and Z_1..Z_i) or ``"causal"`` ("w/o LTSuM" ablation).

    Returns:
        BoolTensor [B, T, T], ``mask[b, q, k]`` True where query q may attend key k.

    Raises:
        ValueError: unknown ``variant``.
    """
    _check_variant(variant, DECODER_VARIANTS, "decoder")
    base = _causal_valid(roles)
    if variant == "causal":
        return base
    role_q, role_k = roles[:, :, None], roles[:, None, :]
    step_q, step_k = steps[:, :, None], steps[:, None, :]
    key_prompt = role_k == Role.PROMPT
    key_latent = role_k == Role.LATENT
    # Z_1..Z_i for a query of step i (the latent prefix a latent, or a "prefix" chunk, is built on).
    key_latent_upto = key_latent & (step_k <= step_q)
    same_step = step_k == step_q
    chunk_sees = (key_latent | (role_k == Role.CHUNK)) & same_step
    if variant == "prefix":
        chunk_sees = chunk_sees | key_prompt | key_latent_upto
    allowed = (
        ((role_q == Role.PROMPT) & key_prompt)
        | ((role_q == Role.LATENT) & (key_prompt | key_latent_upto))
        | ((role_q == Role.CHUNK) & chunk_sees)
        | ((role_q == Role.ANSWER) & (key_prompt | key_latent | (role_k == Role.ANSWER)))
    )
    return base & allowed


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, T, T] for a Hugging Face model's 4D ``attention_mask``.

    0 where ``mask`` allows, ``torch.finfo(dtype).min`` elsewhere. The bias must already contain the causal
    part (transformers uses a 4D float mask as given with sdpa/eager; a 4D *bool* mask is mishandled by eager,
    so always pass this float bias). A row with no allowed key (a PAD query) would add finfo.min to every
    score, which can overflow to -inf and give NaN after softmax; such rows attend to themselves in the bias
    only (their outputs are never used: PAD positions carry no label), while ``mask`` itself stays all False.

    Args:
        mask: BoolTensor [B, T, T] from :func:`encoder_mask` / :func:`decoder_mask`.
        dtype: the model's compute dtype (float32, bfloat16, float16).

    Returns:
        FloatTensor [B, 1, T, T] of ``dtype``.
    """
    length = mask.shape[-1]
    empty_row = ~mask.any(dim=-1)  # [B, T]
    diagonal = torch.eye(length, dtype=torch.bool, device=mask.device)
    allowed = mask | (empty_row[:, :, None] & diagonal)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]
