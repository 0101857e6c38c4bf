"""ECR@K, N_eff, Top-2 and the teacher-path split of the evaluation on hand-computed cases."""

import math

import pytest
import torch

from latent_sft_core.analysis import chain_chunks, ecr_at_k, path_posterior
from latent_sft_core.evaluation import stop_rate, teacher_path_metrics
from latent_sft_core.inference import Decoded, LatentStep
from latent_sft_core.soft_embedding import SparseAlpha

pytestmark = pytest.mark.unit


def step(distribution: dict[int, float]) -> LatentStep:
    ordered = sorted(distribution.items(), key=lambda item: -item[1])
    return LatentStep(tuple(i for i, _ in ordered), tuple(p for _, p in ordered))


def test_chain_chunks_follow_training_chunks():
    assert chain_chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert chain_chunks([], 3) == []


def test_ecr_at_k_counts_chunk_tokens_in_the_top_k():
    steps = [step({7: 0.5, 8: 0.3, 9: 0.2}), step({1: 0.6, 3: 0.3, 4: 0.1})]
    chunks = [[7, 9], [3, 4], [5, 6]]  # a third chunk the model never reached
    # K=1: step 1 holds {7} -> 1 token; step 2 holds {1} -> 0 tokens; (1 + 0) / 2 steps
    assert ecr_at_k(steps, chunks, 1) == 0.5
    # K=2: {7, 8} -> 1; {1, 3} -> 1
    assert ecr_at_k(steps, chunks, 2) == 1.0
    # K=3: {7, 8, 9} -> 2; {1, 3, 4} -> 2: the maximum, c = 2
    assert ecr_at_k(steps, chunks, 3) == 2.0


def test_ecr_at_k_counts_positions_and_divides_by_every_step():
    steps = [step({5: 1.0}), step({6: 1.0}), step({6: 1.0})]
    # a repeated token counts at each position; the third step has no chunk and carries nothing
    assert ecr_at_k(steps, [[5, 5], [6, 2]], 1) == pytest.approx((2 + 1 + 0) / 3)
    assert ecr_at_k([], [[5, 5]], 1) is None
    with pytest.raises(ValueError):
        ecr_at_k(steps, [[5]], 0)


def test_explicit_steps_carry_one_token_each():
    chain = [3, 1, 4, 1]
    one_hot = [step({token: 1.0}) for token in chain]
    assert ecr_at_k(one_hot, chain_chunks(chain, 1), 5) == 1.0


def test_path_posterior_hand_computed():
    # two steps, c = 2; chain A = [1 2 | 3 4], chain B = [5 6 | 3 4]
    steps = [step({1: 0.4, 5: 0.1, 9: 0.5}), step({3: 0.3, 4: 0.2, 8: 0.5})]
    result = path_posterior(steps, [[1, 2, 3, 4], [5, 6, 3, 4]], 2)
    score_a = (math.log(0.4 + 1e-12) + math.log(0.5 + 1e-12)) / 2
    score_b = (math.log(0.1 + 1e-12) + math.log(0.5 + 1e-12)) / 2
    p_a = math.exp(score_a) / (math.exp(score_a) + math.exp(score_b))  # = 2/3 exactly: sqrt(0.2) / (sqrt(0.2)+sqrt(0.05))
    assert p_a == pytest.approx(2 / 3)
    assert result.posterior == pytest.approx((p_a, 1 - p_a))
    entropy = -(p_a * math.log(p_a) + (1 - p_a) * math.log(1 - p_a))
    assert result.n_eff == pytest.approx(math.exp(entropy))
    assert result.top2 == pytest.approx(0.5)


def test_path_posterior_extremes():
    steps = [step({1: 0.5, 5: 0.5})]
    tied = path_posterior(steps, [[1, 2], [5, 6], [1, 2]], 2)  # the duplicate chain counts once
    assert tied.posterior == pytest.approx((0.5, 0.5)) and tied.n_eff == pytest.approx(2.0) and tied.top2 == 1.0
    one_sided = path_posterior([step({1: 1.0})], [[1, 2], [5, 6]], 2)
    assert one_sided.n_eff == pytest.approx(1.0) and one_sided.top2 == pytest.approx(0.0, abs=1e-9)
    assert path_posterior(steps, [[1, 2], [1, 2]], 2) is None  # one distinct chain
    assert path_posterior([], [[1, 2], [5, 6]], 2) is None  # no latent step
    with_empty = path_posterior(steps, [[1, 2], []], 2)  # an empty chain explains nothing
    assert with_empty.posterior[0] == pytest.approx(1.0)


def test_teacher_path_splits_questions_by_their_free_running_latents():
    def question(*agrees):
        steps = tuple(LatentStep(ids=(5,), probs=(1.0,), teacher_kl=None if a is None else 0.1, teacher_agrees=a)
                      for a in agrees)
        return Decoded(reasoning_ids=[5] * len(steps), answer_ids=[7], closed=True, latent_steps=steps)

    def teacher(latents):
        return SparseAlpha(torch.zeros(latents, 2, dtype=torch.long), torch.full((latents, 2), 0.5))

    decoded = [
        question(True, True),  # on the path
        question(True, False),  # leaves it at the second latent
        question(True),  # one latent short
        question(True, True, None),  # one latent more than the teacher
        question(True, True),  # on the path
    ]
    metrics = teacher_path_metrics(decoded, [teacher(2)] * 5, [True, False, True, False, False])
    assert metrics == {"free_running_on_teacher_path": 0.4, "free_running_pass@1_on_teacher_path": 0.5,
                       "free_running_pass@1_off_teacher_path": pytest.approx(1 / 3, abs=1e-4)}
    on_only = teacher_path_metrics(decoded[:1], [teacher(2)], [True])
    assert on_only["free_running_pass@1_off_teacher_path"] is None and on_only["free_running_on_teacher_path"] == 1.0
    with pytest.raises(ValueError):
        teacher_path_metrics(decoded, [teacher(2)] * 4, [True] * 5)


def test_stop_rate_counts_the_latent_steps_whose_greedy_token_is_the_stop_token():
    def question(greedy, explicit=()):
        steps = tuple(LatentStep(ids=(token,), probs=(1.0,)) for token in greedy)
        return Decoded(reasoning_ids=[*greedy, *explicit], answer_ids=[7], closed=True, latent_steps=steps)

    # stop id 9: steps 9, 3 | 9, 9, 4 | none; the explicit tokens after the latents (9 here) are not steps
    decoded = [question([9, 3]), question([9, 9, 4], explicit=[9, 9]), question([])]
    assert stop_rate(decoded, stop_id=9) == pytest.approx(3 / 5)
    assert stop_rate(decoded, stop_id=4) == pytest.approx(1 / 5)
    assert stop_rate([question([])], stop_id=9) == 0.0
