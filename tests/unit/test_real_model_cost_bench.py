import pytest

from bench.real_model_cost import TRAINING, measured_params, schedule_steps
from latent_sft_core.config import Params, parse_params

pytestmark = pytest.mark.unit


def test_the_measured_run_is_the_cpu_preset_cut_to_a_few_steps():
    params = parse_params(measured_params(batch_size=4, steps=3, eval_rows=2))
    assert params.base.model.source == "gguf" and params.base.model.gguf_file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    for stage in TRAINING:
        train = getattr(params, stage).train
        assert (train.max_steps, train.batch_size, train.save_steps) == (3, 4, 3)
    assert params.prepare_data.synthetic.train_size == 48 and params.evaluate.max_rows == 2


def test_schedule_steps_follow_max_steps_or_epochs_over_the_rows_each_training_reads():
    params = Params()  # the embedded default: epochs, batch 64, phase 1 on its first 6,400 / 12,800 rows
    steps = schedule_steps(params, {"train": 75_000})
    assert steps["base_model"] == 1172  # ceil(75,000 / 64), one epoch
    assert steps["train_encoder"] == steps["train_decoder"] == 100  # 6,400 rows
    assert steps["train_joint"] == 200  # 12,800 rows
    assert steps["train_latent"] == 8 * 400  # 25,600 rows, 8 epochs
    capped = Params.model_validate({"base_model": {"train": {"max_steps": 60}}})
    assert schedule_steps(capped, {"train": 75_000})["base_model"] == 60
