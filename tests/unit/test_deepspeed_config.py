import pytest

from latent_sft_core.config import DeepSpeedParams, ParamsError, parse_params
from latent_sft_core.deepspeed_config import deepspeed_config

pytestmark = pytest.mark.unit


def test_default_is_zero2_with_torch_adamw_and_trainer_owned_values():
    config = deepspeed_config(DeepSpeedParams())
    assert config["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in config["zero_optimization"]
    assert "stage3_gather_16bit_weights_on_model_save" not in config["zero_optimization"]
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto", "torch_adam": True},
    }
    assert "scheduler" not in config  # the Trainer's scheduler stays in charge
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert "zero_force_ds_cpu_optimizer" not in config


def test_zero3_gathers_weights_on_save_and_offloads_on_request():
    config = deepspeed_config(DeepSpeedParams(zero_stage=3, offload_optimizer=True, offload_params=True), bf16=True)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert config["bf16"] == {"enabled": True}
    assert "stage3_param_persistence_threshold" not in zero  # DeepSpeed's default


def test_persistence_threshold_reaches_the_zero3_config():
    zero = deepspeed_config(DeepSpeedParams(zero_stage=3, persistence_threshold=0))["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0


def test_zero3_options_need_zero3():
    with pytest.raises(ParamsError, match="offload_params needs zero_stage 3"):
        parse_params({"train_latent": {"deepspeed": {"offload_params": True}}})
    with pytest.raises(ParamsError, match="persistence_threshold needs zero_stage 3"):
        parse_params({"train_latent": {"deepspeed": {"persistence_threshold": 0}}})  # 0 is a value, not "unset"
    with pytest.raises(ParamsError, match="zero_stage"):
        parse_params({"train_latent": {"deepspeed": {"zero_stage": 1}}})


def test_gradient_bucket_from_the_hidden_size_when_the_module_has_no_config():
    assert deepspeed_config(DeepSpeedParams())["zero_optimization"]["reduce_bucket_size"] == "auto"
    # phase 1's module (encoder + decoder) has no config for the Trainer to fill "auto" from
    assert deepspeed_config(DeepSpeedParams(), hidden_size=64)["zero_optimization"]["reduce_bucket_size"] == 64 * 64
