"""Training-step cost of each phase relative to a CoT-SFT step on the same batch.

Builds the default tiny model (random weights: step time does not depend on them) and one batch of synthetic
rows, then times, interleaved round by round so machine noise hits all alike:

* CoT-SFT: one forward/backward/optimizer step on ``[prompt] <think> chain </think> answer <end>``;
* stage-1 joint: the encoder pass (induction mask) + the decoder pass (supervision mask), both with LoRA;
* stage 2: one pass with the latents mixed from (random) top-k soft labels, KL + CE.

Every kind trains LoRA adapters of the same rank on the same targets with torch AdamW, without DeepSpeed (its
overhead on CPU is a separate, launcher-level cost). Reports the median step time of each and the ratios.

    python -m bench.step_cost [--params params.yaml] [--rounds 20] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.report import machine_line, update_section
from latent_sft_core.chunking import ChunkedRow, chunk_examples
from latent_sft_core.config import Params, load_params
from latent_sft_core.data.synthetic import generate_synthetic
from latent_sft_core.layout import cot_sft_sequence, stage2_sequence
from latent_sft_core.modeling import build_tiny_model, with_lora
from latent_sft_core.phase1_model import Stage1Collator, Stage1Model, stage1_example
from latent_sft_core.phase2_training import LatentCollator, LatentExample, latent_forward
from latent_sft_core.text import TextFormat, special_ids, train_embedded_tokenizer
from latent_sft_core.training import CausalLMCollator


def synthetic_rows(params: Params, count: int) -> tuple[list[ChunkedRow], object]:
    synthetic = params.prepare_data.synthetic.model_copy(update={"train_size": count, "val_size": 0, "test_size": 0,
                                                                 "ood_size": 0})
    examples = generate_synthetic(synthetic, params.base.seed)["train"]
    text_format = TextFormat(params.base.text)
    texts = [piece for e in examples for piece in (text_format.prompt(e.question, None), e.cot, e.answer)]
    tokenizer = train_embedded_tokenizer(texts, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    return chunk_examples(examples, tokenizer, text_format, params.base.compression_rate), tokenizer


def training_step(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    params = load_params(args.params)
    torch.manual_seed(params.base.seed)
    rows, tokenizer = synthetic_rows(params, max(args.batch_size * 4, 2000))
    rows = rows[: args.batch_size]
    ids = special_ids(tokenizer)
    lora, k = params.train_joint.decoder_lora, params.base.top_k

    def model() -> torch.nn.Module:
        return with_lora(build_tiny_model(params.base_model.tiny, len(tokenizer), ids, params.base.seed), lora, 0)

    cot_model = model()
    cot_batch = CausalLMCollator(ids.pad)([cot_sft_sequence(row, ids) for row in rows])
    stage1 = Stage1Model(model(), model(), params.latent, k)
    stage1_batch = Stage1Collator(ids.pad)([stage1_example(row, ids) for row in rows])
    stage2_model = model()
    latents = sum(row.num_chunks for row in rows)
    teacher = torch.randint(0, len(tokenizer), (latents, k))
    probs = torch.softmax(torch.randn(latents, k), dim=-1)
    examples, offset = [], 0
    for row in rows:
        examples.append(LatentExample(stage2_sequence(row, ids), teacher[offset : offset + row.num_chunks],
                                      probs[offset : offset + row.num_chunks]))
        offset += row.num_chunks
    stage2_batch = LatentCollator(ids.pad)(examples)

    kinds = {
        "cot_sft": training_step(cot_model, lambda: cot_model(**cot_batch).loss),
        "stage1_joint": training_step(stage1, lambda: stage1(**stage1_batch)["loss"]),
        "stage2": training_step(stage2_model, lambda: latent_forward(stage2_model, stage2_batch, 1.0, 1.0)["loss"]),
    }
    for step in kinds.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, step in kinds.items():
            began = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = {name: median[name] / median["cot_sft"] for name in kinds}
    targets = {"cot_sft": "", "stage1_joint": "<= 2.2x", "stage2": "<= 1.15x"}
    table = "\n".join(f"| {name} | {1000 * median[name]:.1f} | {ratio[name]:.2f}x | {targets[name]} |"
                      for name in kinds)
    update_section("step_cost", f"""## Training-step cost, relative to CoT-SFT

`python -m bench.step_cost --rounds {args.rounds} --batch-size {args.batch_size}` ({machine_line()}).
Default tiny model (random weights), one batch of {len(rows)} synthetic rows (c = {params.base.compression_rate},
{latents} latents), LoRA rank {lora.rank} everywhere, torch AdamW, no DeepSpeed; median of {args.rounds}
interleaved rounds.

| step | median ms | vs CoT-SFT | target |
|---|---|---|---|
{table}
""")
    print(json.dumps({"median_seconds": median, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
