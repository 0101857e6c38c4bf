import pytest

from latent_sft_core.config import Params
from latent_sft_core.evaluation import decoding_warnings

pytestmark = pytest.mark.unit


def test_never_closed_answers_and_an_always_reached_cap_are_named():
    results = {
        "cot_sft": {"test": {"rows": 50, "closed_rate": 0.0}, "val": {"rows": 50, "closed_rate": 0.98}},
        "latent_sft": {"test": {"rows": 50, "closed_rate": 1.0, "capped_rate": 1.0},
                       "val": {"rows": 50, "closed_rate": 1.0, "capped_rate": 0.96},
                       "hard": {"rows": 0, "closed_rate": 0.0, "capped_rate": 0.0}},
    }
    warnings = decoding_warnings(results, Params())
    assert len(warnings) == 2
    assert warnings[0].startswith("cot_sft on test: none of 50 answers closed the reasoning with </think>")
    assert "evaluate.decoding.max_new_tokens=" in warnings[0]
    assert warnings[1].startswith("latent_sft on test: every question reached the latent-step cap "
                                  "(evaluate.decoding.max_latent_steps=32)")
    healthy = {"latent_sft": {"test": {"rows": 50, "closed_rate": 1.0, "capped_rate": 0.2}}}
    assert decoding_warnings(healthy, Params()) == []
