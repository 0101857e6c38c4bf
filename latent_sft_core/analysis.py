"""Analysis metrics of latent reasoning: ECR@K, N_eff and the Top-2 score (spec section 8).

The paper gives no formula for these; the definitions below are ours, stated here and tested on hand-made
cases. All of them read what the latent model "says" at latent step t: its next-token distribution p_t (the
softmax of the logits that also make the step's alpha), of which the evaluation keeps the most probable tokens
(``evaluate.analysis_top_k``); a token outside the kept ones counts as probability 0.

Step t is aligned with chunk t of a reference chain, the chunks being the ones training used (c consecutive
chain tokens per latent, ``chunking.chunk_bounds``). The reference code's N_eff (deleted from its repository)
matched steps to chunks by the distance between model and encoder latents instead; positional alignment needs
no encoder at evaluation time and is what training teaches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from latent_sft_core.chunking import chunk_bounds
from latent_sft_core.inference import LatentStep

EPSILON = 1e-12


def chain_chunks(chain: Sequence[int], compression_rate: int) -> list[list[int]]:
    """The chain cut into training's chunks S_1..S_N of ``compression_rate`` tokens (the last may be shorter)."""
    bounds = chunk_bounds(len(chain), compression_rate)
    return [list(chain[a:b]) for a, b in zip(bounds, bounds[1:])]


def ecr_at_k(steps: Sequence[LatentStep], chunks: Sequence[Sequence[int]], k: int) -> float | None:
    """ECR@K of one problem: explicit chain tokens carried per latent step.

    ``ECR@K = (1 / T) * sum_{t <= min(T, N)} #{ j : S_t[j] in TopK(p_t) }`` with T the number of latent steps,
    S_t the t-th chunk of the reference chain (N chunks) and TopK(p_t) the K most probable tokens of step t.
    Every position of the chunk counts (a token twice in S_t counts twice); steps beyond the last chunk carry
    nothing. At most c; an explicit CoT step carries its one token, so CoT-SFT has ECR@K = 1 for every K.
    ``None`` when the model took no latent step.
    """
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    if not steps:
        return None
    carried = 0
    for step, chunk in zip(steps, chunks):
        top = set(step.ids[:k])
        carried += sum(token in top for token in chunk)
    return carried / len(steps)


@dataclass(frozen=True)
class PathPosterior:
    """How the latent steps of one problem spread over its M distinct reference chains."""

    posterior: tuple[float, ...]  # over the distinct chains, in the order given
    n_eff: float  # exp(entropy of posterior): 1 (one chain) .. M (all equally likely)
    top2: float  # second-largest posterior / largest: 0 (one chain only) .. 1 (best two tied)


def path_posterior(
    steps: Sequence[LatentStep], chains: Sequence[Sequence[int]], compression_rate: int
) -> PathPosterior | None:
    """N_eff and Top-2 of one problem from its latent steps and its valid reasoning chains.

    Chains equal token for token count once; with fewer than two distinct chains, or no latent step, the
    problem has no score (``None``). For chain m with chunks S_{m,1..N_m} and A_m = min(T, N_m) aligned steps:

    ``score_m = (1 / A_m) * sum_{t <= A_m} log(sum_{v in set(S_{m,t})} p_t(v) + 1e-12)``

    (``log 1e-12`` when A_m = 0: an empty chain explains nothing). ``posterior = softmax(score)``,
    ``N_eff = exp(-sum posterior * log posterior)``, ``Top-2 = posterior_(2) / posterior_(1)``.
    """
    distinct = list(dict.fromkeys(tuple(chain) for chain in chains))
    if len(distinct) < 2 or not steps:
        return None
    distributions = [dict(zip(step.ids, step.probs)) for step in steps]
    scores = []
    for chain in distinct:
        chunks = chain_chunks(chain, compression_rate)
        aligned = min(len(steps), len(chunks))
        if aligned == 0:
            scores.append(math.log(EPSILON))
            continue
        mass = (sum(p.get(v, 0.0) for v in set(chunk)) for p, chunk in zip(distributions, chunks))
        scores.append(sum(math.log(m + EPSILON) for m in mass) / aligned)
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    posterior = tuple(w / total for w in weights)
    entropy = -sum(p * math.log(p) for p in posterior if p > 0)
    first, second = sorted(posterior, reverse=True)[:2]
    return PathPosterior(posterior=posterior, n_eff=math.exp(entropy), top2=second / first)
