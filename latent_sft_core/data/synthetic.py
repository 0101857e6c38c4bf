"""A synthetic GSM8k-Aug-style data set that a tiny model can learn on a laptop CPU in minutes.

Each problem is a few short English sentences; its chain is a list of calculator steps ``<<a op b=c>>``
joined by single spaces, and its answer is the result of the last step. The arithmetic is kept learnable:
integers only, exact divisions, no negative (or zero) result anywhere, multipliers and divisors between 2
and 9 (``config.SYNTHETIC_MAX_FACTOR``), every other stated number between 2 and ``max_operand``, every
product and quotient a fact of the ``max_operand`` x 9 multiplication table, and every result at most
``RESULT_LIMIT_FACTOR * max_operand``.

A problem is an expression tree rendered by sentence templates:

- an opening that fixes the starting quantity, with 0 to 3 steps of its own
  ("Tom has 5 apples." / "Ann buys 3 bags of 4 pens and 2 bags of 5." -> ``<<3*4=12>> <<2*5=10>> <<12+10=22>>``),
- then one sentence per further step, each changing the running quantity
  ("He buys 3 more." -> ``<<5+3=8>>``, "He gives away 2." -> ``<<8-2=6>>``),
- then the question. Each sentence maps to exactly one operation (``two_step`` aside), so the chain follows
  from the text.

Splits: ``train``, ``val``, ``test`` (in-distribution; ``val`` only picks checkpoints) and three
out-of-distribution evaluation splits. Each changes one thing and keeps the rest of training: its words
(the byte-level tokenizer is trained on ``train``, and a tiny model cannot even copy a number it never saw in
a question) and its stated numbers 2..``max_operand``:

- ``hard`` (like GSM-Hard: the same problems, harder computation): every problem has the longest trained
  chain, ``max_steps`` steps, and multiplies or divides by a number above 9, up to ``hard_max_factor``
  ("Tom buys 10 bags of 7 pens.", "He splits them into 10 equal piles and keeps one.");
- ``reworded`` (like SVAMP: other wording and irrelevant information): the steps name the person instead of
  a pronoun ("Tom buys 3 more.") and ``reworded_distractors`` sentences about another person's other items
  ("Ann has 7 pens."), made from the opening template, stand anywhere between the opening and the question;
- ``two_step`` (like MultiArith: simple two-step problems): a starting quantity, then both steps in one
  sentence ("Tom has 5 apples. He buys 3 more and gives away 2."), where training gives each further step
  a sentence of its own.

A first design took numbers up to 100 for ``hard`` and sentence templates never seen in training for
``reworded``: the tiny CoT-SFT model scored about 1% on both (and 99% on plain two-step problems), so they
could not tell methods apart. Chains longer than ``max_steps`` are no better a test for it: it stops after
``max_steps`` steps, about 5% right at one step more. With the splits above the same model (93% on ``test``)
scores about 69% on ``hard``, 55% on ``reworded`` and 44% on ``two_step``.

No split shares a question with ``train`` or with another evaluation split. Evaluation splits other than
``val`` carry up to ``alt_chains`` alternative chains per problem: the same computation with commutable terms
or independent sub-results in another order.

Everything is derived from ``seed`` through split-local ``random.Random`` instances, so the same params and
seed give the same rows; changing one split's size or ``alt_chains`` does not change the problems of another
split except through the de-duplication.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice, permutations, product

from latent_sft_core.config import SyntheticParams
from latent_sft_core.data.schema import Example
from latent_sft_core.errors import DataError

IN_DISTRIBUTION_SPLITS = ("train", "val", "test")
OOD_SPLITS = ("hard", "reworded", "two_step")
SPLITS = IN_DISTRIBUTION_SPLITS + OOD_SPLITS

RESULT_LIMIT_FACTOR = 10
# alternative chains are drawn from at most this many enumerated candidates (permutations grow factorially)
_MAX_CANDIDATE_CHAINS = 200
# a split gives up (DataError) after this many tries per requested row: the problem space is too small
_ATTEMPTS_PER_ROW = 50

_NAMES = (("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"), ("Eva", "she"))
_ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins", "shells", "stamps")


# ------------------------------------------------------------------------------------ expression trees


@dataclass(frozen=True)
class _Num:
    value: int


@dataclass(frozen=True)
class _Op:
    symbol: str
    left: _Node
    right: _Node
    value: int


_Node = _Num | _Op


def _apply(symbol: str, left: int, right: int) -> int | None:
    """The result of one calculator step, or None when it would leave the positive integers."""
    if symbol == "+":
        return left + right
    if symbol == "-":
        return left - right if left > right else None
    if symbol == "*":
        return left * right
    return left // right if left % right == 0 else None


def _op(symbol: str, left: _Node, right: _Node) -> _Op:
    value = _apply(symbol, left.value, right.value)
    if value is None:
        raise ValueError(f"invalid step {left.value}{symbol}{right.value}")  # a generator bug, not bad data
    return _Op(symbol, left, right, value)


def _step(left: int, symbol: str, right: int, result: int) -> str:
    return f"<<{left}{symbol}{right}={result}>>"


def _canonical_chain(node: _Node) -> tuple[str, ...]:
    """Post-order steps: sub-results left to right, in the order the question states them."""
    if isinstance(node, _Num):
        return ()
    return (
        _canonical_chain(node.left)
        + _canonical_chain(node.right)
        + (_step(node.left.value, node.symbol, node.right.value, node.value),)
    )


def _terms(node: _Node, family: str) -> list[tuple[str, _Node]]:
    """Flatten a left-nested run of ``family`` operations (``"+-"`` or ``"*/"``) into signed terms."""
    if isinstance(node, _Op) and node.symbol in family:
        return [*_terms(node.left, family), (node.symbol, node.right)]
    return [(family[0], node)]


def _equivalent_chains(node: _Node) -> Iterator[tuple[str, ...]]:
    """Chains computing ``node`` with the terms of each +/- or */ run in every order that stays valid.

    ``a+b-c`` may become ``a-c+b`` or ``b+a-c`` (only when no step goes negative or inexact); sub-results
    are computed just before the step that uses them, so independent sub-results change order too.
    """
    if isinstance(node, _Num):
        yield ()
        return
    family = "+-" if node.symbol in "+-" else "*/"
    terms = _terms(node, family)
    sub_chains = [list(islice(_equivalent_chains(term), _MAX_CANDIDATE_CHAINS)) for _, term in terms]
    for order in permutations(range(len(terms))):
        if terms[order[0]][0] != family[0]:
            continue  # a chain cannot start by subtracting or dividing
        for choice in product(*(sub_chains[index] for index in order)):
            first = terms[order[0]][1]
            value, steps = first.value, list(choice[0])
            for index, term_chain in zip(order[1:], choice[1:], strict=True):
                symbol, term = terms[index]
                result = _apply(symbol, value, term.value)
                if result is None:
                    break
                steps += [*term_chain, _step(value, symbol, term.value, result)]
                value = result
            else:
                yield tuple(steps)


def _alternative_chains(node: _Node, count: int, rng: random.Random) -> tuple[str, ...]:
    """Up to ``count`` valid chains for ``node`` that differ from its canonical chain and from each other."""
    canonical = _canonical_chain(node)
    candidates = dict.fromkeys(islice(_equivalent_chains(node), _MAX_CANDIDATE_CHAINS))
    candidates.pop(canonical, None)
    chosen = rng.sample(list(candidates), min(count, len(candidates)))
    return tuple(" ".join(chain) for chain in chosen)


# ------------------------------------------------------------------------------------------- wording


@dataclass(frozen=True)
class _Wording:
    """Sentence templates. Openings are indexed by their number of steps; ``steps`` by operation."""

    openings: tuple[str, str, str, str]
    steps: dict[str, str]
    question: str


_WORDING = _Wording(
    openings=(
        "{name} has {s} {item}.",
        "{name} buys {a} bags of {b} {item}.",
        "{name} has {s} {item} and buys {a} bags of {b}.",
        "{name} buys {a} bags of {b} {item} and {c} bags of {d}.",
    ),
    steps={
        "+": "{pronoun} buys {n} more.",
        "-": "{pronoun} gives away {n}.",
        "*": "{pronoun} now has {n} times as many.",
        "/": "{pronoun} splits them into {n} equal piles and keeps one.",
    },
    question="How many {item} does {name} have now?",
)


# ------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class _SplitStyle:
    min_steps: int
    max_steps: int
    max_operand: int
    max_factor: int
    # every problem multiplies or divides by at least this once (the 'hard' split; 0: no requirement)
    min_largest_factor: int = 0
    # the steps name the person instead of a pronoun (the 'reworded' split)
    names_in_steps: bool = False
    # sentences about another person's other items (the 'reworded' split)
    distractors: int = 0
    # an opening without steps, then all further steps in one sentence (the 'two_step' split)
    joined_steps: bool = False
    alt_chains: int = 0


class _Dead(Exception):
    """The random choices led nowhere (no valid next step); the caller draws a new problem."""


class _ProblemDrawer:
    """Draws one random problem (question text and expression tree) in a given style."""

    def __init__(self, rng: random.Random, style: _SplitStyle) -> None:
        self.rng = rng
        self.style = style
        self.result_limit = RESULT_LIMIT_FACTOR * style.max_operand
        self.largest_factor = 0  # of the problem being drawn

    def number(self) -> int:
        return self.rng.randint(2, self.style.max_operand)

    def factor(self) -> int:
        return self._record_factor(self.rng.randint(2, self.style.max_factor))

    def _record_factor(self, factor: int) -> int:
        self.largest_factor = max(self.largest_factor, factor)
        return factor

    def draw(self) -> tuple[str, _Node]:
        while True:
            self.largest_factor = 0
            try:
                question, tree = self._attempt()
            except _Dead:
                continue
            if self.largest_factor >= self.style.min_largest_factor:
                return question, tree

    def _attempt(self) -> tuple[str, _Node]:
        rng, style = self.rng, self.style
        total_steps = rng.randint(style.min_steps, style.max_steps)
        opening_steps = 0 if style.joined_steps else rng.randint(0, min(3, total_steps))
        name, pronoun = rng.choice(_NAMES)
        item = rng.choice(_ITEMS)
        subject = name if style.names_in_steps else pronoun
        tree, slots = self._opening(opening_steps)
        sentences = [_WORDING.openings[opening_steps].format(name=name, item=item, **slots)]
        for _ in range(total_steps - opening_steps):
            tree = self._next_step(tree)
            sentence = _WORDING.steps[tree.symbol].format(pronoun=subject, n=tree.right.value)
            sentences.append(sentence[0].upper() + sentence[1:])
        if style.joined_steps:
            # "He buys 3 more." + "He gives away 2." -> "He buys 3 more and gives away 2."
            first, *others = (sentence.removesuffix(".") for sentence in sentences[1:])
            sentences[1:] = [" and ".join([first, *(other.split(" ", 1)[1] for other in others)]) + "."]
        for _ in range(style.distractors):
            other = rng.choice([candidate for candidate, _ in _NAMES if candidate != name])
            other_item = rng.choice([candidate for candidate in _ITEMS if candidate != item])
            distractor = _WORDING.openings[0].format(name=other, s=self.number(), item=other_item)
            sentences.insert(rng.randint(1, len(sentences)), distractor)
        sentences.append(_WORDING.question.format(name=name, item=item))
        return " ".join(sentences), tree

    def _opening(self, steps: int) -> tuple[_Node, dict[str, int]]:
        if steps == 0:
            slots = {"s": self.number()}
            tree: _Node = _Num(slots["s"])
        elif steps == 1:
            slots = {"a": self.factor(), "b": self.number()}
            tree = self._product(slots["a"], slots["b"])
        elif steps == 2:
            slots = {"s": self.number(), "a": self.factor(), "b": self.number()}
            tree = _op("+", _Num(slots["s"]), self._product(slots["a"], slots["b"]))
        else:
            slots = {"a": self.factor(), "b": self.number(), "c": self.factor(), "d": self.number()}
            tree = _op("+", self._product(slots["a"], slots["b"]), self._product(slots["c"], slots["d"]))
        if tree.value > self.result_limit:
            raise _Dead
        return tree, slots

    @staticmethod
    def _product(count: int, size: int) -> _Op:
        return _op("*", _Num(count), _Num(size))

    def _next_step(self, tree: _Node) -> _Op:
        """One operation on the running quantity, chosen among those that keep every rule."""
        value, limit, max_factor = tree.value, self.result_limit, self.style.max_factor
        choices: list[tuple[str, list[int]]] = [
            ("+", list(range(2, min(self.style.max_operand, limit - value) + 1))),
            ("-", list(range(2, min(self.style.max_operand, value - 1) + 1))),
            # products and quotients stay facts of the max_operand x max_factor table: no long arithmetic
            ("*", [k for k in range(2, max_factor + 1) if value <= self.style.max_operand and value * k <= limit]),
            ("/", [k for k in range(2, max_factor + 1) if value % k == 0 and value // k <= self.style.max_operand]),
        ]
        feasible = [(symbol, operands) for symbol, operands in choices if operands]
        if not feasible:
            raise _Dead
        symbol, operands = self.rng.choice(feasible)
        operand = self.rng.choice(operands)
        return _op(symbol, tree, _Num(self._record_factor(operand) if symbol in "*/" else operand))


# ------------------------------------------------------------------------------------------- splits


def _split_styles(params: SyntheticParams) -> list[tuple[str, int, _SplitStyle]]:
    def style(**overrides: object) -> _SplitStyle:
        settings: dict[str, object] = {
            "min_steps": params.min_steps,
            "max_steps": params.max_steps,
            "max_operand": params.max_operand,
            "max_factor": params.max_factor,
            "alt_chains": params.alt_chains,
        }
        settings.update(overrides)
        return _SplitStyle(**settings)  # type: ignore[arg-type]

    return [
        ("train", params.train_size, style(alt_chains=0)),
        ("val", params.val_size, style(alt_chains=0)),
        ("test", params.test_size, style()),
        (
            "hard",
            params.ood_size,
            style(
                min_steps=params.max_steps,
                max_factor=params.hard_max_factor,
                min_largest_factor=params.max_factor + 1,
            ),
        ),
        ("reworded", params.ood_size, style(names_in_steps=True, distractors=params.reworded_distractors)),
        ("two_step", params.ood_size, style(min_steps=2, max_steps=2, joined_steps=True)),
    ]


def generate_synthetic(params: SyntheticParams, seed: int) -> dict[str, list[Example]]:
    """Generate every split in ``SPLITS`` (empty lists for size 0); deterministic for ``params`` and ``seed``.

    Train may repeat a question (as augmented GSM8k does); an evaluation split never repeats one, nor uses
    one from train or from an earlier evaluation split. A DataError says when the requested sizes do not
    fit in the problem space the params allow.
    """
    train_questions: set[str] = set()
    evaluation_questions: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for split, size, style in _split_styles(params):
        drawer = _ProblemDrawer(random.Random(f"latent-sft-synthetic:{seed}:{split}"), style)
        # a separate stream, so that the number of alternative chains does not change the problems drawn
        alternatives_rng = random.Random(f"latent-sft-synthetic:{seed}:{split}:alternatives")
        examples: list[Example] = []
        for _ in range(size * _ATTEMPTS_PER_ROW):
            if len(examples) == size:
                break
            question, tree = drawer.draw()
            if split != "train":
                if question in train_questions or question in evaluation_questions:
                    continue
                evaluation_questions.add(question)
            else:
                train_questions.add(question)
            alt_cots = _alternative_chains(tree, style.alt_chains, alternatives_rng) if style.alt_chains else ()
            examples.append(
                Example(
                    id=f"{split}-{len(examples)}",
                    split=split,
                    question=question,
                    cot=" ".join(_canonical_chain(tree)),
                    answer=str(tree.value),
                    source="synthetic",
                    alt_cots=alt_cots,
                )
            )
        if len(examples) < size:
            raise DataError(
                f"synthetic data: found only {len(examples)} distinct '{split}' problems of {size} requested; "
                "raise max_operand / max_steps or lower the split sizes"
            )
        splits[split] = examples
    return splits
