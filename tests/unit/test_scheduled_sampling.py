"""Scheduled sampling in stage 2 (ours): slot inputs mixed from teacher and student with a known probability."""

import pytest
import torch

from latent_sft_core.config import TinyModelParams
from latent_sft_core.inference import LatentMode
from latent_sft_core.layout import stage2_sequence
from latent_sft_core.losses import predicting_positions, stage2_losses
from latent_sft_core.masks import Role
from latent_sft_core.modeling import build_tiny_model
from latent_sft_core.phase2_training import (
    LatentCollator,
    LatentExample,
    LatentTrainer,
    latent_forward,
    scheduled_inputs,
)
from latent_sft_core.soft_embedding import SparseAlpha, alpha_from_logits, mix_embeddings
from tests.support import SPECIAL_IDS, chunked_row

pytestmark = pytest.mark.unit
VOCAB = 40


def test_scheduled_inputs_take_the_student_with_the_given_probability():
    teacher, student = torch.zeros(20000, 3), torch.ones(20000, 3)
    inputs, replaced = scheduled_inputs(teacher, student, 0.0)
    assert torch.equal(inputs, teacher) and not replaced.any()
    inputs, replaced = scheduled_inputs(teacher, student, 1.0)
    assert torch.equal(inputs, student) and replaced.all()
    inputs, replaced = scheduled_inputs(teacher, student, 0.3, torch.Generator().manual_seed(0))
    assert replaced.float().mean().item() == pytest.approx(0.3, abs=0.015)  # 6 standard errors
    # each slot is wholly one or the other, as the mask says
    assert torch.equal(inputs[replaced], student[replaced]) and torch.equal(inputs[~replaced], teacher[~replaced])
    again, _ = scheduled_inputs(teacher, student, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again, inputs)


@pytest.fixture(scope="module")
def model():
    tiny = TinyModelParams(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return build_tiny_model(tiny, VOCAB, SPECIAL_IDS, seed=7).to(torch.float64).train()


def batch():
    rows = [chunked_row([5, 6, 7, 8, 9], row_id="a"), chunked_row([11, 12, 13], row_id="b")]
    generator = torch.Generator().manual_seed(2)
    examples = []
    for row in rows:
        n = row.num_chunks
        ids = torch.stack([torch.randperm(VOCAB - 5, generator=generator)[:3] + 5 for _ in range(n)])
        probs = torch.softmax(torch.randn(n, 3, generator=generator, dtype=torch.float64), -1)
        examples.append(LatentExample(stage2_sequence(row, SPECIAL_IDS), ids, probs))
    return LatentCollator(SPECIAL_IDS.pad)(examples)


def test_all_student_inputs_equal_feeding_the_students_own_latents_by_hand(model):
    inputs = batch()
    mode = LatentMode(top_k=4, temperature=2.0)
    with torch.no_grad():
        sampled = latent_forward(model, inputs, 1.0, 1.0, student_probability=1.0, student=mode)
        # by hand: the teacher-forced pass, the student's alpha before each slot, fed at the slots
        embedding = model.get_input_embeddings()
        slots = inputs["roles"] == Role.LATENT
        embeds = embedding(inputs["input_ids"])
        embeds[slots] = mix_embeddings(SparseAlpha(inputs["teacher_ids"], inputs["teacher_probs"]), embedding)
        logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        own = mix_embeddings(alpha_from_logits(logits[predicting_positions(slots)], 4, 2.0), embedding)
        embeds[slots] = own
        fed = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        expected = stage2_losses(fed, inputs["labels"], inputs["roles"], inputs["teacher_ids"],
                                 inputs["teacher_probs"], 1.0, 1.0, temperature=2.0)
        teacher_forced = latent_forward(model, inputs, 1.0, 1.0, student=mode)
    for name in ("loss", "ce_loss", "kl_loss"):
        torch.testing.assert_close(sampled[name], expected[name])
    assert not torch.allclose(sampled["kl_loss"], teacher_forced["kl_loss"])  # the inputs really changed
    # probability 0 is plain teacher forcing
    with torch.no_grad():
        zero = latent_forward(model, inputs, 1.0, 1.0, student_probability=0.0, student=mode)
    torch.testing.assert_close(zero["loss"], teacher_forced["loss"])


def test_the_probability_rises_linearly_and_validation_is_teacher_forced():
    class State:
        global_step = 0
        max_steps = 200

    trainer = LatentTrainer.__new__(LatentTrainer)
    trainer.state, trainer.max_student_probability = State(), 0.5
    trainer.model = torch.nn.Linear(1, 1)
    seen = []
    for step in (0, 50, 100, 200):
        trainer.state.global_step = step
        seen.append(trainer.student_probability())
    assert seen == [0.0, 0.125, 0.25, 0.5]
    trainer.model.eval()
    assert trainer.student_probability() == 0.0
    trainer.model.train()
    trainer.max_student_probability = 0.0
    assert trainer.student_probability() == 0.0
