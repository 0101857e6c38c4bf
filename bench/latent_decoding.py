"""Latent decoding throughput: our batched decoder on one KV cache vs the reference code's design.

The reference (``one_example_generate_hf``) decodes one question at a time: latent steps on a KV cache, then it
throws the cache away, rebuilds ``[prompt, <think>, Z_1..Z_T, </think>]`` as embeddings and calls ``generate``
from scratch for the answer. Both run greedily on the same model and questions with the same caps; the answers
must agree (checked), only the time differs. Also times explicit CoT decoding of the CoT-SFT model on the same
questions, for the answer latency of the latent model against its #L ratio.

    python -m bench.latent_decoding [--latent models/latent] [--cot models/base] [--chunked data/chunked]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.report import machine_line, update_section
from latent_sft_core import paths
from latent_sft_core.chunking import read_chunked
from latent_sft_core.config import load_params
from latent_sft_core.inference import Decoded, LatentMode, decode, split_generation
from latent_sft_core.modeling import load_model
from latent_sft_core.soft_embedding import alpha_from_logits, mix_embeddings
from latent_sft_core.text import SpecialIds, special_ids


@torch.no_grad()
def reference_decode(model, prompt: list[int], ids: SpecialIds, latent: LatentMode, max_latent_steps: int,
                     max_new_tokens: int) -> Decoded:
    """One question the reference way: latents on a cache, then a fresh ``generate`` over everything."""
    embedding = model.get_input_embeddings()
    prefix = embedding(torch.tensor([[*prompt, ids.think_open]]))
    step_input, cache, latents, greedy_ids = prefix, None, [], []
    for _ in range(max_latent_steps):
        output = model(inputs_embeds=step_input, past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        logits = output.logits[:, -1].float()
        if int(logits.argmax()) == ids.think_close:
            break
        greedy_ids.append(int(logits.argmax()))
        step_input = mix_embeddings(alpha_from_logits(logits, latent.top_k, latent.temperature), embedding)[:, None]
        latents.append(step_input.to(prefix.dtype))
    close = embedding(torch.tensor([[ids.think_close]]))
    full = torch.cat([prefix, *latents, close], dim=1)
    generated = model.generate(inputs_embeds=full, attention_mask=torch.ones(full.shape[:2], dtype=torch.long),
                               max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ids.end,
                               pad_token_id=ids.pad)
    answer = split_generation([ids.think_close, *generated[0].tolist()], ids)
    return Decoded(reasoning_ids=greedy_ids, answer_ids=answer.answer_ids, closed=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--latent", type=Path, default=paths.LATENT_MODEL_DIR)
    parser.add_argument("--cot", type=Path, default=paths.BASE_MODEL_DIR)
    parser.add_argument("--chunked", type=Path, default=paths.CHUNKED_DIR)
    parser.add_argument("--split", default="test")
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    params = load_params(args.params)
    decoding = params.evaluate.decoding
    latent = LatentMode.from_params(params)
    model, tokenizer = load_model(args.latent)
    cot_model, _ = load_model(args.cot)
    ids = special_ids(tokenizer)
    rows = read_chunked(args.chunked / f"{args.split}.parquet", params.base.compression_rate)[: args.rows]
    prompts = [row.prompt_ids for row in rows]

    for warm_model, warm_latent in ((model, latent), (cot_model, None)):  # first calls pay one-time set-up
        decode(warm_model, prompts[:2], ids, decoding, warm_latent, progress=False)
    reference_decode(model, prompts[0], ids, latent, decoding.max_latent_steps, decoding.max_new_tokens)
    timings = {}
    began = time.perf_counter()
    ours = decode(model, prompts, ids, decoding, latent, progress=False)
    timings["batched"] = time.perf_counter() - began
    began = time.perf_counter()
    reference = [reference_decode(model, p, ids, latent, decoding.max_latent_steps, decoding.max_new_tokens)
                 for p in prompts]
    timings["reference"] = time.perf_counter() - began
    began = time.perf_counter()
    cot = decode(cot_model, prompts, ids, decoding, None, progress=False)
    timings["cot_sft"] = time.perf_counter() - began
    agree = sum(a.answer_ids == b.answer_ids and a.reasoning_ids == b.reasoning_ids for a, b in zip(ours, reference))

    latent_steps = sum(d.num_reasoning_tokens for d in ours) / len(ours)
    chain = sum(d.num_reasoning_tokens for d in cot) / len(cot)
    speedup = timings["reference"] / timings["batched"]
    per_question = {name: 1000 * seconds / len(rows) for name, seconds in timings.items()}
    update_section("latent_decoding", f"""## Latent decoding throughput and answer latency

`python -m bench.latent_decoding --rows {len(rows)}` ({machine_line()}). {len(rows)} `{args.split}` questions,
greedy, batch {decoding.batch_size}, caps {decoding.max_latent_steps} latents / {decoding.max_new_tokens}
answer tokens. Models: `{args.latent}` (latent) and `{args.cot}` (CoT-SFT).

| decoder | ms per question | vs batched latent |
|---|---|---|
| latent, batched on one KV cache (ours) | {per_question['batched']:.2f} | 1.00x |
| latent, reference design (one at a time, re-prefill before the answer) | {per_question['reference']:.2f} | {speedup:.1f}x slower |
| explicit CoT-SFT, batched on one KV cache | {per_question['cot_sft']:.2f} | {timings['cot_sft'] / timings['batched']:.2f}x |

Same outputs from both latent decoders on {agree} of {len(rows)} questions (target: all; float noise aside).
Mean #L: {latent_steps:.2f} latent steps vs {chain:.2f} CoT tokens (ratio {latent_steps / chain if chain else 0:.2f});
answer latency latent / CoT-SFT: {timings['batched'] / timings['cot_sft']:.2f}.
""")
    print(json.dumps({"timings": timings, "speedup": speedup, "agree": agree, "rows": len(rows),
                      "mean_latent_steps": latent_steps, "mean_chain_tokens": chain}, indent=2))


if __name__ == "__main__":
    main()
