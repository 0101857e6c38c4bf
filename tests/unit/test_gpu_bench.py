"""The GPU benchmark at its toy shape on CPU: every part runs the pipeline's code and keeps its results, a rerun
skips what is kept, and the report says plainly when no GPU has measured anything."""

from __future__ import annotations

import json

import pytest
import torch

from bench.gpu import SHAPES, Setup, main, model_flops, report

TOY = ["--shape", "toy", "--batch", "4", "--prompt-tokens", "8", "--chain-tokens", "8", "--answer-tokens", "2",
       "--steps", "1", "--warmup", "1"]

pytestmark = pytest.mark.unit


def kept(folder):
    (machine,) = [p for p in folder.iterdir() if p.is_dir()]
    return machine, {p.stem: json.loads(p.read_text()) for p in machine.glob("*.json")}


def test_steps_and_decoding_at_toy_shape(tmp_path):
    main([*TOY, "--parts", "steps", "decoding", "--decode-batches", "4", "--out", str(tmp_path)])
    machine, results = kept(tmp_path)
    steps = results["steps-toy-b4"]
    assert set(steps) == {"cot_sft", "stage1_joint", "stage2"}
    for kind in steps.values():
        assert kind["seconds_per_step"] > 0 and kind["tokens_per_second"] > 0 and kind["mfu"] is None  # no CPU peak
    # 4 rows: CoT-SFT [8 prompt, <think>, 8 chain, </think>, 2 answer, <end>] = 21 tokens each; phase 1 runs the
    # encoder and the decoder; stage 2 holds ceil(8 / 4) = 2 latents where the chain was
    assert steps["cot_sft"]["tokens_per_step"] == 4 * 21
    assert steps["stage2"]["tokens_per_step"] == 4 * (21 - 8 + 2)
    decoding = results["decoding-toy"]
    assert decoding["latent@4"]["tokens_per_row"] == 2 + 1 + 2  # two latent steps, </think>, two answer tokens
    assert decoding["latent@4"]["per_token_vs_explicit"] > 0
    assert results["meta"]["shape"] == "toy"

    before = (machine / "steps-toy-b4.json").stat().st_mtime_ns
    main([*TOY, "--parts", "steps", "--out", str(tmp_path)])  # kept: not measured again
    assert (machine / "steps-toy-b4.json").stat().st_mtime_ns == before


def test_model_flops_follow_the_stated_convention():
    setup = Setup("toy", torch.device("cpu"), torch.float32, 1, 8, 8, 2, 4)
    config = setup.config
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    per_token = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size) + 4 * layers * 10 * d
    head = 2 * d * config.vocab_size
    assert model_flops(config, 10, 10, 3, trained=True) == 3 * (10 * per_token + 3 * head)
    assert model_flops(config, 10, 10, 0, trained=False) == 2 * 10 * per_token
    assert SHAPES["llama-3.2-1b"]["vocab_size"] == 128256 and SHAPES["llama-3.2-1b"]["num_hidden_layers"] == 16


def test_report_without_gpu_results_says_nothing_was_measured(tmp_path):
    (tmp_path / "cpu-x86_64").mkdir()
    text = report(tmp_path)
    assert "Not measured yet: no GPU" in text and "35% MFU" in text


@pytest.mark.slow
def test_zero_part_in_one_process_at_toy_shape(tmp_path):
    main([*TOY, "--parts", "zero", "--out", str(tmp_path)])
    _, results = kept(tmp_path)
    for stage in (2, 3):
        result = results[f"zero{stage}-toy-x1"]
        assert result["zero_stage"] == stage and result["processes"] == 1 and result["tokens_per_second_per_process"] > 0
