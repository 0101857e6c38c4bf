"""bench.phase1_collapse: configurations applied to the params, kept results per (configuration, rows, seed), table."""

import json

import pytest

from bench.phase1_collapse import CONFIGS, configured, kept_results, result_path, slug, table
from latent_sft_core.config import Params

pytestmark = pytest.mark.unit
DEFAULT = "diversity 0.05 in both, encoder lr 1e-3 (the default)"


def test_a_configuration_overrides_the_params_the_encoder_rows_and_the_seed():
    params = configured(Params(), CONFIGS["paper's L_sup, encoder lr 1e-3, T = 4"], encoder_rows=25600, seed=2)
    assert params.latent.temperature == 4.0 and params.train_joint.diversity_weight == 0.0
    assert params.train_encoder.diversity_weight == 0.0
    assert params.train_encoder.max_train_rows == 25600 and params.base.seed == 2
    assert params.train_decoder == Params().train_decoder  # the rest stays the default
    assert configured(Params(), CONFIGS[DEFAULT], 6400, 0) == Params()


def test_kept_results_are_read_per_configuration_and_seed(tmp_path):
    stage = {"best_val_loss": 0.5157, "distinct_top1": 12, "chunk_mass": 0.0057, "mean_entropy": 1.577,
             "collapsed": True}
    for seed in (1, 0):
        path = result_path(DEFAULT, 6400, seed, 2, tmp_path)
        path.write_text(json.dumps({"seed": seed, "torch_threads": 2, "stages": {s: stage for s in ("train_encoder", "train_decoder",
                                                                                "train_joint")}}))
    result_path(DEFAULT, 25600, 3, 1, tmp_path).write_text(json.dumps({"seed": 3, "stages": {}}))  # other rows
    kept = kept_results(6400, tmp_path)
    assert list(kept) == [DEFAULT] and sorted(kept[DEFAULT]) == [(0, "2"), (1, "2")]
    lines = table(kept).splitlines()
    assert len(lines) == 2 + 2 * 2  # two seeds, encoder-only and joint stage each
    assert lines[2] == f"| {DEFAULT} | 0 | 2 | train_encoder | 0.516 | 12 | 0.006 | 1.58 | **yes** |"
    assert lines[3].startswith(f"| {DEFAULT} | 0 | 2 | train_joint |")
    assert slug("paper's L_sup, encoder lr 1e-3") == "paper-s-l-sup-encoder-lr-1e-3"
