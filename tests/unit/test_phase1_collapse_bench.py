"""bench.phase1_collapse: configurations applied to the params, kept results per (configuration, rows, seed), table."""

import json
from dataclasses import asdict

import pytest

from bench.phase1_collapse import CONFIGS, base_model_digest, configured, kept_results, result_path, slug, table
from latent_sft_core.config import Params

pytestmark = pytest.mark.unit
DEFAULT = "chunk anchor 0.1 and diversity 0.05 in both (the default)"


def test_a_configuration_overrides_the_params_the_encoder_rows_and_the_seed():
    params = configured(Params(), CONFIGS["paper's L_sup, encoder lr 1e-3, T = 4"].overrides, encoder_rows=25600,
                        seed=2)
    assert params.latent.temperature == 4.0 and params.train_joint.diversity_weight == 0.0
    assert params.train_encoder.diversity_weight == params.train_encoder.chunk_anchor_weight == 0.0
    assert params.train_joint.chunk_anchor_weight == 0.0
    assert params.train_encoder.max_train_rows == 25600 and params.base.seed == 2
    assert params.train_decoder == Params().train_decoder  # the rest stays the default
    assert configured(Params(), CONFIGS[DEFAULT].overrides, 6400, 0) == Params()
    anchored = configured(Params(), CONFIGS["chunk anchor 0.1 in both, no diversity"].overrides, 6400, 0)
    assert (anchored.train_encoder.chunk_anchor_weight, anchored.train_joint.chunk_anchor_weight) == (0.1, 0.1)
    assert (anchored.train_encoder.diversity_weight, anchored.train_joint.diversity_weight) == (0.0, 0.0)
    diverse = configured(Params(), CONFIGS["diversity 0.05 in both, encoder lr 1e-3"].overrides, 6400, 0)
    assert (diverse.train_encoder.chunk_anchor_weight, diverse.train_joint.diversity_weight) == (0.0, 0.05)


def test_the_levers_beyond_params_start_from_the_paper_s_loss_and_change_one_thing_each():
    paper = configured(Params(), CONFIGS["paper's L_sup, encoder lr 1e-3"].overrides, 6400, 0)
    full = configured(Params(), CONFIGS["paper's L_sup, full-vocabulary alpha"].overrides, 6400, 0)
    assert full.latent.full_vocab and not paper.latent.full_vocab
    assert full.model_copy(update={"latent": paper.latent}) == paper
    row, dropped = CONFIGS["paper's L_sup, <|latent|> row = vocabulary mean"], CONFIGS["paper's L_sup, no encoder-only stage"]
    assert (row.latent_row, row.encoder_only_stage) == ("vocabulary_mean", True)
    assert (dropped.latent_row, dropped.encoder_only_stage) == ("trained", False)
    assert row.overrides == dropped.overrides == CONFIGS["paper's L_sup, encoder lr 1e-3"].overrides
    assert asdict(CONFIGS[DEFAULT]) == {"overrides": {}, "latent_row": "trained", "encoder_only_stage": True}


def test_kept_results_are_read_per_configuration_and_seed(tmp_path):
    stage = {"best_val_loss": 0.5157, "distinct_top1": 12, "chunk_mass": 0.0057, "mean_entropy": 1.577,
             "collapsed": True}
    stages = {s: stage for s in ("train_encoder", "train_decoder", "train_joint")}
    for seed in (1, 0):
        path = result_path(DEFAULT, 6400, seed, 2, "0badcafe", tmp_path)
        path.write_text(json.dumps({"seed": seed, "torch_threads": 2, "base_model": "0badcafe", "stages": stages}))
    # the same seed on another base model is another run; a run of before the base was recorded shows "–"
    result_path(DEFAULT, 6400, 0, 2, "12345678", tmp_path).write_text(
        json.dumps({"seed": 0, "torch_threads": 2, "base_model": "12345678", "stages": stages}))
    (tmp_path / f"{slug(DEFAULT)}-rows6400-seed0-threads1.json").write_text(
        json.dumps({"seed": 0, "torch_threads": 1, "stages": stages}))
    result_path(DEFAULT, 25600, 3, 1, "0badcafe", tmp_path).write_text(json.dumps({"seed": 3, "stages": {}}))
    kept = kept_results(6400, tmp_path)
    assert list(kept) == [DEFAULT]
    assert sorted(kept[DEFAULT]) == [("0badcafe", 0, "2"), ("0badcafe", 1, "2"), ("12345678", 0, "2"), ("–", 0, "1")]
    lines = table(kept).splitlines()
    assert len(lines) == 2 + 4 * 2  # four runs, encoder-only and joint stage each
    dropped = {"train_decoder": stage, "train_joint": stage}  # a run without the encoder-only stage
    assert len(table({DEFAULT: {("0badcafe", 0, "2"): dropped}}).splitlines()) == 2 + 1
    assert lines[2] == f"| {DEFAULT} | 0badcafe | 0 | 2 | train_encoder | 0.516 | 12 | 0.006 | 1.58 | **yes** |"
    assert lines[3].startswith(f"| {DEFAULT} | 0badcafe | 0 | 2 | train_joint |")
    assert lines[-1].startswith(f"| {DEFAULT} | – | 0 | 1 | train_joint |")


def test_the_base_model_is_named_by_its_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = base_model_digest(tmp_path)
    assert len(first) == 8 and int(first, 16) >= 0
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert base_model_digest(tmp_path) != first
    assert slug("paper's L_sup, encoder lr 1e-3") == "paper-s-l-sup-encoder-lr-1e-3"
