"""The collapse guard's statistics and verdict on hand-made alphas."""

import logging
import math

import pytest
import torch

from latent_sft_core.config import CollapseGuardParams
from latent_sft_core.latent_health import AlphaHealth, LatentCollapseError, report_health
from latent_sft_core.soft_embedding import SparseAlpha

pytestmark = pytest.mark.unit
GUARD = CollapseGuardParams()


def test_statistics_of_a_small_hand_made_alpha():
    alpha = SparseAlpha(
        ids=torch.tensor([[5, 6, 7], [8, 5, 9]]),
        probs=torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]),
    )
    chunks = [[6, 1], [9, 9, 2]]
    health = AlphaHealth(top_k=2)
    health.update(alpha, chunks)
    stats = health.summary(GUARD)
    entropy = [-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)),
               -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))]
    assert stats["latents"] == 2
    assert stats["mean_entropy"] == pytest.approx(sum(entropy) / 2, abs=1e-4)
    assert stats["distinct_top1"] == 1  # both rows put most mass on token 5
    assert stats["distinct_chunk_tokens"] == 4  # {6, 1, 9, 2}
    assert stats["mass_outside_top1"] == pytest.approx((0.5 + 0.4) / 2)
    # top-2: row 1 {5, 6} holds 6 (1 of [6, 1]); row 2 {5, 9} holds 9 twice (2 of [9, 9, 2])
    assert stats["chunk_ecr@2"] == pytest.approx((1 + 2) / 2)
    # mass on the chunk's tokens: row 1 alpha(6) = 0.3; row 2 alpha(9) = 0.3
    assert stats["chunk_mass"] == pytest.approx(0.3)
    # one top-1 token for four chunk tokens (0.25 < 0.3) is a collapse; the chunk mass (0.3) is not
    assert stats["collapsed"] is True and len(stats["collapse_reasons"]) == 1
    assert "distinct top-1" in stats["collapse_reasons"][0]


def test_dense_alpha_is_read_over_the_whole_vocabulary():
    probs = torch.tensor([[0.1, 0.7, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    health = AlphaHealth(top_k=1)
    health.update(SparseAlpha(ids=None, probs=probs), [[1], [3, 0]])
    stats = health.summary(GUARD)
    assert stats["distinct_top1"] == 2  # token 1, and token 0 for the uniform row (first of the ties)
    assert stats["chunk_mass"] == pytest.approx((0.7 + 0.5) / 2)
    assert stats["chunk_ecr@1"] == pytest.approx((1 + 1) / 2)


def test_batches_accumulate_like_one_batch():
    ids = torch.tensor([[1, 2], [3, 4], [2, 1]])
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]])
    chunks = [[1], [4, 5], [7]]
    whole, parts = AlphaHealth(top_k=2), AlphaHealth(top_k=2)
    whole.update(SparseAlpha(ids, probs), chunks)
    parts.update(SparseAlpha(ids[:1], probs[:1]), chunks[:1])
    parts.update(SparseAlpha(ids[1:], probs[1:]), chunks[1:])
    assert parts.summary(GUARD) == whole.summary(GUARD)


def collapsed_alpha(latents: int, vocabulary: int) -> tuple[SparseAlpha, list[list[int]]]:
    """Every latent ~one-hot on token 0, whatever its chunk (the collapse seen on a fresh clone)."""
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randint(1, vocabulary, (4,), generator=generator).tolist() for _ in range(latents)]
    ids = torch.stack([torch.tensor([0, *chunk[:2]]) for chunk in chunks])
    probs = torch.tensor([[0.9996, 0.0002, 0.0002]]).expand(latents, 3)
    return SparseAlpha(ids, probs), chunks


def test_a_collapsed_alpha_is_reported_with_both_reasons():
    alpha, chunks = collapsed_alpha(200, 100)
    health = AlphaHealth(top_k=3)
    health.update(alpha, chunks)
    stats = health.summary(GUARD)
    assert stats["distinct_top1"] == 1
    assert stats["distinct_top1_fraction"] < 0.02
    # the tail lists chunk tokens (ECR counts them) but carries no mass: ECR alone would not see the collapse
    assert stats["chunk_ecr@3"] >= 2
    assert stats["chunk_mass"] < 0.001
    assert stats["collapsed"] is True
    assert len(stats["collapse_reasons"]) == 2
    assert "distinct top-1" in stats["collapse_reasons"][0] and "min_chunk_mass" in stats["collapse_reasons"][1]


def test_a_superposition_over_its_chunk_is_healthy():
    generator = torch.Generator().manual_seed(1)
    chunks = [torch.randint(0, 100, (4,), generator=generator).tolist() for _ in range(200)]
    ids = torch.tensor([[chunk[0], chunk[1], 100] for chunk in chunks])
    probs = torch.tensor([[0.5, 0.3, 0.2]]).expand(200, 3)
    health = AlphaHealth(top_k=3)
    health.update(SparseAlpha(ids, probs), chunks)
    stats = health.summary(GUARD)
    assert stats["collapsed"] is False
    assert stats["distinct_top1_fraction"] > 0.5


def test_thresholds_come_from_params():
    alpha, chunks = collapsed_alpha(50, 100)
    health = AlphaHealth(top_k=3)
    health.update(alpha, chunks)
    lenient = CollapseGuardParams(min_distinct_top1_fraction=0.0, min_chunk_mass=0.0)
    assert health.summary(lenient)["collapsed"] is False


def test_report_warns_loudly_or_fails(caplog):
    alpha, chunks = collapsed_alpha(50, 100)
    health = AlphaHealth(top_k=3)
    health.update(alpha, chunks)
    stats = health.summary(GUARD)
    with caplog.at_level(logging.WARNING, logger="latent_sft_core.latent_health"):
        report_health("train_joint (validation)", stats, GUARD)
    assert "train_joint (validation): THE LATENTS HAVE COLLAPSED" in caplog.text
    with pytest.raises(LatentCollapseError, match="distinct top-1"):
        report_health("train_joint", stats, CollapseGuardParams(on_collapse="error"))
    report_health("healthy", {"collapsed": False}, CollapseGuardParams(on_collapse="error"))  # no error


def test_mismatched_chunks_are_an_error():
    with pytest.raises(ValueError, match="2 latents but 1 chunks"):
        AlphaHealth(top_k=1).update(SparseAlpha(torch.tensor([[1], [2]]), torch.ones(2, 1)), [[1]])


def test_a_broad_alpha_with_little_mass_on_its_chunk_is_collapsed():
    """The 8-layer base at temperature 4: many distinct top-1 tokens, alpha near-uniform over its k tokens, 0.08
    of it on the chunk, and a 31% phase-1 ceiling. Distinct tokens alone would call it healthy."""
    generator = torch.Generator().manual_seed(2)
    chunks = [torch.randint(0, 100, (4,), generator=generator).tolist() for _ in range(200)]
    others = [[(chunk[0] + shift) % 100 + 100 for shift in range(1, 10)] for chunk in chunks]
    ids = torch.tensor([[other[0], *other[1:5], chunk[0], *other[5:]] for chunk, other in zip(chunks, others)])
    probs = torch.tensor([[0.12, 0.1, 0.1, 0.1, 0.1, 0.08, 0.1, 0.1, 0.1, 0.1]]).expand(200, 10)
    health = AlphaHealth(top_k=10)
    health.update(SparseAlpha(ids, probs), chunks)
    stats = health.summary(GUARD)
    assert stats["chunk_mass"] == pytest.approx(0.08)
    assert stats["distinct_top1_fraction"] > 0.5
    assert stats["collapsed"] is True
    assert stats["collapse_reasons"] == [
        "alpha puts 0.08 of its mass on its own chunk's tokens (< collapse_guard.min_chunk_mass=0.1)"]
