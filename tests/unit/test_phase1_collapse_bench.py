"""bench.phase1_collapse: configurations applied to the params, and its table."""

import pytest

from bench.phase1_collapse import CONFIGS, configured, slug, table
from latent_sft_core.config import Params

pytestmark = pytest.mark.unit


def test_a_configuration_overrides_the_params_and_the_encoder_rows():
    params = configured(Params(), CONFIGS["encoder lr 1e-3, T = 4"], encoder_rows=25600)
    assert params.train_encoder.train.lr == 1e-3 and params.latent.temperature == 4.0
    assert params.train_encoder.max_train_rows == 25600
    assert params.train_joint == Params().train_joint  # the rest stays the default
    assert configured(Params(), CONFIGS["encoder lr 1e-4, T = 1 (the default)"], 6400) == Params()


def test_table_rows_and_slugs():
    stage = {"best_val_loss": 0.5157, "distinct_top1": 12, "chunk_mass": 0.0057, "mean_entropy": 1.577,
             "collapsed": True}
    lines = table({"cfg": {"train_joint": stage}}).splitlines()
    assert lines[2] == "| cfg | train_joint | 0.516 | 12 | 0.006 | 1.58 | **yes** |"
    assert slug("encoder lr 1e-3, T = 1 (the former default)") == "encoder-lr-1e-3-t-1-the-former-default"
