import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from latent_sft_core.layout import (
    decoder_sequence,
    encoder_sequence,
    labels_from_roles,
    pad_sequences,
    stage2_sequence,
)
from latent_sft_core.masks import Role, attention_bias, decoder_mask, encoder_mask
from tests.support import SPECIAL_IDS, chunked_row

pytestmark = pytest.mark.unit

IDS = SPECIAL_IDS
VOCAB = 48


make_row = chunked_row


# Prompt of 2 tokens + <think>, N = 3 chunks of c = 2 with a short last one (S_3 = [24]), answer [30] + end.
ROW = make_row([20, 21, 22, 23, 24])
SHORT = make_row([20])  # N = 1

# Encoder:  0 P, 1 P, 2 <think>, 3 S1, 4 S1, 5 L1, 6 S2, 7 S2, 8 L2, 9 S3, 10 L3, 11 </think>
LTIM = [
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # L1: prompt, S1, itself
    [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0],  # S2 does not see L1
    [1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0],  # L2: prompt, S1, S2, itself
    [1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0],
    [1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0],  # L3
    [1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1],  # </think>: prompt and all chunks, no latent
]
# Decoder:  0 P, 1 P, 2 <think>, 3 Z1, 4 S2, 5 S2, 6 Z2, 7 S3, 8 Z3, 9 </think>, 10 answer, 11 end
LTSUM = [
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # Z1: prompt, itself
    [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # S2: Z1 and its own chunk only
    [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0],  # Z2: prompt, Z1, itself
    [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # S3: Z2, itself
    [1, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0],  # Z3
    [1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0],  # answer: prompt, all Z, answer causally
    [1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0],
    [1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1],
]
PREFIX = [
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # S2: prompt, Z1, its own chunk
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0],  # S3: prompt, Z1, Z2, itself
    [1, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0],
    [1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0],
    [1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1],
]
CAUSAL = torch.tril(torch.ones(12, 12, dtype=torch.long)).tolist()


def batch_of(builder, rows):
    return pad_sequences([builder(row, IDS) for row in rows], IDS.pad)


def check_padded(make_mask, builder, expected):
    """The long sample's mask is ``expected``; the padded short sample's equals its own unpadded mask."""
    batch = batch_of(builder, [ROW, SHORT])
    mask = make_mask(batch)
    assert mask.shape == (2, 12, 12) and mask.dtype == torch.bool
    assert mask[0].long().tolist() == expected
    alone = make_mask(batch_of(builder, [SHORT]))[0]
    length = alone.shape[-1]
    assert length < 12
    assert torch.equal(mask[1, :length, :length], alone)
    assert not mask[1, length:].any() and not mask[1, :, length:].any()  # pad rows and columns


@pytest.mark.parametrize(("variant", "expected"), [("ltim", LTIM), ("causal", CAUSAL)])
def test_encoder_mask_cell_by_cell(variant, expected):
    check_padded(lambda b: encoder_mask(b["roles"], variant), encoder_sequence, expected)


@pytest.mark.parametrize(("variant", "expected"), [("ltsum", LTSUM), ("prefix", PREFIX), ("causal", CAUSAL)])
def test_decoder_mask_cell_by_cell(variant, expected):
    check_padded(lambda b: decoder_mask(b["roles"], b["steps"], variant), decoder_sequence, expected)


def test_default_variants():
    enc, dec = batch_of(encoder_sequence, [ROW]), batch_of(decoder_sequence, [ROW])
    assert encoder_mask(enc["roles"]).long()[0].tolist() == LTIM
    assert decoder_mask(dec["roles"], dec["steps"]).long()[0].tolist() == LTSUM


def test_unknown_variant_lists_the_allowed_ones():
    roles = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="ltim, causal"):
        encoder_mask(roles, "ltsum")
    with pytest.raises(ValueError, match="ltsum, prefix, causal"):
        decoder_mask(roles, torch.zeros_like(roles), "full")


def test_encoder_ltim_rules_on_a_mixed_batch():
    rows = [ROW, SHORT, make_row([]), make_row(list(range(20, 31)), c=3, prompt=(10,))]
    batch = batch_of(encoder_sequence, rows)
    roles, steps = batch["roles"], batch["steps"]
    mask = encoder_mask(roles)
    valid = roles != Role.PAD
    assert torch.equal(encoder_mask(roles, "causal"), torch.tril(valid[:, :, None] & valid[:, None, :]))
    latent = roles == Role.LATENT
    for b in range(len(rows)):
        for q in range(roles.shape[1]):
            if roles[b, q] == Role.PAD:
                continue
            seen = mask[b, q]
            # no earlier latent is ever visible; a latent sees itself
            assert not (seen[:q] & latent[b, :q]).any()
            if latent[b, q]:
                assert seen[q]
                # L_i sees the prompt and S_1..S_i: every earlier non-latent position
                assert torch.equal(seen[:q], ~latent[b, :q])
                assert (steps[b, :q][roles[b, :q] == Role.CHUNK] <= steps[b, q]).all()


def test_attention_bias_values_and_pad_rows():
    batch = batch_of(decoder_sequence, [ROW, SHORT])
    mask = decoder_mask(batch["roles"], batch["steps"])
    for dtype in (torch.float32, torch.bfloat16):
        bias = attention_bias(mask, dtype)
        assert bias.shape == (2, 1, 12, 12) and bias.dtype == dtype
        minimum = torch.finfo(dtype).min
        real_rows = mask.any(-1)
        assert torch.equal(bias[:, 0][real_rows] == 0, mask[real_rows])
        assert (bias[:, 0][real_rows][~mask[real_rows]] == minimum).all()
        # pad rows attend to themselves in the bias only, so softmax stays finite
        pad_rows = bias[1, 0, ~real_rows[1]]
        assert (pad_rows == 0).sum().item() == pad_rows.shape[0]
        scores = torch.randn(2, 1, 12, 12).to(dtype) * 10 - 20
        probs = torch.softmax(scores + bias, dim=-1)
        assert not probs.isnan().any()
    assert not mask[1][~real_rows[1]].any()  # the bool mask itself is unchanged


# ----------------------------------------------------------------------------- model-level checks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=IDS.pad,
        initializer_range=0.2,  # sharper attention than the default 0.02, so wrong masks/positions show clearly
    )
    config._attn_implementation = "sdpa"
    # one thread: a tiny model gains nothing from more, and on a busy machine thread hand-offs dominate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LlamaForCausalLM(config).eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def latents():
    """Random soft inputs Z_1..Z_3 (the same rows are used by every run of a comparison)."""
    return torch.randn(3, 32, generator=torch.Generator().manual_seed(1))


def forward(model, latents, input_ids, roles, steps, position_ids=None, mask=None):
    """Log-probs [B, T, V]; LATENT slots take Z_{step} as input embeddings; ``mask=None`` is plain causal."""
    embeds = model.get_input_embeddings()(input_ids)
    soft = latents[(steps - 1).clamp(min=0)]
    embeds = torch.where((roles == Role.LATENT)[..., None], soft, embeds)
    bias = None if mask is None else attention_bias(mask, embeds.dtype)
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, attention_mask=bias, position_ids=position_ids, use_cache=False).logits
    return logits.log_softmax(-1)


def token_log_likelihoods(log_probs, input_ids):
    """[B, T-1]: log p(token at p+1 | ...) read at position p."""
    return log_probs[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize(
    ("builder", "make_mask"),
    [
        (encoder_sequence, lambda b: encoder_mask(b["roles"])),
        (decoder_sequence, lambda b: decoder_mask(b["roles"], b["steps"], "ltsum")),
        (decoder_sequence, lambda b: decoder_mask(b["roles"], b["steps"], "prefix")),
    ],
)
def test_padded_batch_equals_sample_alone(model, latents, builder, make_mask):
    batch = batch_of(builder, [ROW, SHORT])
    padded = forward(model, latents, batch["input_ids"], batch["roles"], batch["steps"], batch["position_ids"],
                     make_mask(batch))
    assert not padded.isnan().any()
    for index, row in enumerate([ROW, SHORT]):
        alone_batch = batch_of(builder, [row])
        alone = forward(model, latents, alone_batch["input_ids"], alone_batch["roles"], alone_batch["steps"],
                        alone_batch["position_ids"], make_mask(alone_batch))
        length = alone.shape[1]
        torch.testing.assert_close(padded[index, :length], alone[0], atol=1e-5, rtol=0)


def packed_decoder(model, latents, variant, dual_track=True):
    """One packed decoder forward; ``dual_track=False`` uses plain 0..T-1 positions (the reference v1 code)."""
    batch = batch_of(decoder_sequence, [ROW])
    mask = decoder_mask(batch["roles"], batch["steps"], variant)
    positions = batch["position_ids"] if dual_track else None
    log_probs = forward(model, latents, batch["input_ids"], batch["roles"], batch["steps"], positions, mask)
    return batch, token_log_likelihoods(log_probs, batch["input_ids"])[0], log_probs[0]


def separate_chunk_run(model, latents, step, restricted):
    """Chunk S_{step+1} decoded after ``[prompt, <think>, Z_1..Z_step]`` in its own plain-position sequence.

    ``restricted`` builds the ltsum context by hand: the chunk rows see only Z_step and the chunk itself
    (Z_step's states still depend on the prompt and earlier latents through the causal prefix).
    """
    prefix = [*ROW.prompt_ids, IDS.think_open]
    chunk = ROW.chunks()[step]
    input_ids = torch.tensor([prefix + [IDS.pad] * step + chunk])
    roles = torch.tensor([[Role.PROMPT] * len(prefix) + [Role.LATENT] * step + [Role.CHUNK] * len(chunk)])
    steps = torch.tensor([[0] * len(prefix) + list(range(1, step + 1)) + [0] * len(chunk)])
    mask = None
    if restricted:
        length = input_ids.shape[1]
        mask = torch.tril(torch.ones(length, length, dtype=torch.bool))
        z_step = len(prefix) + step - 1
        mask[z_step + 1 :, :z_step] = False
        mask = mask[None]
    log_probs = forward(model, latents, input_ids, roles, steps, mask=mask)
    return token_log_likelihoods(log_probs, input_ids)[0, -len(chunk) :]


@pytest.mark.parametrize(("variant", "restricted"), [("prefix", False), ("ltsum", True)])
def test_packed_decoder_equals_separate_chunk_runs(model, latents, variant, restricted):
    batch, packed, _ = packed_decoder(model, latents, variant)
    roles, steps = batch["roles"][0, 1:], batch["steps"][0, 1:]  # aligned with the predicted token
    gaps = []
    for step in range(1, ROW.num_chunks):
        in_chunk = (roles == Role.CHUNK) & (steps == step)
        separate = separate_chunk_run(model, latents, step, restricted)
        torch.testing.assert_close(packed[in_chunk], separate, atol=1e-5, rtol=0)
        gaps.append((packed[in_chunk] - separate_chunk_run(model, latents, step, not restricted)).abs().max())
    # the check tells the two chunk contexts apart (on chunk tokens after the first: the first is read at Z_i)
    assert max(gaps) > 1e-3


@pytest.mark.parametrize("variant", ["ltsum", "prefix"])
def test_packed_decoder_latents_and_answer_equal_the_inference_layout(model, latents, variant):
    """Latents and answer see exactly what they see at inference: the stage-2 sequence with plain causality."""
    batch, packed, packed_log_probs = packed_decoder(model, latents, variant)
    stage2 = batch_of(stage2_sequence, [ROW])
    plain = forward(model, latents, stage2["input_ids"], stage2["roles"], stage2["steps"])
    for role in (Role.LATENT, Role.ANSWER):
        torch.testing.assert_close(
            packed_log_probs[batch["roles"][0] == role], plain[0][stage2["roles"][0] == role], atol=1e-5, rtol=0
        )
    # the supervised answer tokens (</think> from Z_N, then answer and end) score the same
    labels = labels_from_roles(batch["input_ids"], batch["roles"])[0, 1:]
    answer_targets = batch["roles"][0, 1:] == Role.ANSWER
    plain_ll = token_log_likelihoods(plain, stage2["input_ids"])[0]
    torch.testing.assert_close(packed[answer_targets], plain_ll[stage2["roles"][0, 1:] == Role.ANSWER], atol=1e-5,
                               rtol=0)
    assert labels[answer_targets].tolist() == [IDS.think_close, 30, IDS.end]
    # with plain positions the answer would be trained at positions it never has at inference
    _, mismatched, _ = packed_decoder(model, latents, variant, dual_track=False)
    assert (mismatched[answer_targets] - packed[answer_targets]).abs().max() > 1e-3
