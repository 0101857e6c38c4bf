"""The LM head only where a loss reads it: the losses on PositionLogits equal the losses on dense logits (values and
gradients), and ``logits_only_at`` returns exactly the dense logits' rows of the selected positions."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from latent_sft_core.config import LoraParams
from latent_sft_core.layout import IGNORE_INDEX
from latent_sft_core.losses import (
    PositionLogits,
    causal_lm_loss,
    loss_positions,
    predicting_positions,
    stage2_losses,
    supervision_loss,
    token_nll,
)
from latent_sft_core.masks import Role
from latent_sft_core.modeling import logits_only_at, with_lora
from latent_sft_core.training import CausalLMTrainer, ComponentLoggingTrainer

pytestmark = pytest.mark.unit

P, L, C, A, PAD = Role.PROMPT, Role.LATENT, Role.CHUNK, Role.ANSWER, Role.PAD
# stage-2 layout: prompt, <think>, 2 latents, </think>, answer, end, then padding
ROLES = torch.tensor([[P, P, P, A, L, L, A, A, A, PAD], [P, P, A, L, A, A, A, PAD, PAD, PAD]])
LABELS = torch.tensor([[-100, -100, -100, -100, -100, -100, 7, 8, 1, -100],
                       [-100, -100, -100, -100, 7, 9, 1, -100, -100, -100]])


def selected(logits: torch.Tensor, positions: torch.Tensor) -> PositionLogits:
    return PositionLogits(logits[positions], positions)


def test_loss_positions_are_those_before_labels_and_latents():
    expected = torch.zeros_like(LABELS, dtype=torch.bool)
    expected[0, [3, 4, 5, 6, 7]] = True  # before the two latents (3, 4) and before labels 6..8 (5, 6, 7)
    expected[1, [2, 3, 4, 5]] = True  # before the latent (2) and before labels 4..6 (3, 4, 5)
    assert torch.equal(loss_positions(LABELS, ROLES), expected)
    assert torch.equal(loss_positions(LABELS), predicting_positions(LABELS != IGNORE_INDEX))


def test_losses_on_selected_positions_equal_the_dense_losses_and_gradients():
    torch.manual_seed(0)
    dense = torch.randn(2, 10, 12, requires_grad=True)
    teacher_ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    teacher_probs = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    positions = loss_positions(LABELS, ROLES)
    assert positions.sum() < positions.numel() / 2  # the point: far fewer rows than [B, T]
    pairs = [
        (token_nll(dense, LABELS), token_nll(selected(dense, positions), LABELS)),
        (causal_lm_loss(dense, LABELS), causal_lm_loss(selected(dense, positions), LABELS)),
        (supervision_loss(dense, LABELS, ROLES)["loss"], supervision_loss(selected(dense, positions), LABELS, ROLES)["loss"]),
    ]
    full = stage2_losses(dense, LABELS, ROLES, teacher_ids, teacher_probs, 1.0, 2.0, temperature=2.0)
    part = stage2_losses(selected(dense, positions), LABELS, ROLES, teacher_ids, teacher_probs, 1.0, 2.0, temperature=2.0)
    pairs += [(full[key], part[key]) for key in ("loss", "ce_loss", "kl_loss")]
    for reference, candidate in pairs:
        assert torch.equal(reference, candidate)
    gradient = torch.autograd.grad(full["loss"], dense)[0]
    assert torch.equal(torch.autograd.grad(part["loss"], dense)[0], gradient)
    assert gradient[~positions].abs().sum() == 0 and gradient[positions].abs().sum() > 0


def test_logits_asked_for_where_the_head_did_not_run_are_an_error():
    positions = torch.zeros(2, 10, dtype=torch.bool)
    positions[0, 6] = True
    with pytest.raises(ValueError, match="where the LM head did not run"):
        token_nll(PositionLogits(torch.zeros(1, 12), positions), LABELS)


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_logits_only_at_returns_the_dense_rows_of_the_selected_positions(tied):
    model = tiny_llama(tied)
    input_ids = torch.randint(0, 40, (2, 10))
    positions = loss_positions(LABELS, ROLES)
    dense = model(input_ids=input_ids).logits
    with logits_only_at(model, positions):
        part = model(input_ids=input_ids).logits
    assert part.shape == (int(positions.sum()), 40)
    torch.testing.assert_close(part, dense[positions], rtol=0, atol=1e-6)
    assert model(input_ids=input_ids).logits.shape == (2, 10, 40)  # the hook is gone after the block
    adapted = with_lora(model, LoraParams(rank=2, alpha=4, targets=("q_proj",)), 0)
    with logits_only_at(adapted, positions):
        assert adapted(input_ids=input_ids).logits.shape == (int(positions.sum()), 40)


def test_our_trainers_have_the_trainer_divide_by_the_accumulation_steps():
    """A Hugging Face model's forward takes **kwargs, which tells the Trainer the model sums its loss over the
    accumulated micro-batches itself; ours are per-micro-batch means, so the Trainer must divide."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", gradient_accumulation_steps=4)
    for trainer_cls in (ComponentLoggingTrainer, CausalLMTrainer):
        trainer = trainer_cls(model=tiny_llama(True), args=args)
        assert trainer.model_accepts_loss_kwargs is False
