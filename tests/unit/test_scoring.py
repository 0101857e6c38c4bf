"""math-verify scoring of the text after </think>."""

import threading

import pytest

from latent_sft_core.data.readers import read_gsm8k_aug_txt
from latent_sft_core.inference import Decoded
from latent_sft_core.scoring import answer_text, is_correct, pass_at_1
from tests.support import GSM8K_AUG_TEST

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("prediction", "gold", "correct"),
    [
        ("18", "18", True),
        ("The answer is 18.", "18", True),
        ("1,000", "1000", True),
        ("1000", "1,000", True),
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\boxed{72}", "72", True),
        ("1450000", "1,450,000", True),
        ("17", "18", False),
        ("x = 18 and then 19", "18", False),
        ("", "18", False),
        ("no number here", "18", False),
    ],
)
def test_is_correct(prediction, gold, correct):
    assert is_correct(prediction, gold) is correct


def test_scoring_works_outside_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(is_correct("The answer is 1,000.", "1000")))
    worker.start()
    worker.join()
    assert results == [True]


def test_pass_at_1_counts_correct_answers():
    assert pass_at_1(["18", "The answer is 5", "7", ""], ["18", "5", "8", "3"]) == 0.5
    assert pass_at_1([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 gold"):
        pass_at_1(["1", "2"], ["1"])


class WordTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_only_the_text_after_think_close_is_an_answer():
    closed = Decoded(reasoning_ids=[4, 5], answer_ids=[1, 8], closed=True)
    assert answer_text(closed, WordTokenizer()) == "1 8"
    unclosed = Decoded(reasoning_ids=[4, 18], answer_ids=[], closed=False)
    assert answer_text(unclosed, WordTokenizer()) == ""


@pytest.mark.skipif(not GSM8K_AUG_TEST.exists(), reason="shared GSM8k-Aug test split not present")
def test_every_real_gsm8k_aug_answer_scores_right_and_its_neighbour_wrong():
    golds = [e.answer for e in read_gsm8k_aug_txt(GSM8K_AUG_TEST, "test").examples]
    assert len(golds) == 1319
    assert pass_at_1([f"The answer is {gold}." for gold in golds], golds) == 1.0
    # the gold plus one, written the way the data set writes numbers (with thousands separators where it does)
    wrong = [f"{float(gold.replace(',', '')) + 1:,.10g}".replace(",", "" if "," not in gold else ",") for gold in golds]
    assert pass_at_1(wrong, golds) == 0.0
