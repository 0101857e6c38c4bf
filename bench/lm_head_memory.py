"""Peak memory of a training step with the LM head at every position against only where the loss reads it.

A SmolLM2-135M-shaped model (its config: 30 layers, hidden 576, 49,152-token vocabulary; random weights) takes
one stage-1 joint step and one stage-2 step on a batch of GSM8k-Aug-shaped rows (``bench.gpu``'s rows), in
three configurations, each in a fresh process so that its peak resident memory is its own:

* ``every position``: the head over the whole [batch, length] grid, as before ``modeling.logits_only_at`` (the
  loss positions are replaced by all positions; the losses are unchanged, they read the same cells);
* ``loss positions``: the pipeline as it is, the head only before labels and latent slots;
* ``+ checkpointing``: the same with ``train.gradient_checkpointing``.

    python -m bench.lm_head_memory [--batch 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from bench.gpu import Setup, stage2_batch
from bench.report import machine_line, update_section
from bench.step_cost import training_step
from latent_sft_core.config import LatentParams
from latent_sft_core.modeling import checkpoint_activations
from latent_sft_core.phase1_model import Stage1Collator, Stage1Model, stage1_example
from latent_sft_core.phase2_training import latent_forward

CONFIGURATIONS = {"every position": ("dense", False), "loss positions": ("selected", False),
                  "+ checkpointing": ("selected", True)}


def measure(kind: str, head: str, checkpointing: bool, batch: int, steps: int) -> dict:
    """One configuration in this process: seconds per step and the process's peak RSS."""
    if head == "dense":
        import latent_sft_core.losses as losses

        every = lambda labels, roles=None: torch.ones_like(labels, dtype=torch.bool)  # noqa: E731
        for module in ("latent_sft_core.phase1_model", "latent_sft_core.phase2_training"):
            sys.modules[module].loss_positions = every
        losses.loss_positions = every
    setup = Setup("smollm2-135m", torch.device("cpu"), torch.float32, batch, 64, 96, 8, 4)
    rows, ids = setup.rows(batch), setup.ids
    if kind == "stage1_joint":
        model = Stage1Model(setup.model(True), setup.model(True), LatentParams(), setup.top_k)
        data = Stage1Collator(ids.pad)([stage1_example(row, ids) for row in rows])

        def loss():
            return model(**data)["loss"]
    else:
        model = setup.model(True)
        data = stage2_batch(setup, rows)

        def loss():
            return latent_forward(model, data, 1.0, 1.0)["loss"]
    if checkpointing:
        checkpoint_activations(model)
    model.train()
    step = training_step(model, loss)
    step()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return {"seconds_per_step": round((time.perf_counter() - began) / steps, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("KIND", "HEAD", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, head, checkpointing = args.one
        print(json.dumps(measure(kind, head, checkpointing == "1", args.batch, args.steps)))
        return
    results: dict[str, dict[str, dict]] = {}
    for kind in ("stage1_joint", "stage2"):
        for name, (head, checkpointing) in CONFIGURATIONS.items():
            output = subprocess.run([sys.executable, "-m", "bench.lm_head_memory", "--batch", str(args.batch),
                                     "--steps", str(args.steps), "--one", kind, head, str(int(checkpointing))],
                                    check=True, capture_output=True, text=True).stdout
            results.setdefault(kind, {})[name] = json.loads(output.strip().splitlines()[-1])
            print(kind, name, results[kind][name], flush=True)
    rows = []
    for kind, by_name in results.items():
        base = by_name["every position"]
        for name, value in by_name.items():
            rows.append(f"| {kind} | {name} | {value['peak_rss_gb']} | {value['peak_rss_gb'] / base['peak_rss_gb']:.2f}x "
                        f"| {value['seconds_per_step']} |")
    update_section("lm_head_memory", f"""## Memory that scales with the vocabulary: the LM head only where a loss reads it

`python -m bench.lm_head_memory --batch {args.batch} --steps {args.steps}` ({machine_line()}). A SmolLM2-135M-shaped
model (49,152-token vocabulary, random weights), {args.batch} GSM8k-Aug-shaped rows (64 prompt, 96 chain, 8 answer
tokens; c = 4), LoRA rank 64 on both phase-1 models and in stage 2, fp32 on CPU; each configuration in its own
process (peak resident memory of the whole process, model and optimizer included), side by side in one run.

| step | LM head | peak RSS GB | vs every position | s / step |
|---|---|---|---|---|
""" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
