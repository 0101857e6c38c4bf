"""The GPU benchmark: training steps, latent decoding and ZeRO on a Llama-3.2-1B-shaped model.

The model has Llama-3.2-1B's real configuration (16 layers, hidden 2048, GQA 32/8 heads, 128,256-token vocabulary,
tied embeddings) and random weights: throughput does not depend on the weights. Rows are GSM8k-Aug-shaped token
sequences (``--prompt-tokens``, ``--chain-tokens``, ``--answer-tokens``; c = ``--compression-rate``) laid out by the
pipeline's own layout functions, and every step runs the pipeline's own training code:

* ``steps``: one optimizer step of CoT-SFT (full fine-tuning, ``losses.causal_lm_loss``), of stage-1 joint
  training (encoder + decoder with LoRA rank 64, ``Stage1Model``) and of stage 2 (LoRA, ``latent_forward``), bf16
  autocast over fp32 weights (the Trainer's mixed precision): tokens/s, peak memory, MFU;
* ``decoding``: ``inference.decode`` of the latent model against explicit CoT decoding at batch 64 and 256,
  questions/s and seconds per generated token (latent steps + answer tokens, or chain + answer tokens);
* ``zero``: the stage-2 step under DeepSpeed ZeRO-2 and ZeRO-3, in one process and in one process per GPU
  (``torchrun``), tokens/s per GPU and peak memory.

MFU counts model FLOPs (PaLM's convention, no recomputation): forward ``2 N T`` for the N weights of the
transformer (the LM head only at the positions a loss reads) plus attention ``4 L s d T`` for T tokens of length
s; the backward pass doubles the forward for trained weights and costs one forward for frozen ones (input
gradients only). Peak: the GPU's dense bf16 FLOPs (``PEAK_BF16_TFLOPS`` by name, or ``--peak-tflops``); none on
CPU. Block-sparse (FlexAttention) masks are not measured: the pipeline has no FlexAttention path yet.

Each measurement is kept as JSON under ``--out/<machine>/`` and skipped when kept, so a time-limited device
session continues where the last one stopped; ``--report`` writes BENCHMARKS.md's GPU section from the kept files.
``--shape toy`` runs the same code at a toy size on CPU in seconds (tests/unit/test_gpu_bench.py). On a lent
device (the tool library's ``device``): ``python -m bench.gpu --out $OUT/gpu``, then copy the machine's folder
into ``bench/results/gpu/`` here and run ``python -m bench.gpu --report --parts``.

    python -m bench.gpu [--shape llama-3.2-1b|toy] [--parts steps decoding zero] [--report]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.report import machine_line, update_section
from bench.step_cost import training_step
from latent_sft_core.chunking import ChunkedRow, chunk_bounds
from latent_sft_core.config import DecodingParams, DeepSpeedParams, LatentParams, LaunchParams, LoraParams
from latent_sft_core.deepspeed_config import deepspeed_config
from latent_sft_core.inference import LatentMode, decode
from latent_sft_core.launcher import torchrun_command
from latent_sft_core.layout import cot_sft_sequence, stage2_sequence
from latent_sft_core.losses import loss_positions
from latent_sft_core.modeling import with_lora
from latent_sft_core.phase1_model import Stage1Collator, Stage1Model, stage1_example
from latent_sft_core.phase2_training import LatentCollator, LatentExample, latent_forward
from latent_sft_core.text import SpecialIds
from latent_sft_core.training import CausalLMCollator, causal_lm_forward

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "gpu"
SHAPES = {
    # meta-llama/Llama-3.2-1B-Instruct's config.json
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # HuggingFaceTB/SmolLM2-135M-Instruct's config.json (bench.lm_head_memory)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "toy": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True),
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
LORA = LoraParams(rank=64, alpha=128)


def special_ids_for(vocab_size: int) -> SpecialIds:
    """The method's tokens at the top of the vocabulary, where a pretrained model's added tokens are."""
    return SpecialIds(think_open=vocab_size - 5, think_close=vocab_size - 4, latent=vocab_size - 3,
                      pad=vocab_size - 2, end=vocab_size - 1)


@dataclass(frozen=True)
class Setup:
    shape: str
    device: torch.device
    dtype: torch.dtype
    batch: int
    prompt_tokens: int
    chain_tokens: int
    answer_tokens: int
    compression_rate: int
    top_k: int = 10

    @property
    def config(self) -> LlamaConfig:
        return LlamaConfig(**SHAPES[self.shape], attn_implementation="sdpa")

    @property
    def ids(self) -> SpecialIds:
        return special_ids_for(SHAPES[self.shape]["vocab_size"])

    def model(self, lora: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = LlamaForCausalLM(self.config).to(self.device)
        return with_lora(model, LORA, 0) if lora else model

    def rows(self, count: int) -> list[ChunkedRow]:
        generator = torch.Generator().manual_seed(0)
        words = SHAPES[self.shape]["vocab_size"] - 5  # ordinary tokens only

        def tokens(n: int) -> list[int]:
            return torch.randint(0, words, (n,), generator=generator).tolist()

        return [ChunkedRow(id=str(i), question="q", answer="1", prompt_ids=tokens(self.prompt_tokens),
                           cot_ids=tokens(self.chain_tokens), answer_ids=tokens(self.answer_tokens),
                           chunk_bounds=chunk_bounds(self.chain_tokens, self.compression_rate), alt_cot_ids=[])
                for i in range(count)]


def stage2_batch(setup: Setup, rows: list[ChunkedRow]) -> dict[str, torch.Tensor]:
    """A collated stage-2 batch of ``rows`` on the setup's device, with random top-k soft labels as the teacher."""
    latents = sum(row.num_chunks for row in rows)
    teacher_ids = torch.randint(0, SHAPES[setup.shape]["vocab_size"] - 5, (latents, setup.top_k))
    teacher_probs = torch.softmax(torch.randn(latents, setup.top_k), dim=-1)
    examples, offset = [], 0
    for row in rows:
        span = slice(offset, offset + row.num_chunks)
        examples.append(LatentExample(stage2_sequence(row, setup.ids), teacher_ids[span], teacher_probs[span]))
        offset += row.num_chunks
    return on_device(LatentCollator(setup.ids.pad)(examples), setup.device)


def on_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB on Linux)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops(config: LlamaConfig, tokens: int, length: int, head_positions: int, trained: bool) -> float:
    """Forward + backward model FLOPs of ``tokens`` tokens in sequences of ``length`` (module docstring)."""
    d, layers, kv = config.hidden_size, config.num_hidden_layers, config.num_key_value_heads * config.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size  # q, o; k, v; gate, up, down
    forward = 2 * layers * per_layer * tokens + 4 * layers * length * d * tokens + 2 * d * config.vocab_size * head_positions
    return forward * (3 if trained else 2)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - began) / steps


def autocast(setup: Setup):
    return torch.autocast(setup.device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32)


def training_steps(setup: Setup, warmup: int, steps: int, peak_tflops: float | None) -> dict[str, dict]:
    """CoT-SFT, stage-1 joint and stage-2 steps (module docstring)."""
    rows, ids, config = setup.rows(setup.batch), setup.ids, setup.config
    cot_batch = on_device(CausalLMCollator(ids.pad)([cot_sft_sequence(row, ids) for row in rows]), setup.device)
    stage1_batch = on_device(Stage1Collator(ids.pad)([stage1_example(row, ids) for row in rows]), setup.device)
    latent_batch = stage2_batch(setup, rows)

    def cot_loss(model):
        with autocast(setup):
            return causal_lm_forward(model, cot_batch)["loss"]

    def stage1_loss(model):
        with autocast(setup):
            return model(**stage1_batch)["loss"]

    def stage2_loss(model):
        with autocast(setup):
            return latent_forward(model, latent_batch, 1.0, 1.0)["loss"]

    # per kind: the model, its loss, and each pass's (token ids, LM-head positions, whether its weights train)
    kinds = {
        "cot_sft": (lambda: setup.model(lora=False), cot_loss,
                    [(cot_batch["input_ids"], loss_positions(cot_batch["labels"]), True)]),
        "stage1_joint": (lambda: Stage1Model(setup.model(True), setup.model(True), LatentParams(), setup.top_k),
                         stage1_loss, [(stage1_batch["encoder_input_ids"], None, False),  # the encoder has no head
                                       (stage1_batch["input_ids"], loss_positions(stage1_batch["labels"]), False)]),
        "stage2": (lambda: setup.model(lora=True), stage2_loss,
                   [(latent_batch["input_ids"], loss_positions(latent_batch["labels"], latent_batch["roles"]), False)]),
    }
    results = {}
    for name, (build, loss_of, passes) in kinds.items():
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(setup.device)
        model = build()
        seconds = time_steps(training_step(model, lambda m=model, f=loss_of: f(m)), setup.device, warmup, steps)
        tokens = sum(int(input_ids.numel()) for input_ids, _, _ in passes)
        flops = sum(model_flops(config, int(input_ids.numel()), input_ids.shape[1],
                                0 if head is None else int(head.sum()), trained)
                    for input_ids, head, trained in passes)
        results[name] = {
            "seconds_per_step": round(seconds, 4),
            "tokens_per_second": round(tokens / seconds, 1),
            "peak_memory_gb": round(peak_memory_gb(setup.device), 2),
            "mfu": round(flops / seconds / (peak_tflops * 1e12), 4) if peak_tflops else None,
            "tokens_per_step": tokens,
        }
        del model
    return results


@torch.no_grad()
def decoding(setup: Setup, batch_sizes: list[int]) -> dict[str, dict]:
    """Latent against explicit decoding of the same questions (module docstring)."""
    ids, results = setup.ids, {}
    latent_steps = -(-setup.chain_tokens // setup.compression_rate)
    model = setup.model(lora=False).to(setup.dtype).eval()
    for batch in batch_sizes:
        prompts = [row.prompt_ids for row in setup.rows(batch)]
        runs = {
            # random weights never close the reasoning early: every row runs to the caps, so the counts are fixed
            "latent": (DecodingParams(batch_size=batch, max_latent_steps=latent_steps, max_new_tokens=setup.answer_tokens),
                       LatentMode(top_k=setup.top_k, temperature=1.0)),
            "explicit": (DecodingParams(batch_size=batch, max_new_tokens=setup.chain_tokens + setup.answer_tokens), None),
        }
        for name, (params, latent) in runs.items():
            decode(model, prompts[:2], ids, params, latent, progress=False)  # warm-up
            synchronize(setup.device)
            began = time.perf_counter()
            decoded = decode(model, prompts, ids, params, latent, progress=False)
            synchronize(setup.device)
            seconds = time.perf_counter() - began
            # one decoding step gives every row one token: latent step or chain token, </think>, answer token
            per_row = sum(d.num_reasoning_tokens + 1 + len(d.answer_ids) for d in decoded) / batch
            results[f"{name}@{batch}"] = {"questions_per_second": round(batch / seconds, 2),
                                          "seconds_per_token_step": round(seconds / per_row, 6),
                                          "tokens_per_row": round(per_row, 1)}
        latent, explicit = results[f"latent@{batch}"], results[f"explicit@{batch}"]
        latent["per_token_vs_explicit"] = round(latent["seconds_per_token_step"] / explicit["seconds_per_token_step"], 3)
    return results


def zero_worker(setup: Setup, zero_stage: int, warmup: int, steps: int, out: Path) -> None:
    """One ZeRO configuration of the stage-2 step in this process group (started by torchrun); rank 0 writes."""
    import deepspeed
    import torch.distributed as dist

    from latent_sft_core.distributed import World, ensure_distributed_env

    ensure_distributed_env()
    world = World.from_environment()
    deepspeed.init_distributed("nccl" if setup.device.type == "cuda" else "gloo")
    device = torch.device("cuda", world.local_rank) if setup.device.type == "cuda" else setup.device
    setup = replace(setup, device=device)
    config = deepspeed_config(DeepSpeedParams(enabled=True, zero_stage=zero_stage), bf16=setup.dtype == torch.bfloat16)
    config |= {"train_micro_batch_size_per_gpu": setup.batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    config["optimizer"]["params"] = {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}
    model = setup.model(lora=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    batch = stage2_batch(setup, setup.rows(setup.batch))

    def step() -> None:
        engine.backward(latent_forward(engine, batch, 1.0, 1.0)["loss"])
        engine.step()

    seconds = time_steps(step, device, warmup, steps)
    tokens = int(batch["input_ids"].numel())
    if world.is_main:
        write_result(out, {"seconds_per_step": round(seconds, 4), "tokens_per_second_per_process": round(tokens / seconds, 1),
                           "processes": world.size, "zero_stage": zero_stage,
                           "peak_memory_gb": round(peak_memory_gb(device), 2)})
    dist.barrier()


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def machine_name(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()


def peak_of(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def report(results_dir: Path) -> str:
    """BENCHMARKS.md's GPU section from every kept result (or the statement that none was measured on a GPU)."""
    machines = sorted(p for p in results_dir.glob("*") if p.is_dir() and not p.name.startswith("cpu-"))
    if not machines:
        today = datetime.date.today().isoformat()
        return (f"## GPU benchmark\n\nNot measured yet: no GPU has been lent to this project's sessions so far "
                f"(checked {today}), and no figure here is invented. The script is ready: `python -m bench.gpu` "
                "(Llama-3.2-1B shape, bf16; every part kept per configuration, so one 15-minute device session can be "
                "continued by the next; `--report` writes this section), and it runs at `--shape toy` on CPU in the "
                "test suite. Targets: stage-1 joint step >= 35% MFU, stage-2 step >= 40% MFU, latent decoding within "
                "1.2x of explicit decoding per generated token. On CPU, ZeRO-2 and ZeRO-3 train under 2 gloo "
                "processes within the tolerances of `tests/integration/test_distributed.py` (section \"Several "
                "processes\").\n")
    lines = ["## GPU benchmark", ""]
    for machine in machines:
        meta = json.loads((machine / "meta.json").read_text()) if (machine / "meta.json").is_file() else {}
        lines += [f"### {machine.name}", "", f"`{meta.get('command', 'python -m bench.gpu')}` ({meta.get('when', '')})", ""]
        for file in sorted(machine.glob("*.json")):
            if file.name != "meta.json":
                lines += [f"- `{file.stem}`: " + ", ".join(f"{k} {v}" for k, v in sorted(json.loads(file.read_text()).items()))]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--parts", nargs="*", choices=["steps", "decoding", "zero"], default=["steps", "decoding", "zero"],
                        help="what to measure (none: only --report)")
    parser.add_argument("--batch", type=int, default=16, help="rows per training step and process")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--chain-tokens", type=int, default=96)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--compression-rate", type=int, default=4)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--zero-stages", type=int, nargs="+", choices=[2, 3], default=[2, 3])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report", action="store_true", help="write BENCHMARKS.md's GPU section from kept results")
    parser.add_argument("--zero-worker", type=int, default=None, help=argparse.SUPPRESS)  # set for torchrun's workers
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = Setup(args.shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.batch,
                  args.prompt_tokens, args.chain_tokens, args.answer_tokens, args.compression_rate)
    if args.zero_worker is not None:
        zero_worker(setup, args.zero_worker, args.warmup, args.steps, args.worker_out)
        return
    folder = args.out / machine_name(device)
    if args.parts:
        write_result(folder / "meta.json", {"command": " ".join(["python -m bench.gpu", *(argv or sys.argv[1:])]),
                                            "when": machine_line(), "shape": args.shape, "dtype": str(setup.dtype)})
    kept = folder / f"steps-{args.shape}-b{args.batch}.json"
    if "steps" in args.parts and not kept.is_file():
        write_result(kept, training_steps(setup, args.warmup, args.steps, peak_of(device, args.peak_tflops)))
    kept = folder / f"decoding-{args.shape}.json"
    if "decoding" in args.parts and not kept.is_file():
        write_result(kept, decoding(setup, args.decode_batches))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    for processes in sorted({1, gpus}):
        for zero_stage in args.zero_stages if "zero" in args.parts else []:
            kept = folder / f"zero{zero_stage}-{args.shape}-x{processes}.json"
            if kept.is_file():
                continue
            command = torchrun_command(LaunchParams(processes_per_node=processes), "bench.gpu", [
                "--shape", args.shape, "--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens),
                "--chain-tokens", str(args.chain_tokens), "--answer-tokens", str(args.answer_tokens),
                "--compression-rate", str(args.compression_rate), "--warmup", str(args.warmup), "--steps", str(args.steps),
                "--zero-worker", str(zero_stage), "--worker-out", str(kept)])
            subprocess.run(command, check=True)
    if args.report:
        update_section("gpu", report(args.out))
    print(json.dumps({p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}, indent=2))


if __name__ == "__main__":
    main()
