import pytest
import torch

from latent_sft_core.soft_embedding import alpha_from_logits, mix_embeddings, vocabulary_logits

pytestmark = pytest.mark.unit


def test_top_k_alpha_is_the_renormalised_softmax_of_the_k_largest_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5]])
    alpha = alpha_from_logits(logits, top_k=2)
    assert alpha.ids.tolist() == [[1, 2]]
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    torch.testing.assert_close(alpha.probs[0], expected)
    assert alpha.probs.dtype == torch.float32


def test_temperature_sharpens_and_full_vocabulary_is_dense():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    full = alpha_from_logits(logits, top_k=None)
    assert full.ids is None
    torch.testing.assert_close(full.probs, torch.softmax(logits, dim=-1))
    cold = alpha_from_logits(logits, top_k=None, temperature=0.5)
    torch.testing.assert_close(cold.probs, torch.softmax(logits / 0.5, dim=-1))
    assert cold.probs[0, 0] > full.probs[0, 0]
    # k = V gives the same distribution as the dense form
    torch.testing.assert_close(alpha_from_logits(logits, top_k=3).probs, full.probs)


def test_bad_k_and_temperature():
    with pytest.raises(ValueError, match="top_k must be in 1..3"):
        alpha_from_logits(torch.zeros(1, 3), top_k=4)
    with pytest.raises(ValueError, match="temperature"):
        alpha_from_logits(torch.zeros(1, 3), top_k=1, temperature=0)


def test_z_is_alpha_times_embeddings_for_sparse_and_dense_alpha():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    dense = alpha_from_logits(logits, top_k=None)
    torch.testing.assert_close(mix_embeddings(dense, table), torch.tensor([[0.2 + 0.6, 0.5 + 0.6]]))
    top2 = alpha_from_logits(logits, top_k=2)  # ids 1 (0.5) and 2 (0.3), renormalised to 5/8 and 3/8
    torch.testing.assert_close(mix_embeddings(top2, table), torch.tensor([[0.75, 5 / 8 + 0.75]]))


def test_gradient_reaches_the_hidden_state_but_not_the_embedding_table():
    table = torch.randn(7, 4, requires_grad=True)
    hidden = torch.randn(3, 4, requires_grad=True)
    z = mix_embeddings(alpha_from_logits(vocabulary_logits(hidden, table), top_k=3), table)
    z.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert table.grad is None


def test_vocabulary_logits_equal_a_dot_with_each_row():
    table = torch.randn(5, 3)
    hidden = torch.randn(2, 3)
    logits = vocabulary_logits(hidden, table)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits[1, 4], (hidden[1] * table[4]).sum())


def test_mixing_through_the_embedding_module_equals_mixing_the_matrix():
    module = torch.nn.Embedding(6, 3)
    alpha = alpha_from_logits(torch.randn(2, 4, 6), top_k=3)
    torch.testing.assert_close(mix_embeddings(alpha, module), mix_embeddings(alpha, module.weight))
    dense = alpha_from_logits(torch.randn(2, 6), top_k=None)
    torch.testing.assert_close(mix_embeddings(dense, module), mix_embeddings(dense, module.weight))
    assert not mix_embeddings(alpha, module).requires_grad  # E is detached
