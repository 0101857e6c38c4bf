import math

import pytest
import torch

from latent_sft_core.layout import IGNORE_INDEX
from latent_sft_core.losses import (
    alpha_marginal_entropy,
    chunk_anchor_loss,
    latent_kl,
    latent_mse,
    latent_stop_unlikelihood,
    stage2_losses,
    supervision_loss,
    token_nll,
)
from latent_sft_core.masks import Role
from latent_sft_core.soft_embedding import SparseAlpha, gumbel_perturb

pytestmark = pytest.mark.unit
I = IGNORE_INDEX


def test_token_nll_is_shifted_and_ignores_unlabelled_positions():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[I, 1, I]])
    nll = token_nll(logits, labels)
    # label 1 at position 1 is predicted by position 0: -log 0.25
    torch.testing.assert_close(nll, torch.tensor([[0.0, math.log(4), 0.0]]))


def test_supervision_loss_is_the_token_mean_with_components():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]]))
    labels = torch.tensor([[I, 0, 1, 0]])
    roles = torch.tensor([[Role.PROMPT, Role.CHUNK, Role.CHUNK, Role.ANSWER]])
    out = supervision_loss(logits, labels, roles)
    chunk = [math.log(2), -math.log(0.75)]
    answer = [math.log(2)]
    torch.testing.assert_close(out["loss"], torch.tensor(sum(chunk + answer) / 3))
    torch.testing.assert_close(out["chunk_loss"], torch.tensor(sum(chunk) / 2))
    torch.testing.assert_close(out["answer_loss"], torch.tensor(answer[0]))


def kl(q, p):
    return sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p) if qi > 0)


def test_latent_kl_against_hand_computed_values():
    # sample 0: slots at 2 and 3 (predicted from 1 and 2); sample 1: one slot at 1 (predicted from 0)
    student = torch.tensor([
        [[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]],
        [[0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]],
    ])
    slots = torch.tensor([[False, False, True, True], [False, True, False, False]])
    ids = torch.tensor([[0, 1], [2, 3], [3, 0]])
    probs = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.5, 0.5]])
    value = latent_kl(torch.log(student), slots, ids, probs)
    sample0 = (kl([0.6, 0.4], [0.4, 0.3]) + kl([1.0], [0.25])) / 2
    sample1 = kl([0.5, 0.5], [0.7, 0.1])
    torch.testing.assert_close(value, torch.tensor((sample0 + sample1) / 2))


def test_latent_kl_reads_the_student_at_alphas_temperature():
    """At temperature T the student's alpha is softmax(logits / T): the KL must compare the teacher with that
    distribution, the one the student feeds at inference. Logits 2 * log p read at T = 2 give back p."""
    p = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]]])
    slots = torch.tensor([[False, True]])  # predicted from position 0
    teacher, ids = torch.tensor([[2 / 3, 1 / 3]]), torch.tensor([[0, 1]])
    at_two = latent_kl(2 * torch.log(p), slots, ids, teacher, temperature=2.0)
    torch.testing.assert_close(at_two, torch.tensor(kl([2 / 3, 1 / 3], [0.6, 0.3])))
    # read at temperature 1, the same logits are the sharper p^2 / sum(p^2)
    squared = [0.36 / 0.46, 0.09 / 0.46]
    torch.testing.assert_close(latent_kl(2 * torch.log(p), slots, ids, teacher),
                               torch.tensor(kl([2 / 3, 1 / 3], squared)))


def test_latent_kl_dense_teacher_and_no_latents():
    student = torch.log(torch.tensor([[[0.5, 0.5], [0.2, 0.8]]]))
    slots = torch.tensor([[False, True]])
    torch.testing.assert_close(latent_kl(student, slots, None, torch.tensor([[0.5, 0.5]])), torch.tensor(0.0))
    torch.testing.assert_close(latent_kl(student, slots, None, torch.tensor([[0.9, 0.1]])),
                               torch.tensor(kl([0.9, 0.1], [0.5, 0.5])))
    none = latent_kl(student, torch.zeros_like(slots), None, torch.zeros(0, 2))
    assert none.item() == 0.0


def test_stage2_losses_weights_and_gradient():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    roles = torch.tensor([[Role.PROMPT, Role.PROMPT, Role.LATENT, Role.ANSWER, Role.ANSWER],
                          [Role.PROMPT, Role.PROMPT, Role.ANSWER, Role.ANSWER, Role.PAD]])
    labels = torch.tensor([[I, I, I, 3, 1], [I, I, 3, 1, I]])
    ids, probs = torch.tensor([[4, 5]]), torch.tensor([[0.7, 0.3]])
    out = stage2_losses(logits, labels, roles, ids, probs, ce_weight=0.5, kl_weight=2.0)
    torch.testing.assert_close(out["loss"], 0.5 * out["ce_loss"] + 2.0 * out["kl_loss"])
    expected_ce = token_nll(logits, labels).sum() / 4
    torch.testing.assert_close(out["ce_loss"], expected_ce.detach())
    out["loss"].backward()
    assert logits.grad[0, 1].abs().sum() > 0  # the position before the latent slot receives the KL gradient


def test_latent_mse_compares_the_hidden_state_before_each_slot():
    # sample 0: slots at 2 and 3 (predicted from positions 1 and 2); sample 1: no latent
    slots = torch.tensor([[False, False, True, True], [False, False, False, False]])
    hidden = torch.zeros(2, 4, 2)
    hidden[0, 1] = torch.tensor([1.0, 2.0])
    hidden[0, 2] = torch.tensor([0.0, 0.0])
    teacher = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # latent 1: ((1-1)^2 + (2-0)^2) / 2 = 2; latent 2: (9 + 16) / 2 = 12.5; sample mean 7.25; sample 1 left out
    assert latent_mse(hidden, slots, teacher).item() == pytest.approx(7.25)
    weighted = stage2_losses(torch.zeros(2, 4, 5), torch.full((2, 4), IGNORE_INDEX), torch.where(slots, Role.LATENT, 0),
                             None, teacher, ce_weight=1.0, kl_weight=2.0, hidden=hidden)
    assert set(weighted) == {"loss", "ce_loss", "mse_loss"} and weighted["loss"].item() == pytest.approx(14.5)


def test_stop_unlikelihood_penalises_the_stop_token_before_each_slot():
    # sample 0: slots at 2 and 3, predicted from positions 1 and 2; sample 1: no latent. Stop id 0.
    slots = torch.tensor([[False, False, True, True], [False, False, False, False]])
    logits = torch.zeros(2, 4, 3)
    logits[0, 1] = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    logits[0, 2] = torch.log(torch.tensor([0.2, 0.4, 0.4]))
    logits[0, 3] = torch.log(torch.tensor([0.99, 0.005, 0.005]))  # the last slot's output predicts </think>: free
    expected = (math.log(2) + math.log(1 / 0.8)) / 2
    assert latent_stop_unlikelihood(logits, slots, stop_id=0).item() == pytest.approx(expected, rel=1e-5)
    assert latent_stop_unlikelihood(logits, slots, stop_id=1).item() == pytest.approx(
        (math.log(1 / 0.75) + math.log(1 / 0.6)) / 2, rel=1e-5)

    hidden, teacher = torch.zeros(2, 4, 2), torch.zeros(2, 2)  # MSE 0: the latent term is the stop term alone
    roles = torch.where(slots, Role.LATENT, 0)
    leaf = logits.clone().requires_grad_(True)
    weighted = stage2_losses(leaf, torch.full((2, 4), IGNORE_INDEX), roles, None, teacher, ce_weight=1.0,
                             kl_weight=2.0, hidden=hidden, stop_id=0, stop_weight=3.0)
    assert set(weighted) == {"loss", "ce_loss", "mse_loss", "stop_loss"}
    assert weighted["loss"].item() == pytest.approx(2.0 * 3.0 * expected, rel=1e-5)
    weighted["loss"].backward()
    # descending the gradient lowers p(stop) at the positions before the slots and leaves the others alone
    lowered = torch.softmax(logits - 0.1 * leaf.grad, -1)[..., 0]
    assert (lowered[0, 1:3] < torch.softmax(logits, -1)[0, 1:3, 0]).all()
    assert leaf.grad[0, 3].abs().sum() == 0 and leaf.grad[1].abs().sum() == 0
    with pytest.raises(ValueError, match="hidden-state latents"):
        stage2_losses(logits, torch.full((2, 4), IGNORE_INDEX), roles, None, teacher, ce_weight=1.0, kl_weight=1.0,
                      stop_id=0, stop_weight=1.0)


def test_gumbel_is_identity_without_noise_and_keeps_support():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    torch.testing.assert_close(gumbel_perturb(probs, scale=0.0, tau=1.0, clamp=(-1.5, 3.0)), probs)
    noisy = gumbel_perturb(probs.expand(1000, 4), scale=1.0, tau=1.0, clamp=(-1.5, 3.0),
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy.sum(-1), torch.ones(1000))
    assert (noisy[:, 3] == 0).all() and (noisy[:, :3] > 0).all()
    assert not torch.allclose(noisy[0], noisy[1])


def test_gumbel_max_of_the_perturbed_distribution_samples_the_original():
    """With unclamped noise, argmax(log p + g) is a sample of p (the Gumbel-max trick)."""
    probs = torch.tensor([0.6, 0.3, 0.1]).expand(20000, 3)
    noisy = gumbel_perturb(probs, scale=1.0, tau=1.0, clamp=(-100.0, 100.0), generator=torch.Generator().manual_seed(1))
    frequencies = torch.bincount(noisy.argmax(-1), minlength=3).float() / 20000
    torch.testing.assert_close(frequencies, torch.tensor([0.6, 0.3, 0.1]), atol=0.015, rtol=0)
    # a lower temperature sharpens: the top entry gains mass on average
    sharp = gumbel_perturb(probs, scale=1.0, tau=0.5, clamp=(-100.0, 100.0), generator=torch.Generator().manual_seed(1))
    assert sharp[:, 0].mean() > noisy[:, 0].mean()


def test_gumbel_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        gumbel_perturb(torch.tensor([[1.0]]), scale=1.0, tau=0.0, clamp=(-1.5, 3.0))


def test_alpha_marginal_entropy_of_the_batch_mean_against_hand_computed_values():
    # three latents, top-2 over a vocabulary of 6: the batch mean puts 1/3 on token 0, 1/6 on 1, 1/6 on 2, 1/3 on 4
    ids = torch.tensor([[0, 1], [0, 2], [4, 1]])
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    expected = -(2 * (1 / 3) * math.log(1 / 3) + 2 * (1 / 6) * math.log(1 / 6))
    assert float(alpha_marginal_entropy(SparseAlpha(ids, probs), 6)) == pytest.approx(expected, abs=1e-6)
    dense = torch.zeros(3, 6).scatter_add(1, ids, probs)
    assert float(alpha_marginal_entropy(SparseAlpha(None, dense), 6)) == pytest.approx(expected, abs=1e-6)
    # every latent on the same token (a collapse): 0, however sharp; every latent on its own token: log M
    same = SparseAlpha(torch.tensor([[3, 1]] * 4), torch.tensor([[1.0, 0.0]] * 4))
    assert float(alpha_marginal_entropy(same, 6)) == pytest.approx(0.0, abs=1e-6)
    apart = SparseAlpha(torch.tensor([[0, 5], [1, 5], [2, 5], [3, 5]]), torch.tensor([[1.0, 0.0]] * 4))
    assert float(alpha_marginal_entropy(apart, 6)) == pytest.approx(math.log(4), abs=1e-6)
    empty = SparseAlpha(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert float(alpha_marginal_entropy(empty, 6)) == 0.0


P, C, L, A = Role.PROMPT, Role.CHUNK, Role.LATENT, Role.ANSWER


def test_chunk_anchor_loss_against_hand_computed_values():
    # two samples of the encoder batch, vocabulary 5: sample 0 = [prompt 4, chunk 1 2, latent, chunk 3 3, latent,
    # </think>], sample 1 = [prompt 4, chunk 0, latent, pad...]; latents in order: (0, 0) chunk {1, 2},
    # (0, 1) chunk {3} (counted once), (1, 0) chunk {0}
    input_ids = torch.tensor([[4, 1, 2, 9, 3, 3, 9, 4], [4, 0, 9, 0, 0, 0, 0, 0]])
    roles = torch.tensor([[P, C, C, L, C, C, L, A], [P, C, L, 0, 0, 0, 0, 0]])
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2], [0.05, 0.8, 0.05, 0.05, 0.05]])
    expected = -(math.log(0.5) + math.log(0.2) + math.log(0.05)) / 3
    assert float(chunk_anchor_loss(probs.log(), input_ids, roles)) == pytest.approx(expected, abs=1e-6)
    # at temperature 2 the softmax is of logits / 2: sqrt of the probabilities, renormalised
    soft = probs.sqrt() / probs.sqrt().sum(-1, keepdim=True)
    expected_soft = -(soft[0, 1:3].sum().log() + soft[1, 3].log() + soft[2, 0].log()) / 3
    assert float(chunk_anchor_loss(probs.log(), input_ids, roles, 2.0)) == pytest.approx(float(expected_soft), abs=1e-6)
    # all the mass on the own chunk: 0
    on_chunk = torch.tensor([[-30.0, 0.0, 0.0, -30.0, -30.0], [-30.0] * 3 + [0.0, -30.0], [0.0] + [-30.0] * 4])
    assert float(chunk_anchor_loss(on_chunk, input_ids, roles)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="3 latent positions .* 2 rows"):
        chunk_anchor_loss(probs[:2].log(), input_ids, roles)
    no_latents = torch.tensor([[P, C, A]])
    assert float(chunk_anchor_loss(torch.zeros(0, 5), torch.tensor([[4, 1, 2]]), no_latents)) == 0.0


def test_chunk_anchor_loss_gradient_raises_the_chunk_outside_the_top_k():
    """Descent moves logit mass onto the latent's own chunk, even onto a token the top-k alpha would not hold."""
    logits = torch.tensor([[5.0, 4.0, -3.0, 0.0]], requires_grad=True)  # chunk token 2 is the least likely
    chunk_anchor_loss(logits, torch.tensor([[2, 9]]), torch.tensor([[C, L]])).backward()
    assert logits.grad[0, 2] < 0 and (logits.grad[0, [0, 1, 3]] > 0).all()


def test_alpha_marginal_entropy_gradient_spreads_a_shared_token():
    """Maximising the term moves probability away from the token every latent shares."""
    logits = torch.tensor([[3.0, 0.0], [3.0, 1.0]], requires_grad=True)
    ids = torch.tensor([[0, 1], [0, 2]])  # token 0 is every latent's top-1
    (-alpha_marginal_entropy(SparseAlpha(ids, torch.softmax(logits, -1)), 3)).backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1] < 0).all()  # descent lowers the shared token
