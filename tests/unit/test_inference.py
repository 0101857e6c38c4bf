"""Batched latent / explicit decoding on one KV cache, on a tiny random Llama in float64 (exact comparisons)."""

import math

import pytest
import torch
from torch import nn

from latent_sft_core.config import DecodingParams, GumbelParams, SamplingParams, TinyModelParams
from latent_sft_core.inference import LatentMode, choose_tokens, decode, split_generation
from latent_sft_core.modeling import build_tiny_model
from latent_sft_core.soft_embedding import SparseAlpha, alpha_from_logits, mix_embeddings
from tests.support import SPECIAL_IDS

pytestmark = pytest.mark.unit

IDS = SPECIAL_IDS
VOCAB = 40
# prompts of different lengths, so that left padding and per-row positions matter
PROMPTS = [[10, 11, 12], [13, 14, 15, 16, 17, 18], [19], [20, 21, 22, 23], [24, 25, 26, 27, 28, 29, 30, 31]]


@pytest.fixture(scope="module")
def model():
    tiny = TinyModelParams(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return build_tiny_model(tiny, VOCAB, IDS, seed=3).to(torch.float64).eval()


class CloseThinkingAt(nn.Module):
    """The model, with ``</think>`` made the greedy token exactly when a row's position reaches ``position``.

    The decision depends on the row's own position only, so it is the same batched or alone; with different
    prompt lengths, rows leave latent mode after different numbers of steps.
    """

    def __init__(self, model: nn.Module, position: int):
        super().__init__()
        self.model = model
        self.position = position

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kwargs):
        output = self.model(**kwargs)
        reached = kwargs["position_ids"][:, -1] >= self.position
        output.logits[:, -1, IDS.think_close] = torch.where(reached, 1e4, -1e4).to(output.logits.dtype)
        return output


def settings(**overrides) -> DecodingParams:
    return DecodingParams(**{"batch_size": 8, "max_latent_steps": 6, "max_new_tokens": 5, **overrides})


def comparable(decoded):
    return [(d.reasoning_ids, d.answer_ids, d.closed, d.capped, [s.ids for s in d.latent_steps]) for d in decoded]


def test_split_generation_cuts_at_think_close_and_end():
    decoded = split_generation([5, 6, IDS.think_close, 7, 8, IDS.end, 9], IDS)
    assert (decoded.reasoning_ids, decoded.answer_ids, decoded.closed) == ([5, 6], [7, 8], True)
    never_closed = split_generation([5, 6, IDS.end, IDS.think_close], IDS)
    assert (never_closed.reasoning_ids, never_closed.answer_ids, never_closed.closed) == ([5, 6], [], False)


def test_batched_latent_decoding_equals_one_by_one(model):
    wrapped = CloseThinkingAt(model, position=8)
    latent = LatentMode(top_k=4)
    batched = decode(wrapped, PROMPTS, IDS, settings(), latent, progress=False)
    alone = [decode(wrapped, [p], IDS, settings(batch_size=1), latent, progress=False)[0] for p in PROMPTS]
    assert comparable(batched) == comparable(alone)
    # several batches: prompts are batched by length, results still come back in the caller's order
    in_pairs = decode(wrapped, PROMPTS, IDS, settings(batch_size=2), latent, progress=False)
    assert comparable(in_pairs) == comparable(alone)
    for b, a in zip(batched, alone):
        for step_b, step_a in zip(b.latent_steps, a.latent_steps):
            assert step_b.probs == pytest.approx(step_a.probs, abs=1e-9)
    # position 8 is reached after 8 - len(prompt) latents (the <think> sits at position len(prompt)); capped at 6
    assert [d.num_reasoning_tokens for d in batched] == [5, 2, 6, 4, 0]
    assert [d.capped for d in batched] == [False, False, True, False, False]
    assert all(d.closed and 0 < len(d.answer_ids) <= 5 for d in batched)


def test_cached_decoding_equals_full_recomputation(model):
    wrapped = CloseThinkingAt(model, position=7)
    for latent in (LatentMode(top_k=4), LatentMode(top_k=None, temperature=0.7), None):
        cached = decode(wrapped, PROMPTS, IDS, settings(), latent, progress=False)
        recomputed = decode(wrapped, PROMPTS, IDS, settings(), latent, use_cache=False, progress=False)
        assert comparable(cached) == comparable(recomputed)
        for c, r in zip(cached, recomputed):
            for step_c, step_r in zip(c.latent_steps, r.latent_steps):
                assert step_c.probs == pytest.approx(step_r.probs, abs=1e-9)


def test_first_step_predicting_think_close_gives_zero_latents(model):
    decoded = decode(CloseThinkingAt(model, position=0), PROMPTS, IDS, settings(), LatentMode(top_k=4), progress=False)
    assert all(d.num_reasoning_tokens == 0 and d.latent_steps == () and d.closed and not d.capped for d in decoded)
    assert all(len(d.answer_ids) > 0 for d in decoded)


def test_latent_step_cap_forces_think_close_and_the_answer_follows(model):
    never = CloseThinkingAt(model, position=10**6)
    decoded = decode(never, PROMPTS, IDS, settings(max_latent_steps=3, max_new_tokens=4), LatentMode(top_k=4),
                     progress=False)
    for d in decoded:
        assert d.num_reasoning_tokens == 3 and len(d.latent_steps) == 3 and d.capped and d.closed
        # </think> scores -1e4 after the forced close too, so the answer runs to the token cap
        assert len(d.answer_ids) == 4 and IDS.think_close not in d.answer_ids
    zero_cap = decode(never, PROMPTS[:1], IDS, settings(max_latent_steps=0), LatentMode(top_k=4), progress=False)[0]
    assert zero_cap.num_reasoning_tokens == 0 and zero_cap.capped


def test_latent_step_feeds_alpha_times_embeddings(model):
    """The second step's distribution equals a forward over [prompt, <think>, Z_1] built by hand."""
    prompt = PROMPTS[1]
    decoded = decode(CloseThinkingAt(model, position=10**6), [prompt], IDS, settings(max_latent_steps=2),
                     LatentMode(top_k=4), keep_top=VOCAB, progress=False)[0]
    embedding = model.get_input_embeddings()
    prefix = embedding(torch.tensor([[*prompt, IDS.think_open]]))
    with torch.no_grad():
        first = model(inputs_embeds=prefix).logits[0, -1].float()
        first[IDS.think_close] = -1e4
        z = mix_embeddings(alpha_from_logits(first[None], 4), embedding)
        second = model(inputs_embeds=torch.cat([prefix, z[None].to(prefix.dtype)], dim=1)).logits[0, -1].float()
    second[IDS.think_close] = -1e4
    probs = torch.softmax(second, dim=-1)
    step = decoded.latent_steps[1]
    assert list(step.probs) == pytest.approx(probs[list(step.ids)].tolist(), abs=1e-9)
    assert step.ids[0] == int(probs.argmax()) and decoded.reasoning_ids[1] == int(second.argmax())


def test_hidden_state_latents_feed_the_last_hidden_state(model):
    """The ablation feeds the final hidden state (after the norm) back as the next input."""
    prompt = PROMPTS[3]
    latent = LatentMode(top_k=4, hidden_state=True)
    wrapped = CloseThinkingAt(model, position=10**6)
    decoded = decode(wrapped, [prompt], IDS, settings(max_latent_steps=2), latent, keep_top=VOCAB, progress=False)[0]
    recomputed = decode(wrapped, [prompt], IDS, settings(max_latent_steps=2), latent, keep_top=VOCAB,
                        use_cache=False, progress=False)
    assert comparable([decoded]) == comparable(recomputed)
    prefix = model.get_input_embeddings()(torch.tensor([[*prompt, IDS.think_open]]))
    with torch.no_grad():
        h = model.model(inputs_embeds=prefix).last_hidden_state[:, -1:]
        second = model(inputs_embeds=torch.cat([prefix, h], dim=1)).logits[0, -1].float()
    second[IDS.think_close] = -1e4
    probs = torch.softmax(second, dim=-1)
    assert list(decoded.latent_steps[1].probs) == pytest.approx(probs[list(decoded.latent_steps[1].ids)].tolist(),
                                                                abs=1e-9)


def test_explicit_decoding_equals_transformers_generate(model):
    decoded = decode(model, PROMPTS, IDS, settings(max_new_tokens=7), None, progress=False)
    for prompt, d in zip(PROMPTS, decoded):
        ids = torch.tensor([[*prompt, IDS.think_open]])
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7,
                                   do_sample=False, eos_token_id=IDS.end, pad_token_id=IDS.pad)
        expected = split_generation(generated[0, ids.shape[1]:].tolist(), IDS)
        assert (d.reasoning_ids, d.answer_ids, d.closed) == (expected.reasoning_ids, expected.answer_ids,
                                                            expected.closed)
        assert d.latent_steps == () and d.seconds > 0


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(dim=-1)
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6)
    assert torch.equal(choose_tokens(logits, nucleus, torch.Generator().manual_seed(1)), greedy)
    hot = SamplingParams(temperature=5.0, top_p=1.0)
    draws = [choose_tokens(logits, hot, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], greedy)


def test_gumbel_noise_changes_latents_reproducibly(model):
    wrapped = CloseThinkingAt(model, position=10**6)
    noisy = settings(max_latent_steps=3, gumbel=GumbelParams(enabled=True, scale=2.0))
    first, again = (decode(wrapped, PROMPTS, IDS, noisy, LatentMode(top_k=4), progress=False) for _ in range(2))
    clean = decode(wrapped, PROMPTS, IDS, settings(max_latent_steps=3), LatentMode(top_k=4), progress=False)
    assert comparable(first) == comparable(again)
    later_steps = lambda decoded: [d.latent_steps[1:] for d in decoded]  # noqa: E731 (step 1 is noise-free)
    assert later_steps(first) != later_steps(clean)


def teacher_alphas(lengths, k=3, seed=5):
    """Hand-made teacher latents: per prompt, ``lengths[i]`` top-k alphas over random tokens."""
    generator = torch.Generator().manual_seed(seed)
    alphas = []
    for n in lengths:
        ids = torch.stack([torch.randperm(VOCAB - 5, generator=generator)[:k] + 5 for _ in range(n)]) if n else \
            torch.zeros(0, k, dtype=torch.long)
        probs = torch.softmax(torch.randn(n, k, generator=generator, dtype=torch.float64), -1)
        alphas.append(SparseAlpha(ids=ids, probs=probs))
    return alphas


def test_following_the_teacher_feeds_exactly_its_latents_then_answers(model):
    """N teacher latents are fed whatever the model predicts (</think> included), then </think>; the answer
    equals greedy decoding after [prompt, <think>, Z_1..Z_N, </think>] built by hand."""
    lengths = [3, 0, 5, 1, 2]
    teacher = teacher_alphas(lengths)
    always_close = CloseThinkingAt(model, position=0)  # free-running, every row would stop at once
    closing = decode(always_close, PROMPTS, IDS, settings(max_latent_steps=2), LatentMode(top_k=4), progress=False,
                     teacher=teacher, follow_teacher=True)
    assert [len(d.latent_steps) for d in closing] == lengths  # not capped at 2, not stopped by </think>
    assert all(d.closed and not d.capped for d in closing)
    decoded = decode(model, PROMPTS, IDS, settings(max_latent_steps=2), LatentMode(top_k=4), progress=False,
                     teacher=teacher, follow_teacher=True)
    embedding = model.get_input_embeddings()
    for prompt, alpha, d in zip(PROMPTS, teacher, decoded):
        inputs = embedding(torch.tensor([*prompt, IDS.think_open]))
        latents = mix_embeddings(alpha, embedding) if alpha.probs.shape[0] else inputs[:0]
        sequence = torch.cat([inputs, latents, embedding(torch.tensor([IDS.think_close]))])[None]
        answer = []
        with torch.no_grad():
            while len(answer) < 5 and IDS.end not in answer:
                token = int(model(inputs_embeds=sequence).logits[0, -1].argmax())
                answer.append(token)
                sequence = torch.cat([sequence, embedding(torch.tensor([[token]]))], dim=1)
        answer = answer[: answer.index(IDS.end)] if IDS.end in answer else answer
        assert answer  # the random model says something before <end>: the comparison has content
        assert answer == d.answer_ids


def test_teacher_comparison_is_kl_and_top1_agreement_of_each_step(model):
    prompt = PROMPTS[1]
    teacher = teacher_alphas([2])
    decoded = decode(CloseThinkingAt(model, position=10**6), [prompt], IDS, settings(max_latent_steps=4),
                     LatentMode(top_k=4), keep_top=VOCAB, progress=False, teacher=teacher)[0]
    # free-running: 4 own steps, the first 2 compared with the teacher's 2 latents, the rest not
    assert [s.teacher_kl is not None for s in decoded.latent_steps] == [True, True, False, False]
    for step, q, ids in zip(decoded.latent_steps, teacher[0].probs, teacher[0].ids):
        student = dict(zip(step.ids, step.probs))  # the whole vocabulary (keep_top=VOCAB)
        expected = sum(float(qi) * (math.log(float(qi)) - math.log(student[int(i)])) for qi, i in zip(q, ids))
        assert step.teacher_kl == pytest.approx(expected, abs=1e-6)
        assert step.teacher_agrees == (int(ids[q.argmax()]) == step.ids[0])
    # a teacher equal to the student's own top-1 agrees, with KL = -log p(top-1)
    own = decoded.latent_steps[0]
    matching = [SparseAlpha(ids=torch.tensor([[own.ids[0]]]), probs=torch.tensor([[1.0]], dtype=torch.float64))]
    again = decode(CloseThinkingAt(model, position=10**6), [prompt], IDS, settings(max_latent_steps=1),
                   LatentMode(top_k=4), keep_top=VOCAB, progress=False, teacher=matching)[0]
    assert again.latent_steps[0].teacher_agrees is True
    assert again.latent_steps[0].teacher_kl == pytest.approx(-math.log(own.probs[0]), abs=1e-6)


def test_following_the_teacher_needs_one_teacher_per_prompt(model):
    with pytest.raises(ValueError, match="2 teacher alphas for 5 prompts"):
        decode(model, PROMPTS, IDS, settings(), LatentMode(top_k=4), teacher=teacher_alphas([1, 1]), progress=False)
    with pytest.raises(ValueError, match="follow_teacher needs"):
        decode(model, PROMPTS, IDS, settings(), None, teacher=teacher_alphas([1] * 5), follow_teacher=True,
               progress=False)
