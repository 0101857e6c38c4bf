"""Phase 2 on the micro configuration: soft-label cache, stage-2 training, DeepSpeed ZeRO-2 / ZeRO-3.

DeepSpeed runs go through the stage's command line in subprocesses: DeepSpeed sets up torch.distributed and
environment variables that must not leak into the other tests of this process.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from latent_sft_core.chunking import read_chunked
from latent_sft_core.config import parse_params
from latent_sft_core.errors import ArtifactError
from latent_sft_core.evaluation import EvaluationOutputs, evaluate
from latent_sft_core.latent_health import LatentCollapseError
from latent_sft_core.layout import encoder_sequence, pad_sequences
from latent_sft_core.modeling import load_pretrained_model, save_model
from latent_sft_core.phase1_model import encode_latents
from latent_sft_core.phase2_training import LatentCollator, LatentDataset, LatentTrainer, latent_forward, train_latent
from latent_sft_core.soft_label_caching import cache_soft_labels, encoder_fingerprint
from latent_sft_core.soft_labels import open_soft_labels
from latent_sft_core.text import load_tokenizer, special_ids, tokenizer_fingerprint
from tests.support import deep_merge

pytestmark = pytest.mark.integration


def test_cache_holds_the_encoders_alpha_for_every_latent(labelled_run):
    root, params, metrics = labelled_run
    tokenizer = load_tokenizer(root / "merged" / "encoder")
    rows = read_chunked(root / "chunked" / "train.parquet")
    assert metrics["train"]["rows"] == len(rows) and metrics["val"]["rows"] == 16
    assert metrics["train"]["latents"] == sum(r.num_chunks for r in rows)
    reader = open_soft_labels(root / "labels" / "train.parquet", compression_rate=2, top_k=params.base.top_k,
                              tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                              encoder_fingerprint=encoder_fingerprint(root / "merged"))
    assert len(reader) == len(rows) and reader.ids() == [r.id for r in rows]
    assert reader.meta.num_latents == metrics["train"]["latents"]
    # recompute the alpha of a few rows with the merged models: same ids, same probabilities (float16)
    encoder = load_pretrained_model(root / "merged" / "encoder")
    decoder = load_pretrained_model(root / "merged" / "decoder")
    sample = [r for r in rows if r.num_chunks][:3]
    padded = pad_sequences([encoder_sequence(r, special_ids(tokenizer)) for r in sample], special_ids(tokenizer).pad)
    with torch.no_grad():
        alpha = encode_latents(encoder, decoder, params.latent, params.base.top_k, padded["input_ids"],
                               padded["roles"]).alpha
    offset = 0
    for row in sample:
        ids, probs = reader.by_id(row.id)
        n = row.num_chunks
        assert ids.shape == probs.shape == (n, params.base.top_k)
        assert torch.equal(ids, alpha.ids[offset : offset + n])
        torch.testing.assert_close(probs, alpha.probs[offset : offset + n], atol=1e-3, rtol=0)
        torch.testing.assert_close(probs.sum(-1), torch.ones(n), atol=2e-3, rtol=0)
        offset += n


def test_cache_reports_the_health_of_alpha_per_split(labelled_run):
    _, params, metrics = labelled_run
    for split in ("train", "val"):
        health = metrics[split]["latent_health"]
        assert health["latents"] == metrics[split]["latents"]
        assert {"mean_entropy", "distinct_top1", "mass_outside_top1", f"chunk_ecr@{params.base.top_k}", "chunk_mass",
                "collapsed", "collapse_reasons"} <= set(health)


def test_a_deliberately_collapsed_encoder_is_reported_as_collapsed(labelled_run, tmp_path, caplog):
    """An encoder whose final norm is zeroed gives every latent the same alpha (all logits 0): the cache's guard
    must say so in the log and the metrics, or fail the stage with ``on_collapse: error``."""
    root, params, _ = labelled_run
    merged_dir = tmp_path / "merged"
    shutil.copytree(root / "merged", merged_dir)
    encoder = load_pretrained_model(merged_dir / "encoder")
    with torch.no_grad():
        encoder.model.norm.weight.zero_()
    save_model(encoder, load_tokenizer(merged_dir / "encoder"), merged_dir / "encoder")
    with caplog.at_level(logging.WARNING, logger="latent_sft_core.latent_health"):
        metrics = cache_soft_labels(params, merged_dir, root / "chunked", tmp_path / "labels", tmp_path / "cache.json")
    for split in ("train", "val"):
        health = metrics[split]["latent_health"]
        assert health["collapsed"] is True and health["distinct_top1"] == 1 and health["chunk_mass"] < 0.05
    assert "cache_soft_labels val: THE LATENTS HAVE COLLAPSED" in caplog.text
    assert json.loads((tmp_path / "cache.json").read_text())["val"]["latent_health"]["collapsed"] is True
    strict = parse_params(deep_merge(params.model_dump(mode="json"), {"collapse_guard": {"on_collapse": "error"}}))
    with pytest.raises(LatentCollapseError, match="distinct top-1"):
        cache_soft_labels(strict, merged_dir, root / "chunked", tmp_path / "strict", tmp_path / "strict.json")
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.json").exists()


def test_scheduled_sampling_trains(labelled_run, tmp_path):
    root, params, _ = labelled_run
    sampled = parse_params(deep_merge(params.model_dump(mode="json"), {"train_latent": {
        "deepspeed": {"enabled": False}, "scheduled_sampling": {"enabled": True, "max_probability": 1.0}}}))
    metrics = train_latent(sampled, root / "merged", root / "chunked", root / "labels", tmp_path / "latent",
                           tmp_path / "m.json", tmp_path / "loss.csv", scratch_dir=tmp_path / "scratch")
    losses = [float(line.split(",")[1]) for line in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert metrics["steps"] == 12 and losses[-1] < losses[0]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_stage2_trains_and_writes_a_plain_checkpoint(labelled_run, tmp_path, finetune):
    root, params, _ = labelled_run
    plain = deep_merge(params.model_dump(mode="json"),
                       {"train_latent": {"deepspeed": {"enabled": False}, "finetune": finetune}})
    metrics = train_latent(parse_params(plain), root / "merged", root / "chunked", root / "labels", tmp_path / "latent",
                           tmp_path / "m.json", tmp_path / "loss.csv", scratch_dir=tmp_path / "scratch")
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["step", "loss"] and {"ce_loss", "kl_loss"} <= set(lines[0].split(","))
    losses = [float(line.split(",")[1]) for line in lines[1:]]
    assert losses[-1] < losses[0]
    assert metrics["steps"] == 12 and metrics["zero_stage"] is None
    assert metrics["best_val_loss"] == min(metrics["val_loss_by_step"].values())
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "latent"))
    start = AutoModelForCausalLM.from_pretrained(str(root / "merged" / "decoder"))
    assert not list((tmp_path / "latent").glob("adapter_*"))
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert changed, "stage 2 left the decoder unchanged"


def test_full_vocabulary_labels_and_gumbel_noise_train_too(labelled_run, tmp_path):
    root, params, _ = labelled_run
    full = parse_params(deep_merge(params.model_dump(mode="json"), {
        "latent": {"full_vocab": True},
        "train_latent": {"deepspeed": {"enabled": False}, "gumbel": {"enabled": True}},
    }))
    cache_soft_labels(full, root / "merged", root / "chunked", tmp_path / "labels", tmp_path / "cache.json")
    vocab = load_pretrained_model(root / "merged" / "decoder").config.vocab_size
    ids, probs = open_soft_labels(tmp_path / "labels" / "train.parquet", compression_rate=2, top_k=None,
                                  tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(root / "merged" / "encoder")),
                                  encoder_fingerprint=encoder_fingerprint(root / "merged"))[0]
    assert ids is None and probs.shape[1] == vocab
    metrics = train_latent(full, root / "merged", root / "chunked", tmp_path / "labels", tmp_path / "latent",
                           tmp_path / "m.json", tmp_path / "loss.csv", scratch_dir=tmp_path / "scratch")
    assert metrics["steps"] == 12 and (tmp_path / "latent" / "model.safetensors").is_file()
    kl = [float(line.split(",")[-1]) for line in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert all(value > 0 for value in kl)


@pytest.fixture(scope="module")
def hidden_state_run(labelled_run, tmp_path_factory):
    """The hidden-state ablation on the micro phase-1 run: its cache and a stage-2 model trained without the stop
    term. Returns (params, labels dir, stage-2 dir, loss-curve path, stage-2 metrics)."""
    root, params, _ = labelled_run
    out = tmp_path_factory.mktemp("hidden_state")
    hidden = parse_params(deep_merge(params.model_dump(mode="json"), {
        "latent": {"kind": "hidden_state"}, "cache_soft_labels": {"prob_dtype": "float32"},
        "train_latent": {"deepspeed": {"enabled": False}},
        "evaluate": {"models": ["latent_sft"], "splits": ["test"], "max_rows": 4},
    }))
    cache_soft_labels(hidden, root / "merged", root / "chunked", out / "labels", out / "cache.json")
    metrics = train_latent(hidden, root / "merged", root / "chunked", out / "labels", out / "latent",
                           out / "m.json", out / "loss.csv", scratch_dir=out / "scratch")
    return hidden, out / "labels", out / "latent", out / "loss.csv", metrics


def test_hidden_state_ablation_runs_through_phase_2_and_evaluation(labelled_run, hidden_state_run, tmp_path):
    """latent.kind hidden_state: the cache holds the encoder's hidden states, stage 2 feeds them and regresses
    the student's hidden state onto them, and the evaluation decodes by feeding its own hidden states."""
    root, params, _ = labelled_run
    hidden, labels, latent, loss_curve, metrics = hidden_state_run
    tokenizer = load_tokenizer(root / "merged" / "encoder")
    reader = open_soft_labels(labels / "train.parquet", compression_rate=2, top_k=params.base.top_k,
                              tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                              encoder_fingerprint=encoder_fingerprint(root / "merged"), latent_kind="hidden_state")
    row = next(r for r in read_chunked(root / "chunked" / "train.parquet") if r.num_chunks)
    ids, values = reader.by_id(row.id)
    encoder = load_pretrained_model(root / "merged" / "encoder")
    decoder = load_pretrained_model(root / "merged" / "decoder")
    padded = pad_sequences([encoder_sequence(row, special_ids(tokenizer))], special_ids(tokenizer).pad)
    with torch.no_grad():
        expected = encode_latents(encoder, decoder, hidden.latent, hidden.base.top_k, padded["input_ids"],
                                  padded["roles"]).hidden
    assert ids is None and values.shape == (row.num_chunks, decoder.config.hidden_size)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)

    header, *lines = loss_curve.read_text().splitlines()
    assert "mse_loss" in header.split(",") and not {"kl_loss", "stop_loss"} & set(header.split(","))
    losses = [float(line.split(",")[1]) for line in lines]
    assert metrics["steps"] == 12 and losses[-1] < losses[0]
    outputs = EvaluationOutputs(*(tmp_path / name for name in ("e.json", "r.md", "p.parquet", "ecr.csv", "h.json")))
    results = evaluate(hidden, root / "chunked", {"latent_sft": latent}, outputs)
    assert results["latent_sft"]["test"]["rows"] == 4 and outputs.predictions.is_file()


def test_hidden_state_stop_term_keeps_the_head_off_the_stop_token(labelled_run, hidden_state_run, tmp_path):
    """train_latent.hidden_state_stop_weight (ours): the stop term is logged at every logging step, and the trained
    model gives </think> less probability before the latent slots than the same training without it."""
    root, _, _ = labelled_run
    hidden, labels, plain, _, _ = hidden_state_run
    stopping = parse_params(deep_merge(hidden.model_dump(mode="json"),
                                       {"train_latent": {"hidden_state_stop_weight": 50.0}}))
    train_latent(stopping, root / "merged", root / "chunked", labels, tmp_path / "latent", tmp_path / "m.json",
                 tmp_path / "loss.csv", scratch_dir=tmp_path / "scratch")
    header, *lines = (tmp_path / "loss.csv").read_text().splitlines()
    stop = [float(line.split(",")[header.split(",").index("stop_loss")]) for line in lines]
    assert stop and all(value > 0 for value in stop)

    tokenizer = load_tokenizer(root / "merged" / "decoder")
    ids = special_ids(tokenizer)
    reader = open_soft_labels(labels / "val.parquet", compression_rate=2, top_k=hidden.base.top_k,
                              tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                              encoder_fingerprint=encoder_fingerprint(root / "merged"), latent_kind="hidden_state")
    rows = [r for r in read_chunked(root / "chunked" / "val.parquet") if r.num_chunks][:16]
    dataset = LatentDataset(rows, reader, ids, labels / "val.parquet")
    batch = LatentCollator(ids.pad, None)([dataset[index] for index in range(len(dataset))])

    def stop_loss(model_dir) -> float:
        with torch.no_grad():
            return latent_forward(load_pretrained_model(model_dir), batch, 1.0, 1.0, hidden_state=True,
                                  stop_id=ids.think_close, stop_weight=1.0)["stop_loss"].item()

    with_term, without = stop_loss(tmp_path / "latent"), stop_loss(plain)
    assert with_term < 0.9 * without


def test_labels_from_another_run_are_refused(labelled_run, tmp_path):
    root, params, _ = labelled_run
    other_k = deep_merge(params.model_dump(mode="json"), {"base": {"top_k": 3}})
    with pytest.raises(ArtifactError, match=r"train\.parquet.*k=4.*expects k=3"):
        train_latent(parse_params(other_k), root / "merged", root / "chunked", root / "labels", tmp_path / "out",
                     tmp_path / "m.json", tmp_path / "l.csv", scratch_dir=tmp_path / "scratch")
    assert not (tmp_path / "out").exists()


def test_alternating_schedule_cycles_kl_ce_and_both():
    class State:
        global_step = 0

    trainer = LatentTrainer.__new__(LatentTrainer)
    trainer.weights, trainer.schedule, trainer.state = (0.5, 2.0), "alternate", State()
    trainer.model = torch.nn.Linear(1, 1)
    seen = []
    for step in range(4):
        trainer.state.global_step = step
        seen.append(trainer.step_weights())
    assert seen == [(0.0, 2.0), (0.5, 0.0), (0.5, 2.0), (0.0, 2.0)]
    trainer.model.eval()  # validation always scores the full objective
    assert trainer.step_weights() == (0.5, 2.0)
    trainer.schedule = "sum"
    trainer.model.train()
    assert trainer.step_weights() == (0.5, 2.0)
