"""Device, precision and attention kernels from ``compute``: resolved per process, bf16 mixed precision in
training, models cast for inference, and the same answers from either attention kernel. The GPU cases are
marked ``gpu`` and skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from latent_sft_core.config import ComputeParams, DeepSpeedParams, ParamsError, TrainParams, parse_params
from latent_sft_core.distributed import compute_device, compute_dtype
from latent_sft_core.evaluation import EvaluationOutputs, evaluate
from latent_sft_core.modeling import for_inference, load_model
from latent_sft_core.phase2_training import train_latent
from latent_sft_core.training import run_training, training_arguments
from tests.support import deep_merge

pytestmark = pytest.mark.integration


def with_compute(params, compute: dict, **sections):
    return parse_params(deep_merge(params.model_dump(mode="json"), {"compute": compute, **sections}))


def outputs_in(folder) -> EvaluationOutputs:
    return EvaluationOutputs(*(folder / name for name in ("e.json", "r.md", "p.parquet", "ecr.csv", "h.json")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_auto_is_the_cpu_in_fp32_here_and_cuda_without_a_gpu_is_an_error():
    device = compute_device(ComputeParams())
    assert device == torch.device("cpu") and compute_dtype(ComputeParams(), device) == torch.float32
    assert compute_dtype(ComputeParams(dtype="bfloat16"), device) == torch.bfloat16
    with pytest.raises(ParamsError, match="compute.device is 'cuda' but this process sees no CUDA device"):
        compute_device(ComputeParams(device="cuda"))
    args = training_arguments(TrainParams(), "unused", 0, ComputeParams(dtype="bfloat16"))
    assert args.use_cpu and args.bf16


def test_bf16_training_is_mixed_precision_and_saves_fp32_weights(labelled_run, tmp_path):
    root, params, _ = labelled_run
    bf16 = with_compute(params, {"dtype": "bfloat16"}, train_latent={"deepspeed": {"enabled": False}})
    metrics = train_latent(bf16, root / "merged", root / "chunked", root / "labels", tmp_path / "latent",
                           tmp_path / "m.json", tmp_path / "loss.csv", scratch_dir=tmp_path / "scratch")
    losses = [float(line.split(",")[1]) for line in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert metrics["steps"] == 12 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    saved = load_file(tmp_path / "latent" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # master weights stay fp32


def test_bf16_under_deepspeed_turns_on_its_bf16_mode(tmp_path, monkeypatch):
    captured = {}

    class Stop(Exception):
        pass

    def capture(train, output_dir, seed, compute, **overrides):
        captured.update(overrides)
        raise Stop

    monkeypatch.setattr("latent_sft_core.training.training_arguments", capture)
    # it would set RANK, WORLD_SIZE and MASTER_PORT in this process's environment, which later stages inherit
    monkeypatch.setattr("latent_sft_core.training.ensure_distributed_env", lambda: None)
    with pytest.raises(Stop):
        run_training(torch.nn.Linear(1, 1), [], None, TrainParams(), tmp_path, 0, "x",
                     deepspeed=DeepSpeedParams(enabled=True), compute=ComputeParams(dtype="bfloat16"))
    assert captured["deepspeed"]["bf16"] == {"enabled": True}


def test_inference_in_bf16_and_with_either_attention_kernel(latent_run, tmp_path):
    root, params = latent_run
    small = {"evaluate": {"splits": ["test"], "models": ["latent_sft"], "max_rows": 8}}
    answers = {}
    for name, compute in {"sdpa": {}, "eager": {"attention": "eager"}, "bf16": {"dtype": "bfloat16"}}.items():
        run = with_compute(params, compute, **small)
        results = evaluate(run, root / "chunked", {"latent_sft": root / "latent"}, outputs_in(tmp_path / name))
        answers[name] = results["latent_sft"]["test"]
    assert answers["sdpa"] == {**answers["eager"], "seconds_per_question": answers["sdpa"]["seconds_per_question"]}
    assert answers["bf16"]["rows"] == 8 and 0 <= answers["bf16"]["pass@1"] <= 1
    model, _ = load_model(root / "latent")
    cast = for_inference(model, ComputeParams(dtype="bfloat16", attention="eager"))
    assert next(cast.parameters()).dtype == torch.bfloat16 and cast.config._attn_implementation == "eager"
    assert not cast.training


@pytest.mark.gpu
def test_gpu_evaluation_agrees_with_the_cpu(latent_run, tmp_path):
    root, params = latent_run
    small = {"evaluate": {"splits": ["test"], "max_rows": 16}}
    cpu = evaluate(with_compute(params, {"device": "cpu"}, **small), root / "chunked",
                   {"cot_sft": root / "base", "latent_sft": root / "latent"}, outputs_in(tmp_path / "cpu"))
    gpu = evaluate(with_compute(params, {"device": "cuda", "dtype": "float32"}, **small), root / "chunked",
                   {"cot_sft": root / "base", "latent_sft": root / "latent"}, outputs_in(tmp_path / "gpu"))
    for model in cpu:
        assert gpu[model]["test"]["pass@1"] == pytest.approx(cpu[model]["test"]["pass@1"], abs=1 / 16)


@pytest.mark.gpu
def test_gpu_bf16_training_runs(labelled_run, tmp_path):
    root, params, _ = labelled_run
    metrics = train_latent(with_compute(params, {"device": "cuda", "dtype": "bfloat16"}), root / "merged",
                           root / "chunked", root / "labels", tmp_path / "latent", tmp_path / "m.json",
                           tmp_path / "loss.csv", scratch_dir=tmp_path / "scratch")
    assert metrics["steps"] == 12 and metrics["zero_stage"] == 2


def test_activation_checkpointing_trains_the_same_adapters(phase1_run, tmp_path):
    from latent_sft_core.phase1_training import train_stage1
    from tests.support import stage1_inputs

    root, params, _ = phase1_run
    results = {}
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        run = parse_params(deep_merge(params.model_dump(mode="json"),
                                      {"train_joint": {"train": {"gradient_checkpointing": checkpointing}}}))
        results[name] = train_stage1(run, "train_joint", stage1_inputs(root, "train_joint"), tmp_path / name,
                                     tmp_path / f"{name}.json", tmp_path / f"{name}.csv", scratch_dir=tmp_path / "s" / name)
    plain, checkpointed = results["plain"], results["checkpointed"]
    assert checkpointed["steps"] == plain["steps"] == 12
    for step, loss in plain["val_loss_by_step"].items():
        assert checkpointed["val_loss_by_step"][step] == pytest.approx(loss, rel=1e-5)
    for part in ("encoder", "decoder"):
        a = load_file(tmp_path / "plain" / part / "adapter_model.safetensors")
        b = load_file(tmp_path / "checkpointed" / part / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_activation_checkpointing_reaches_every_model_of_a_module():
    from transformers import LlamaConfig, LlamaForCausalLM

    from latent_sft_core.config import LoraParams
    from latent_sft_core.modeling import checkpoint_activations, outermost_hf_models, with_lora

    def tiny():
        return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2))

    pair = torch.nn.ModuleDict({"encoder": with_lora(tiny(), LoraParams(rank=2, alpha=4, targets=("q_proj",)), 0),
                                "decoder": tiny()})
    models = list(outermost_hf_models(pair))
    assert len(models) == 2 and all(isinstance(m, LlamaForCausalLM) for m in models)
    checkpoint_activations(pair)
    assert all(m.is_gradient_checkpointing and not m.config.use_cache for m in models)
