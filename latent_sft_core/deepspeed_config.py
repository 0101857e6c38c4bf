"""The DeepSpeed configuration of a training stage, built from params by one pure function.

Values the Hugging Face Trainer also sets (batch size, accumulation, clipping, learning rate, weight decay)
are "auto", so the Trainer fills them from ``train_latent.train`` and the two can never disagree. No
scheduler block: the Trainer's own scheduler (``train.lr_scheduler``) stays in charge (the reference's
DeepSpeed file silently replaced its cosine schedule with WarmupDecayLR). The optimizer is torch's AdamW
(``torch_adam``), so nothing is compiled on CPU machines but DeepSpeed's one communication op.
"""

from __future__ import annotations

from latent_sft_core.config import DeepSpeedParams


def deepspeed_config(params: DeepSpeedParams, bf16: bool = False, hidden_size: int | None = None) -> dict:
    """A DeepSpeed config dict for ``TrainingArguments(deepspeed=...)``; ``bf16``: bf16 mixed precision (the
    stage's ``compute.dtype``). ``hidden_size`` sets the gradient bucket to hidden_size^2 elements, the size the
    Trainer's "auto" picks from a Hugging Face model's config; phase 1's module of two models has no config."""
    zero: dict = {
        "stage": params.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": hidden_size * hidden_size if hidden_size else "auto",
    }
    if params.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if params.zero_stage == 3:
        # without it ZeRO-3 saves placeholder tensors instead of the real weights
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if params.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
        if params.persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = params.persistence_threshold
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto", "torch_adam": True},
        },
    }
    if params.offload_optimizer:
        # DeepSpeed otherwise insists on its own compiled CPU-Adam when the optimizer is offloaded
        config["zero_force_ds_cpu_optimizer"] = False
    return config
