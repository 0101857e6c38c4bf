"""bench.phase1_collapse's levers beyond params, on the micro run: the ``<|latent|>`` row at the vocabulary's
mean, the untrained encoder adapter, and a run without the encoder-only stage."""

from __future__ import annotations

import pytest
import torch

from bench.phase1_collapse import (
    Phase1Config,
    run_config,
    with_latent_row_at_vocabulary_mean,
    write_untrained_encoder_adapter,
)
from latent_sft_core.modeling import load_pretrained_model, merged
from latent_sft_core.phase1_training import ENCODER
from latent_sft_core.text import load_tokenizer, special_ids

pytestmark = pytest.mark.integration


def test_the_latent_row_becomes_the_mean_of_the_embeddings_and_nothing_else_changes(micro_run, tmp_path):
    root, _, _ = micro_run
    latent = special_ids(load_tokenizer(root / "base")).latent
    before = load_pretrained_model(root / "base").get_input_embeddings().weight
    copy = load_pretrained_model(with_latent_row_at_vocabulary_mean(root / "base", tmp_path / "base"))
    after = copy.get_input_embeddings().weight
    torch.testing.assert_close(after[latent], before.mean(dim=0))
    assert not torch.allclose(before[latent], before.mean(dim=0))  # the row did change
    others = torch.ones(len(before), dtype=torch.bool)
    others[latent] = False
    assert torch.equal(after[others], before[others])
    assert torch.equal(copy.get_output_embeddings().weight, after)  # tied: the LM head's row follows
    assert load_tokenizer(tmp_path / "base").get_vocab() == load_tokenizer(root / "base").get_vocab()


def test_the_untrained_encoder_adapter_leaves_the_base_model_as_it_is(micro_run, tmp_path):
    root, params, _ = micro_run
    write_untrained_encoder_adapter(params, root / "base", tmp_path)
    assert (tmp_path / ENCODER / "adapter_config.json").is_file()
    base = load_pretrained_model(root / "base").state_dict()
    encoder = merged(load_pretrained_model(root / "base"), tmp_path / ENCODER).state_dict()
    assert encoder.keys() == base.keys()
    for name, weight in base.items():
        assert torch.equal(encoder[name], weight), name


def test_without_the_encoder_only_stage_the_decoder_and_joint_trainings_run_from_the_base_encoder(micro_run):
    root, params, _ = micro_run
    stages = run_config(params, Phase1Config(encoder_only_stage=False), root / "base", root / "chunked")
    assert list(stages) == ["train_decoder", "train_joint"]
    for values in stages.values():
        assert values["best_val_loss"] > 0 and values["distinct_top1"] >= 1
        assert 0 <= values["chunk_mass"] <= 1 and isinstance(values["collapsed"], bool)
