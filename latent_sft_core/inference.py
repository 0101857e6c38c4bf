"""Decoding: one batched loop on one KV cache, for the latent model and for the explicit CoT-SFT baseline.

Every sequence starts from ``[prompt] <think>`` (left-padded into a batch). At each step the model gives the
next-token logits of every row, and each row is in one of three states:

* **latent** (latent model only): when its greedy token is ``</think>``, or it already took ``max_latent_steps``
  latents, the row feeds ``</think>`` and turns explicit; otherwise it feeds ``Z = alpha @ E`` with alpha made
  from its own logits exactly as in training (``soft_embedding.alpha_from_logits``: top-k or full vocabulary,
  temperature), optionally perturbed by ``soft_embedding.gumbel_perturb`` (for the hidden-state ablation it
  feeds its own final hidden state instead);
* **explicit**: feeds the chosen token (greedy, or temperature / top-p sampling) and finishes on ``<end>`` or
  after ``max_new_tokens`` explicit tokens;
* **finished**: feeds pad until the whole batch is done (its outputs are ignored).

With a **teacher** (per question, the encoder's alpha of its gold chain: ``[N, k]``), every latent step is
compared with the teacher's latent of the same index: ``LatentStep.teacher_kl`` = KL(teacher || the step's
distribution at alpha's temperature, as stage 2 trains it) and ``teacher_agrees`` (same most probable token).
``follow_teacher`` feeds the teacher's latents instead of the model's own (``Z_j = alpha_j @ E`` with the model's own E; the hidden states
themselves for the hidden-state ablation), exactly N of them, then ``</think>``: the model answers from the
teacher's latents (the phase-1 ceiling with the phase-1 decoder, "teacher-forced" with the stage-2 model).

The answer follows the latents on the same KV cache: nothing is re-prefilled. ``use_cache=False`` recomputes
the whole sequence at every step instead (a check of the cached path, and the benchmark's slow reference).
Prompts are batched in order of length (less left padding to prefill; results come back in the caller's
order), and the LM head runs on the last position only when the model supports ``logits_to_keep``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from latent_sft_core.config import DecodingParams, Params, SamplingParams
from latent_sft_core.distributed import gathered_in_order
from latent_sft_core.soft_embedding import SparseAlpha, alpha_from_logits, gumbel_perturb, mix_embeddings
from latent_sft_core.text import SpecialIds


@dataclass(frozen=True)
class LatentMode:
    """How a latent step turns the model's logits into its next input: the training definition of alpha."""

    top_k: int | None  # None: the full vocabulary
    temperature: float = 1.0
    hidden_state: bool = False  # the ablation: feed the final hidden state instead of alpha @ E

    @classmethod
    def from_params(cls, params: Params) -> LatentMode:
        return cls(None if params.latent.full_vocab else params.base.top_k, params.latent.temperature,
                   params.latent.kind == "hidden_state")


@dataclass(frozen=True)
class LatentStep:
    """One latent step's next-token distribution (softmax of the logits), most probable tokens first; with a
    teacher latent at this step, KL(teacher || this distribution) and whether their top-1 tokens agree."""

    ids: tuple[int, ...]
    probs: tuple[float, ...]
    teacher_kl: float | None = None
    teacher_agrees: bool | None = None


@dataclass(frozen=True)
class Decoded:
    """One generated continuation after ``<think>``."""

    reasoning_ids: list[int]  # explicit chain tokens; for the latent model, the greedy token of each latent step
    answer_ids: list[int]  # tokens after </think>, up to (not including) <end>
    closed: bool  # the reasoning was closed (by the model, or by the latent-step cap)
    latent_steps: tuple[LatentStep, ...] = ()
    capped: bool = False  # the latent-step cap forced </think>
    seconds: float = 0.0  # wall time of the batch divided by its rows

    @property
    def num_reasoning_tokens(self) -> int:
        """#L: latent steps for the latent model, chain tokens for explicit CoT (the answer excluded)."""
        return len(self.reasoning_ids)


def split_generation(generated: Sequence[int], ids: SpecialIds) -> Decoded:
    """Cut explicit tokens into reasoning and answer; only the text after ``</think>`` is ever scored."""
    tokens = list(generated)
    if ids.end in tokens:
        tokens = tokens[: tokens.index(ids.end)]
    if ids.think_close not in tokens:
        return Decoded(reasoning_ids=tokens, answer_ids=[], closed=False)
    cut = tokens.index(ids.think_close)
    return Decoded(reasoning_ids=tokens[:cut], answer_ids=tokens[cut + 1 :], closed=True)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] and attention mask [B, T] of ``prompts`` padded on the left to the longest one."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[row, length - len(prompt) :] = 1
    return input_ids, attention


def choose_tokens(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Explicit token choice, logits [B, V] -> ids [B]: greedy at temperature 0, else temperature + top-p."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p  # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _BatchState:
    """Per-row bookkeeping of one decoding batch (Python lists: a handful of rows, a few dozen steps)."""

    def __init__(self, rows: int, latent: bool):
        self.in_latent = [latent] * rows
        self.finished = [False] * rows
        self.explicit: list[list[int]] = [[] for _ in range(rows)]
        self.latent_greedy: list[list[int]] = [[] for _ in range(rows)]
        self.latent_steps: list[list[LatentStep]] = [[] for _ in range(rows)]
        self.capped = [False] * rows

    def results(self, ids: SpecialIds) -> list[Decoded]:
        out = []
        for row, tokens in enumerate(self.explicit):
            decoded = split_generation(tokens, ids)
            out.append(replace(decoded, reasoning_ids=self.latent_greedy[row] + decoded.reasoning_ids,
                               latent_steps=tuple(self.latent_steps[row]), capped=self.capped[row]))
        return out


@torch.no_grad()
def _decode_batch(
    model: nn.Module, prompts: Sequence[Sequence[int]], ids: SpecialIds, decoding: DecodingParams,
    latent: LatentMode | None, keep_top: int, use_cache: bool, generator: torch.Generator,
    teacher: Sequence[SparseAlpha] | None = None, follow_teacher: bool = False,
) -> list[Decoded]:
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    input_ids, attention = (t.to(device) for t in left_pad([[*p, ids.think_open] for p in prompts], ids.pad))
    step_inputs = embedding(input_ids)  # [B, T, d]: the prompt first, then one position per step
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    all_inputs, all_positions = step_inputs, positions
    rows = len(prompts)
    state = _BatchState(rows, latent is not None)
    cache = None
    hidden_state = latent is not None and latent.hidden_state
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    while True:
        if use_cache:
            output = model(inputs_embeds=step_inputs, attention_mask=attention, position_ids=positions,
                           past_key_values=cache, use_cache=True, output_hidden_states=hidden_state, **last_only)
            cache = output.past_key_values
        else:
            output = model(inputs_embeds=all_inputs, attention_mask=attention, position_ids=all_positions,
                           use_cache=False, output_hidden_states=hidden_state, **last_only)
        logits = output.logits[:, -1].float()  # [B, V]
        greedy = logits.argmax(dim=-1).tolist()
        chosen = choose_tokens(logits, decoding.sampling, generator).tolist()
        next_tokens = [ids.pad] * rows
        thinking: list[int] = []
        for row in range(rows):
            if state.finished[row]:
                continue
            if state.in_latent[row]:
                taken = len(state.latent_steps[row])
                if follow_teacher:
                    stop, capped = taken >= teacher[row].probs.shape[0], False
                else:
                    stop = greedy[row] == ids.think_close or taken >= decoding.max_latent_steps
                    capped = greedy[row] != ids.think_close
                if stop:
                    state.in_latent[row] = False
                    state.capped[row] = capped
                    state.explicit[row].append(ids.think_close)
                    next_tokens[row] = ids.think_close
                else:
                    thinking.append(row)
                    state.latent_greedy[row].append(greedy[row])
                continue
            state.explicit[row].append(chosen[row])
            next_tokens[row] = chosen[row]
            answer_tokens = len(state.explicit[row]) - (latent is not None)  # </think> of a latent row excluded
            state.finished[row] = chosen[row] == ids.end or answer_tokens >= decoding.max_new_tokens
        if all(state.finished):
            break
        next_inputs = embedding(torch.tensor(next_tokens, device=device))  # [B, d]
        if thinking:
            selected = torch.tensor(thinking, device=device)
            steps = [len(state.latent_steps[row]) for row in thinking]
            if follow_teacher:
                latents = _teacher_inputs([teacher[row] for row in thinking], steps, embedding, hidden_state)
            elif hidden_state:
                latents = output.hidden_states[-1][selected, -1]
            else:
                latents = _latent_inputs(logits[selected], latent, decoding, embedding, generator)
            next_inputs[selected] = latents.to(next_inputs.dtype)
            probs, top_ids = torch.softmax(logits[selected], dim=-1).topk(min(keep_top, logits.shape[-1]), dim=-1)
            for index, (row, row_ids, row_probs) in enumerate(zip(thinking, top_ids.tolist(), probs.tolist())):
                compared = {}
                if teacher is not None and not hidden_state and steps[index] < teacher[row].probs.shape[0]:
                    compared = _compare_with_teacher(logits[row], latent.temperature, teacher[row], steps[index])
                state.latent_steps[row].append(LatentStep(tuple(row_ids), tuple(row_probs), **compared))
        step_inputs = next_inputs[:, None]
        positions = positions[:, -1:] + 1
        attention = torch.cat([attention, attention.new_ones((rows, 1))], dim=1)
        if not use_cache:
            all_inputs = torch.cat([all_inputs, step_inputs], dim=1)
            all_positions = torch.cat([all_positions, positions], dim=1)
    return state.results(ids)


def _latent_inputs(
    logits: torch.Tensor, latent: LatentMode, decoding: DecodingParams, embedding: nn.Module,
    generator: torch.Generator,
) -> torch.Tensor:
    """Z [R, d] for the rows still thinking, from their logits [R, V]."""
    alpha = alpha_from_logits(logits, latent.top_k, latent.temperature)
    gumbel = decoding.gumbel
    if gumbel.enabled:
        noisy = gumbel_perturb(alpha.probs, gumbel.scale, gumbel.tau, (gumbel.clamp_min, gumbel.clamp_max), generator)
        alpha = SparseAlpha(ids=alpha.ids, probs=noisy)
    return mix_embeddings(alpha, embedding)


def _teacher_inputs(alphas: Sequence[SparseAlpha], steps: Sequence[int], embedding: nn.Module,
                    hidden_state: bool) -> torch.Tensor:
    """The teacher's latent ``steps[r]`` of each row r as a model input [R, d]: ``alpha @ E``, or the hidden state."""
    probs = torch.stack([alpha.probs[step] for alpha, step in zip(alphas, steps)])
    if hidden_state:
        return probs
    ids = None if alphas[0].ids is None else torch.stack([alpha.ids[step] for alpha, step in zip(alphas, steps)])
    return mix_embeddings(SparseAlpha(ids=ids, probs=probs), embedding)


def _compare_with_teacher(logits: torch.Tensor, temperature: float, alpha: SparseAlpha, step: int) -> dict:
    """KL(teacher_step || softmax(logits / temperature)), as stage 2 trains it, and top-1 agreement; logits [V],
    teacher alpha [N, k] (or dense)."""
    student = torch.log_softmax(logits.float() / temperature, dim=-1)
    q = alpha.probs[step].float()
    ids = torch.arange(q.shape[0], device=q.device) if alpha.ids is None else alpha.ids[step]
    kl = float((torch.xlogy(q, q) - q * student[ids]).sum())
    return {"teacher_kl": kl, "teacher_agrees": int(ids[q.argmax()]) == int(logits.argmax())}


def decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    ids: SpecialIds,
    decoding: DecodingParams,
    latent: LatentMode | None,
    keep_top: int = 10,
    use_cache: bool = True,
    progress: bool = True,
    teacher: Sequence[SparseAlpha] | None = None,
    follow_teacher: bool = False,
) -> list[Decoded]:
    """Decode ``[prompt] <think>`` for every prompt, ``decoding.batch_size`` prompts at a time.

    ``latent=None`` decodes explicit CoT; otherwise every row thinks in latents first (module docstring).
    ``keep_top`` tokens of each latent step's distribution are kept in ``Decoded.latent_steps``. Sampling and
    Gumbel noise of the i-th batch (prompts in length order) draw from a generator seeded with
    ``decoding.sampling.seed + i``; under several processes the batches are shared out
    (``distributed.gathered_in_order``). ``teacher`` (one alpha [N, k] per prompt) and ``follow_teacher``: see the
    module docstring.
    """
    if teacher is not None and len(teacher) != len(prompts):
        raise ValueError(f"{len(teacher)} teacher alphas for {len(prompts)} prompts")
    if follow_teacher and (teacher is None or latent is None):
        raise ValueError("follow_teacher needs a teacher and latent mode")
    model.eval()
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    batches = [order[start : start + decoding.batch_size] for start in range(0, len(prompts), decoding.batch_size)]

    def decode_batch(numbered: tuple[int, list[int]]) -> list[Decoded]:
        # a generator per batch: the draws do not depend on which process decodes which batches
        number, batch = numbered
        generator = torch.Generator(device=device).manual_seed(decoding.sampling.seed + number)
        began = time.perf_counter()
        decoded = _decode_batch(model, [prompts[i] for i in batch], ids, decoding, latent, keep_top, use_cache,
                                generator, None if teacher is None else [teacher[i] for i in batch], follow_teacher)
        seconds = (time.perf_counter() - began) / len(batch)
        return [replace(result, seconds=seconds) for result in decoded]

    results: list[Decoded | None] = [None] * len(prompts)
    finished = gathered_in_order(list(enumerate(batches)), decode_batch)
    for (_, batch), decoded in tqdm(finished, total=len(batches), desc="decoding", unit="batch", disable=not progress):
        for index, result in zip(batch, decoded):
            results[index] = result
    return results
