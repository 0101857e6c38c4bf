import random
from functools import partial

import pytest
import torch

from latent_sft_core.layout import (
    IGNORE_INDEX,
    TokenSequence,
    cot_sft_sequence,
    decoder_sequence,
    dual_track_position_ids,
    encoder_sequence,
    labels_from_roles,
    pad_sequences,
    stage2_sequence,
)
from latent_sft_core.masks import Role
from tests.support import SPECIAL_IDS, chunked_row

pytestmark = pytest.mark.unit

IDS = SPECIAL_IDS
P, C, L, A, PAD = Role.PROMPT, Role.CHUNK, Role.LATENT, Role.ANSWER, Role.PAD
I = IGNORE_INDEX


make_row = partial(chunked_row, prompt=(10, 11, 12), answer=(30, 31))


# N = 3 with c = 2 and a short last chunk: S_1 = [20, 21], S_2 = [22, 23], S_3 = [24].
ROW3 = make_row([20, 21, 22, 23, 24])
ROW1 = make_row([20, 21])  # N = 1 (one full chunk)
ROW0 = make_row([])  # N = 0


def test_encoder_sequence_n3():
    seq = encoder_sequence(ROW3, IDS)
    assert seq.input_ids == [10, 11, 12, 2, 20, 21, 4, 22, 23, 4, 24, 4, 3]
    assert seq.roles == [P, P, P, P, C, C, L, C, C, L, C, L, A]
    assert seq.steps == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 0]
    assert seq.position_ids == list(range(13))


def test_encoder_sequence_n1_and_n0():
    one = encoder_sequence(ROW1, IDS)
    assert one.input_ids == [10, 11, 12, 2, 20, 21, 4, 3]
    assert one.roles == [P, P, P, P, C, C, L, A]
    assert one.steps == [0, 0, 0, 0, 1, 1, 1, 0]
    empty = encoder_sequence(ROW0, IDS)
    assert empty.input_ids == [10, 11, 12, 2, 3]
    assert empty.roles == [P, P, P, P, A]
    assert empty.steps == [0] * 5 and empty.position_ids == list(range(5))


def test_decoder_sequence_n3_dual_track():
    seq = decoder_sequence(ROW3, IDS)
    # prompt <think> Z_1 S_2     Z_2 S_3 Z_3 </think> answer   end
    assert seq.input_ids == [10, 11, 12, 2, 0, 22, 23, 0, 24, 0, 3, 30, 31, 1]
    assert seq.roles == [P, P, P, P, L, C, C, L, C, L, A, A, A, A]
    assert seq.steps == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 0, 0, 0, 0]
    # <think> at 3; Z_1 4, S_2 5 6; Z_2 5, S_3 6; Z_3 6; </think> 7, answer 8 9, end 10
    assert seq.position_ids == [0, 1, 2, 3, 4, 5, 6, 5, 6, 6, 7, 8, 9, 10]


def test_decoder_sequence_n1_and_n0():
    one = decoder_sequence(ROW1, IDS)
    assert one.input_ids == [10, 11, 12, 2, 0, 3, 30, 31, 1]
    assert one.roles == [P, P, P, P, L, A, A, A, A]
    assert one.steps == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert one.position_ids == list(range(9))
    empty = decoder_sequence(ROW0, IDS)
    assert empty.input_ids == [10, 11, 12, 2, 3, 30, 31, 1]
    assert empty.roles == [P, P, P, P, A, A, A, A]
    assert empty.steps == [0] * 8 and empty.position_ids == list(range(8))


def test_stage2_sequence():
    seq = stage2_sequence(ROW3, IDS)
    assert seq.input_ids == [10, 11, 12, 2, 0, 0, 0, 3, 30, 31, 1]
    assert seq.roles == [P, P, P, P, L, L, L, A, A, A, A]
    assert seq.steps == [0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0]
    assert seq.position_ids == list(range(11))
    assert stage2_sequence(ROW0, IDS).input_ids == decoder_sequence(ROW0, IDS).input_ids


def test_no_placeholder_ids_in_inputs():
    for builder in (encoder_sequence, decoder_sequence, stage2_sequence):
        assert min(builder(ROW3, IDS).input_ids) >= 0


def random_rows(count, seed=0):
    rng = random.Random(seed)
    return [
        make_row(
            [rng.randrange(20, 60) for _ in range(rng.randrange(0, 12))],
            c=rng.randrange(1, 5),
            prompt=[rng.randrange(10, 20) for _ in range(rng.randrange(1, 5))],
            answer=[rng.randrange(30, 40) for _ in range(rng.randrange(0, 3))],
        )
        for _ in range(count)
    ]


def test_decoder_positions_equal_inference_positions_at_latents_and_answer():
    """Property: decoder positions at PROMPT/LATENT/ANSWER slots are the stage-2 (inference) positions."""
    for row in random_rows(50):
        dec, st2 = decoder_sequence(row, IDS), stage2_sequence(row, IDS)
        assert st2.position_ids == list(range(len(st2.input_ids)))
        kept = [(pos, role, step) for pos, role, step in zip(dec.position_ids, dec.roles, dec.steps) if role != C]
        assert kept == list(zip(st2.position_ids, st2.roles, st2.steps))
        # the chunk after Z_i continues pos(Z_i)+1, +2, ...
        for t, role in enumerate(dec.roles):
            if role == C:
                assert dec.position_ids[t] == dec.position_ids[t - 1] + 1
                assert dec.steps[t] == dec.steps[t - 1]


def test_pad_sequences_carries_every_track():
    batch = pad_sequences([decoder_sequence(ROW3, IDS), decoder_sequence(ROW0, IDS)], IDS.pad)
    assert set(batch) == {"input_ids", "roles", "steps", "position_ids", "attention_mask"}
    assert all(t.shape == (2, 14) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"][1].tolist() == [10, 11, 12, 2, 3, 30, 31, 1] + [0] * 6
    assert batch["roles"][1].tolist() == [P, P, P, P, A, A, A, A] + [PAD] * 6
    assert batch["steps"][1].tolist() == [0] * 14
    assert batch["position_ids"][1].tolist() == list(range(8)) + [0] * 6
    assert batch["attention_mask"].tolist() == [[1] * 14, [1] * 8 + [0] * 6]
    assert batch["position_ids"][0].tolist() == decoder_sequence(ROW3, IDS).position_ids


def test_dual_track_position_ids_vectorised_over_a_padded_batch():
    sequences = [decoder_sequence(row, IDS) for row in random_rows(20, seed=1)]
    batch = pad_sequences(sequences, IDS.pad)
    assert torch.equal(dual_track_position_ids(batch["roles"]), batch["position_ids"])


def test_decoder_labels_with_shift():
    batch = pad_sequences([decoder_sequence(ROW3, IDS), decoder_sequence(ROW1, IDS)], IDS.pad)
    labels = labels_from_roles(batch["input_ids"], batch["roles"])
    assert labels[0].tolist() == [I, I, I, I, I, 22, 23, I, 24, I, 3, 30, 31, 1]
    assert labels[1].tolist() == [I, I, I, I, I, 3, 30, 31, 1] + [I] * 5
    # causal shift: position p is scored against labels[p + 1]
    targets = labels[:, 1:]
    from_latent = batch["roles"][:, :-1] == L
    # Z_1 -> first of S_2, Z_2 -> first of S_3, Z_3 (= Z_N) -> </think>; sample 2: Z_1 (= Z_N) -> </think>
    assert targets[from_latent].tolist() == [22, 24, 3, 3]
    # <think> (before Z_1) and the last chunk token before each Z have no target
    before_latent = batch["roles"][:, 1:] == L
    assert (targets[before_latent] == I).all()


def test_cot_sft_sequence_defaults_and_length_check():
    seq = cot_sft_sequence(ROW1, IDS)
    assert seq.steps == [0] * len(seq.input_ids)
    assert seq.position_ids == list(range(len(seq.input_ids)))
    with pytest.raises(ValueError, match="differ in length"):
        TokenSequence(input_ids=[1, 2], roles=[P, P], steps=[0], position_ids=[0, 1])
