"""Phase 1 on the micro configuration: what trains, losses, best-on-validation, merge, resume, ablations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from latent_sft_core.chunking import read_chunked
from latent_sft_core.config import LatentParams
from latent_sft_core.errors import ArtifactError
from latent_sft_core.latent_health import measure_encoder_health
from latent_sft_core.losses import alpha_marginal_entropy, chunk_anchor_loss
from latent_sft_core.masks import Role
from latent_sft_core.modeling import load_pretrained_model, merged
from latent_sft_core.phase1_model import (
    Stage1Collator,
    Stage1Model,
    backbone,
    embed_with_latents,
    encode_latents,
    stage1_example,
    vocabulary_weights,
)
from latent_sft_core.phase1_training import DECODER, ENCODER, HEALTH_TRACE_KEYS, Stage1Inputs, stage1_models
from latent_sft_core.text import load_tokenizer, special_ids
from latent_sft_core.training import SequenceDataset, TrainableStateTrainer, run_training
from tests.support import STAGE1_STAGES as STAGES
from tests.support import stage1_inputs as inputs_for

pytestmark = pytest.mark.integration


def batch_of(root, params, rows=4):
    tokenizer = load_tokenizer(root / "base")
    chunked = read_chunked(root / "chunked" / "train.parquet", params.base.compression_rate)
    with_latents = [row for row in chunked if row.num_chunks >= 2][:rows]
    return Stage1Collator(special_ids(tokenizer).pad)([stage1_example(r, special_ids(tokenizer)) for r in with_latents])


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_writes_its_adapters_and_its_loss_goes_down(phase1_run, stage):
    root, params, metrics = phase1_run
    expected = {"train_encoder": {ENCODER}, "train_decoder": {DECODER}, "train_joint": {ENCODER, DECODER}}[stage]
    assert {p.name for p in (root / stage).iterdir()} == expected
    for name in expected:
        assert (root / stage / name / "adapter_model.safetensors").is_file()
    lines = (root / "plots" / f"{stage}.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:2] == ["step", "loss"] and {"chunk_loss", "answer_loss"} <= set(header)
    losses = [float(line.split(",")[1]) for line in lines[1:]]
    assert losses[-1] < losses[0], f"{stage}: {losses}"
    stage_metrics = metrics[stage]
    assert json.loads((root / "metrics" / f"{stage}.json").read_text()) == stage_metrics
    assert stage_metrics["steps"] == 12
    val = {int(step): loss for step, loss in stage_metrics["val_loss_by_step"].items()}
    assert set(val) == {6, 12}
    assert stage_metrics["best_val_loss"] == min(val.values())
    assert stage_metrics["best_step"] == min(val, key=val.get)
    assert not (root / "scratch" / stage).exists()
    # the collapse guard's statistics of the best checkpoint's latents on the validation rows
    health = stage_metrics["latent_health"]
    latents = sum(row.num_chunks for row in read_chunked(root / "chunked" / "val.parquet"))
    assert health["latents"] == latents
    assert 0 < health["distinct_top1"] <= health["distinct_chunk_tokens"]
    assert 0 <= health["mean_entropy"] <= math.log(params.base.top_k) + 1e-6
    assert 0 <= health["mass_outside_top1"] < 1 and 0 <= health["chunk_mass"] <= 1
    assert 0 <= health[f"chunk_ecr@{params.base.top_k}"] <= params.base.compression_rate
    assert isinstance(health["collapsed"], bool)
    # the trace: alpha's health at every validation, the best step's equal to the best checkpoint's
    by_step = stage_metrics["latent_health_by_step"]
    assert set(by_step) == set(stage_metrics["val_loss_by_step"])
    assert by_step[str(stage_metrics["best_step"])] == {key: health[key] for key in HEALTH_TRACE_KEYS}
    # measured again from the adapters on disk: the statistics are the saved (best) checkpoint's
    encoder, decoder = (saved_stage_model(root, stage, name) for name in (ENCODER, DECODER))
    val_rows = read_chunked(root / "chunked" / "val.parquet", params.base.compression_rate)
    again = measure_encoder_health(encoder, decoder, params, val_rows, special_ids(load_tokenizer(root / "base")), 16)
    assert {key: again[key] for key in ("latents", "distinct_top1", "distinct_chunk_tokens", "collapsed")} == {
        key: health[key] for key in ("latents", "distinct_top1", "distinct_chunk_tokens", "collapsed")}
    for key in ("mean_entropy", "mass_outside_top1", "chunk_mass"):
        assert again[key] == pytest.approx(health[key], abs=2e-4), key


SAVED_ADAPTERS = {  # (stage, model) -> the stage folders whose adapters make that model at the stage's end
    ("train_encoder", ENCODER): ("train_encoder",), ("train_encoder", DECODER): (),
    ("train_decoder", ENCODER): ("train_encoder",), ("train_decoder", DECODER): ("train_decoder",),
    ("train_joint", ENCODER): ("train_encoder", "train_joint"), ("train_joint", DECODER): ("train_decoder", "train_joint"),
}


def saved_stage_model(root, stage, name):
    model = load_pretrained_model(root / "base")
    for stage_dir in SAVED_ADAPTERS[stage, name]:
        model = merged(model, root / stage_dir / name)
    return model.eval()


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_reaches_only_what_the_stage_trains(phase1_run, stage, tmp_path):
    root, params, _ = phase1_run
    encoder, decoder = stage1_models(params, stage, inputs_for(root, stage))
    model = Stage1Model(encoder, decoder, params.latent, params.base.top_k)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trains = {"train_encoder": ("encoder.",), "train_decoder": ("decoder.",), "train_joint": ("encoder.", "decoder.")}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and name.startswith(trains[stage]) for name in trainable)

    batch = batch_of(root, params)
    model(**batch)["loss"].backward()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name
    # the decoder's loss reaches the encoder through the soft embeddings Z
    if "encoder." in trains[stage]:
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("encoder.") and n in trainable)
    model.zero_grad()

    tokenizer = load_tokenizer(root / "base")
    train = params.train_encoder.train.model_copy(update={"max_steps": 2, "save_steps": 100, "logging_steps": 1})
    examples = [stage1_example(r, special_ids(tokenizer))
                for r in read_chunked(root / "chunked" / "train.parquet")[:32]]
    run_training(model, SequenceDataset(examples), Stage1Collator(special_ids(tokenizer).pad), train,
                 tmp_path / "scratch", 0, "gradient-test", trainer_cls=TrainableStateTrainer)
    for name, parameter in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(parameter.detach(), before[name]), f"frozen weight {name} changed"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in trainable)


def test_merged_checkpoints_load_with_plain_transformers_and_match_base_plus_adapters(phase1_run):
    root, params, _ = phase1_run
    ids = torch.tensor([[5, 9, 13, 7, special_ids(load_tokenizer(root / "base")).think_close]])
    for name, stage_dir in ((DECODER, "train_decoder"), (ENCODER, "train_encoder")):
        plain = AutoModelForCausalLM.from_pretrained(str(root / "merged" / name))
        assert not list((root / "merged" / name).glob("adapter_*"))
        with_adapter = PeftModel.from_pretrained(
            merged(load_pretrained_model(root / "base"), root / stage_dir / name), str(root / "train_joint" / name)
        )
        with torch.no_grad():
            if name == DECODER:
                torch.testing.assert_close(plain(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=1e-4)
            else:
                torch.testing.assert_close(backbone(plain)(ids).last_hidden_state,
                                           backbone(with_adapter)(ids).last_hidden_state, atol=1e-5, rtol=1e-4)
        # the adapters changed something: the merged model is not the base model
        base = load_pretrained_model(root / "base")
        with torch.no_grad():
            assert not torch.allclose(backbone(plain)(ids).last_hidden_state, backbone(base)(ids).last_hidden_state)


def test_latent_slots_receive_the_encoder_latents_in_order(micro_run):
    root, params, _ = micro_run
    batch = batch_of(root, params, rows=3)
    base = load_pretrained_model(root / "base")
    for latent in (LatentParams(), LatentParams(kind="hidden_state"), LatentParams(full_vocab=True)):
        encoded = encode_latents(base, base, latent, params.base.top_k, batch["encoder_input_ids"],
                                 batch["encoder_roles"])
        count = int((batch["encoder_roles"] == Role.LATENT).sum())
        assert encoded.inputs.shape == (count, base.config.hidden_size)
        embeds = embed_with_latents(base, batch["input_ids"], batch["roles"], encoded.inputs)
        torch.testing.assert_close(embeds[batch["roles"] == Role.LATENT], encoded.inputs)
        text = batch["roles"] != Role.LATENT
        torch.testing.assert_close(embeds[text], base.get_input_embeddings()(batch["input_ids"])[text])
        if latent.kind == "hidden_state":
            assert encoded.alpha is None and torch.equal(encoded.inputs, encoded.hidden)
        else:
            k = base.config.vocab_size if latent.full_vocab else params.base.top_k
            assert encoded.alpha.probs.shape == (count, k)
            torch.testing.assert_close(encoded.alpha.probs.sum(-1), torch.ones(count))
        loss = Stage1Model(base, base, latent, params.base.top_k)(**batch)["loss"]
        assert torch.isfinite(loss)


def test_the_vocabulary_weights_phase1_reads_outside_their_modules(micro_run):
    root, params, _ = micro_run
    tied = load_pretrained_model(root / "base")
    embeddings = tied.get_input_embeddings().weight
    for projection in ("input_embeddings", "lm_head"):  # one matrix when tied, whatever the projection
        assert vocabulary_weights(tied, LatentParams(projection=projection)) == [embeddings]
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, tie_word_embeddings=False))
    weights = vocabulary_weights(untied, LatentParams(projection="lm_head"))
    assert [w is m for w, m in zip(weights, (untied.get_input_embeddings().weight, untied.lm_head.weight))] == [True] * 2
    assert len(vocabulary_weights(untied, LatentParams(projection="input_embeddings"))) == 1


def test_diversity_and_chunk_anchor_terms_are_added_in_training_only(micro_run):
    """Ours: training loss = L_sup - w_d * H(batch-mean alpha) + w_a * mean -log P(own chunk); validation
    (checkpoint choice) is L_sup alone."""
    root, params, _ = micro_run
    batch = batch_of(root, params, rows=3)
    base = load_pretrained_model(root / "base")
    plain = Stage1Model(base, base, params.latent, params.base.top_k)
    both = Stage1Model(base, base, params.latent, params.base.top_k, diversity_weight=0.5, chunk_anchor_weight=0.25)
    with torch.no_grad():
        sup = plain(**batch)
        trained = both(**batch)
        encoded = encode_latents(base, base, params.latent, params.base.top_k, batch["encoder_input_ids"],
                                 batch["encoder_roles"])
        entropy = alpha_marginal_entropy(encoded.alpha, base.config.vocab_size)
        anchor = chunk_anchor_loss(encoded.logits, batch["encoder_input_ids"], batch["encoder_roles"])
        both.eval()
        validated = both(**batch)
    assert float(entropy) > 0 and float(anchor) > 0
    assert encoded.logits.shape == (encoded.alpha.probs.shape[0], base.config.vocab_size)
    torch.testing.assert_close(trained["diversity_loss"], -entropy)
    torch.testing.assert_close(trained["chunk_anchor_loss"], anchor)
    torch.testing.assert_close(trained["loss"], sup["loss"] - 0.5 * entropy + 0.25 * anchor)
    torch.testing.assert_close(validated["loss"], sup["loss"])
    assert not {"diversity_loss", "chunk_anchor_loss"} & (set(validated) | set(sup))


def test_latent_count_mismatch_is_refused(micro_run):
    root, params, _ = micro_run
    batch = batch_of(root, params, rows=2)
    base = load_pretrained_model(root / "base")
    with pytest.raises(ValueError, match="latent slots"):
        embed_with_latents(base, batch["input_ids"], batch["roles"], torch.zeros(1, base.config.hidden_size))


def test_missing_adapter_is_a_clear_error(micro_run, tmp_path):
    root, params, _ = micro_run
    inputs = Stage1Inputs(root / "base", root / "chunked", encoder_stage_dir=tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="no peft adapter here"):
        stage1_models(params, "train_decoder", inputs)
