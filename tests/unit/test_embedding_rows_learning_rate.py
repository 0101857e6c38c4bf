import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from latent_sft_core.training import EmbeddingRowsLearningRate

pytestmark = pytest.mark.unit

ROWS = [3, 7]


def one_step(tied: bool, factor: float | None) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(model before, model after) one AdamW step on a fixed batch, with the rows' callback when ``factor``."""
    config = LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    before = LlamaForCausalLM(config)
    before.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    callback = EmbeddingRowsLearningRate(model, ROWS, factor) if factor else None
    ids = torch.tensor([[1, 3, 5, 7, 9, 3]])
    model(input_ids=ids, labels=ids).loss.backward()
    if callback:
        callback.on_pre_optimizer_step(None, None, None)
    optimizer.step()
    if callback:
        callback.on_optimizer_step(None, None, None)
    return before, model


@pytest.mark.parametrize("tied", [True, False])
def test_the_rows_move_factor_times_as_far_and_nothing_else_changes(tied):
    before, plain = one_step(tied, factor=None)
    _, faster = one_step(tied, factor=10.0)
    others = [row for row in range(12) if row not in ROWS]
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
        start, slow, fast = get(before).detach(), get(plain).detach(), get(faster).detach()
        torch.testing.assert_close(fast[ROWS] - start[ROWS], 10 * (slow[ROWS] - start[ROWS]))
        assert (slow[ROWS] - start[ROWS]).abs().max() > 1e-3
        torch.testing.assert_close(fast[others], slow[others], rtol=0, atol=0)
    plain_rest = {n: p for n, p in plain.named_parameters() if "embed" not in n and "lm_head" not in n}
    for name, parameter in faster.named_parameters():
        if name in plain_rest:
            torch.testing.assert_close(parameter, plain_rest[name], rtol=0, atol=0)
