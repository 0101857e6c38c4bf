"""The synthetic generator: determinism, arithmetic of every chain, sizes, ranges and the OOD properties."""

from __future__ import annotations

import hashlib
import json
import re
import statistics

import pytest

from latent_sft_core.config import SyntheticParams
from latent_sft_core.data.schema import Example
from latent_sft_core.data.synthetic import OOD_SPLITS, RESULT_LIMIT_FACTOR, SPLITS, generate_synthetic
from latent_sft_core.errors import DataError

pytestmark = pytest.mark.unit

PARAMS = SyntheticParams(train_size=3000, val_size=100, test_size=300, ood_size=150, max_steps=3)
SEED = 11
STEP = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")
NUMBER = re.compile(r"\d+")
NAMES = {"Tom", "Ann", "Sam", "Mia", "Ben", "Eva"}
# a multiplier or divisor as the question states it: "10 bags of", "10 times as many", "10 equal piles"
FACTOR = re.compile(r"(\d+) (?:bags of|times as many|equal piles)")


@pytest.fixture(scope="module")
def data() -> dict[str, list[Example]]:
    return generate_synthetic(PARAMS, SEED)


def evaluate_chain(chain: str, question: str) -> list[int]:
    """Recompute every step of ``chain``; return the step results. Fails the test on any wrong step."""
    # splitting on one space leaves an empty "step" wherever spacing is not a single space
    steps = chain.split(" ")
    stated = [int(number) for number in NUMBER.findall(question)]
    results: list[int] = []
    for step in steps:
        match = STEP.fullmatch(step)
        assert match, f"not a calculator step: {step!r} in {chain!r}"
        left, symbol, right, result = int(match[1]), match[2], int(match[3]), int(match[4])
        expected = {"+": left + right, "-": left - right, "*": left * right, "/": left // right}[symbol]
        assert result == expected and result > 0, f"wrong step {step!r} in {chain!r}"
        if symbol == "/":
            assert left % right == 0, f"inexact division {step!r}"
        # operands come from the question or from earlier steps: the chain is recoverable from the text
        for operand in (left, right):
            assert operand in stated or operand in results, f"operand {operand} of {step!r} is not in {question!r}"
        results.append(result)
    return results


def test_same_seed_gives_same_rows_and_other_seed_other_rows(data: dict[str, list[Example]]) -> None:
    assert generate_synthetic(PARAMS, SEED) == data
    other = generate_synthetic(PARAMS, SEED + 1)
    for split in SPLITS:
        same = sum(a.question == b.question for a, b in zip(data[split], other[split], strict=True))
        assert same < len(data[split]) / 10, split


def test_sizes_ids_and_labels(data: dict[str, list[Example]]) -> None:
    expected = {"train": 3000, "val": 100, "test": 300, "hard": 150, "reworded": 150, "two_step": 150}
    assert {split: len(rows) for split, rows in data.items()} == expected
    for split, rows in data.items():
        assert len({row.id for row in rows}) == len(rows)
        assert {row.split for row in rows} == {split}
        assert {row.source for row in rows} == {"synthetic"}


def test_every_chain_is_correct_and_ends_in_the_answer(data: dict[str, list[Example]]) -> None:
    for rows in data.values():
        for row in rows:
            for chain in (row.cot, *row.alt_cots):
                assert str(evaluate_chain(chain, row.question)[-1]) == row.answer, chain


def test_train_val_test_rows_are_those_of_the_first_design() -> None:
    # digests of the rows before the OOD splits were redesigned: trained models and tokenizers stay valid
    def digest(rows: list[Example]) -> str:
        content = [[row.id, row.question, row.cot, row.answer, list(row.alt_cots)] for row in rows]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]

    expected = {
        SEED: {"train": "6729d8c7edf74d29", "val": "fc56fd57643460c0", "test": "5121731984081414"},
        0: {"train": "b31db83f3546865a", "val": "b2f340f4c5777137", "test": "159f65ed79c2481d"},
    }
    for params, seed in ((PARAMS, SEED), (SyntheticParams(), 0)):
        data = generate_synthetic(params, seed)
        assert {split: digest(data[split]) for split in ("train", "val", "test")} == expected[seed]


def test_step_counts_within_range(data: dict[str, list[Example]]) -> None:
    for split in ("train", "val", "test", "reworded"):
        counts = {len(row.cot.split(" ")) for row in data[split]}
        assert counts == set(range(PARAMS.min_steps, PARAMS.max_steps + 1)), split
    assert {len(row.cot.split(" ")) for row in data["hard"]} == {PARAMS.max_steps}
    assert {len(row.cot.split(" ")) for row in data["two_step"]} == {2}


def test_numbers_and_results_stay_in_the_trained_range(data: dict[str, list[Example]]) -> None:
    limit = RESULT_LIMIT_FACTOR * PARAMS.max_operand
    for split, rows in data.items():
        max_factor = PARAMS.hard_max_factor if split == "hard" else 9
        for row in rows:
            assert all(2 <= int(n) <= PARAMS.max_operand for n in NUMBER.findall(row.question)), row.question
            assert max(evaluate_chain(row.cot, row.question)) <= limit, row.cot
            # products and quotients are facts of the max_operand x max_factor table
            for left, symbol, right, result in STEP.findall(row.cot):
                if symbol == "*":
                    smaller, larger = sorted((int(left), int(right)))
                    assert smaller <= max_factor and larger <= PARAMS.max_operand, row.cot
                if symbol == "/":
                    assert 2 <= int(right) <= max_factor and int(result) <= PARAMS.max_operand, row.cot


def test_questions_are_short(data: dict[str, list[Example]]) -> None:
    words = [len(row.question.split()) for row in data["train"]]
    assert 12 <= statistics.mean(words) <= 25
    assert max(words) <= 45
    vocabulary = {word.strip(".?,") for row in data["train"] for word in row.question.split()}
    assert len({word for word in vocabulary if not word.isdigit()}) < 80


def _words(rows: list[Example]) -> set[str]:
    return {word.strip(".?") for row in rows for word in row.question.split() if not word.isdigit()}


def test_ood_splits_use_only_words_of_the_training_data(data: dict[str, list[Example]]) -> None:
    for split in OOD_SPLITS:
        assert _words(data[split]) <= _words(data["train"]), split


def test_hard_split_multiplies_or_divides_by_more_than_training_does(data: dict[str, list[Example]]) -> None:
    assert max(int(factor) for row in data["train"] for factor in FACTOR.findall(row.question)) == 9
    for row in data["hard"]:
        assert max(int(factor) for factor in FACTOR.findall(row.question)) == PARAMS.hard_max_factor, row.question


def _sentences(question: str) -> list[str]:
    return re.split(r"(?<=[.?])\s+", question)


def _shape(sentence: str) -> str:
    """A sentence with numbers, names and pronouns blanked: the template it comes from."""
    blanks = {**dict.fromkeys(NAMES, "X"), "He": "X", "She": "X"}
    return " ".join("N" if word.isdigit() else blanks.get(word, word) for word in sentence.split())


def test_reworded_split_names_the_person_and_states_another_ones_items(data: dict[str, list[Example]]) -> None:
    # a chain of n binary steps uses n + 1 stated numbers; reworded problems state one irrelevant number more
    for row in data["train"]:
        assert len(NUMBER.findall(row.question)) == len(row.cot.split(" ")) + 1, row.question
    for row in data["reworded"]:
        assert len(NUMBER.findall(row.question)) == len(row.cot.split(" ")) + 2, row.question
        opening, *middle, question = _sentences(row.question)
        name = opening.split()[0]
        assert question.split()[-3] == name, row.question
        distractors = [sentence for sentence in middle if sentence.split()[0] != name]
        assert len(distractors) == 1, row.question
        other, _, _, item = distractors[0].removesuffix(".").split()
        assert other in NAMES and item not in question, row.question
    starts = {sentence.split()[0] for row in data["reworded"] for sentence in _sentences(row.question)}
    assert not starts & {"He", "She"}
    assert {"He", "She"} <= {sentence.split()[0] for row in data["train"] for sentence in _sentences(row.question)}


def test_two_step_split_joins_both_steps_in_one_sentence_training_never_has(data: dict[str, list[Example]]) -> None:
    train_shapes = {_shape(sentence) for row in data["train"] for sentence in _sentences(row.question)}
    for row in data["two_step"]:
        opening, steps, _ = _sentences(row.question)
        assert len(NUMBER.findall(opening)) == 1 and " and " in steps, row.question
        assert _shape(opening) in train_shapes and _shape(steps) not in train_shapes, row.question


def test_reworded_distractors_is_the_number_of_irrelevant_sentences() -> None:
    params = SyntheticParams(train_size=50, val_size=0, test_size=0, ood_size=30, reworded_distractors=3)
    for row in generate_synthetic(params, SEED)["reworded"]:
        assert len(NUMBER.findall(row.question)) == len(row.cot.split(" ")) + 4, row.question


def test_no_question_shared_between_train_and_other_splits(data: dict[str, list[Example]]) -> None:
    train = {row.question for row in data["train"]}
    evaluation = [row.question for split in SPLITS if split != "train" for row in data[split]]
    assert not train & set(evaluation)
    assert len(evaluation) == len(set(evaluation))


def test_alternative_chains_are_distinct_and_only_on_evaluation_splits(data: dict[str, list[Example]]) -> None:
    for split in ("train", "val"):
        assert all(row.alt_cots == () for row in data[split])
    for split in ("test", *OOD_SPLITS):
        rows = data[split]
        for row in rows:
            assert len(row.alt_cots) <= PARAMS.alt_chains
            assert len(set(row.alt_cots)) == len(row.alt_cots)
            assert row.cot not in row.alt_cots
        assert sum(bool(row.alt_cots) for row in rows) > len(rows) / 2, split


def test_alternative_chains_reorder_independent_steps(data: dict[str, list[Example]]) -> None:
    # sums of two products: some alternative computes the second product first
    sums_of_products = [row for row in data["test"] if re.fullmatch(r"<<\S+\*\S+>> <<\S+\*\S+>> <<\S+\+\S+>>", row.cot)]
    assert sums_of_products
    reordered = 0
    for row in sums_of_products:
        second = row.cot.split(" ")[1]
        reordered += any(alt.split(" ")[0] in (second, _commuted(second)) for alt in row.alt_cots)
    assert reordered > len(sums_of_products) / 3


def _commuted(step: str) -> str:
    left, symbol, right, result = STEP.fullmatch(step).groups()  # type: ignore[union-attr]
    return f"<<{right}{symbol}{left}={result}>>"


def test_zero_sizes_and_zero_alt_chains() -> None:
    params = SyntheticParams(train_size=20, val_size=0, test_size=0, ood_size=0)
    data = generate_synthetic(params, 0)
    assert {split: len(rows) for split, rows in data.items()} == {
        "train": 20,
        "val": 0,
        "test": 0,
        "hard": 0,
        "reworded": 0,
        "two_step": 0,
    }
    no_alts = generate_synthetic(SyntheticParams(train_size=5, test_size=30, alt_chains=0), 0)
    assert all(row.alt_cots == () for row in no_alts["test"])
    # the number of alternatives does not change which problems are drawn
    with_alts = generate_synthetic(SyntheticParams(train_size=5, test_size=30, alt_chains=3), 0)
    assert [row.question for row in with_alts["test"]] == [row.question for row in no_alts["test"]]
    assert any(row.alt_cots for row in with_alts["test"])


def test_problem_space_too_small_is_a_data_error() -> None:
    params = SyntheticParams(
        train_size=1,
        val_size=0,
        test_size=400,
        ood_size=0,
        min_steps=1,
        max_steps=1,
        max_operand=2,
        hard_max_factor=3,
    )
    with pytest.raises(DataError, match="distinct 'test' problems"):
        generate_synthetic(params, 0)
