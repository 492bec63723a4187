"""Small tasks the library makes itself, for demos and for tests that need no data files.

``word_problems`` writes one-step arithmetic word problems from templates with a seed: the same
seed always gives the same questions, and the train and test splits never share a question. They
exist because the embedded 135M model solves almost no GSM8K or SVAMP question zero-shot; on
these its accuracy sits between the floor and the ceiling, so differences between prompting
methods show (see the demo's notes in the README).

No answer is ever one of the question's own numbers: the metric reads the last number of a
reply, so a reply that only echoes a number of the question would otherwise score (it did: the
"larger of two counts" questions this module used to write were right about half the time for a
model that repeats the last number it read).
"""

from __future__ import annotations

import random
from typing import Sequence

import dspy

from ..metrics import numbers_in

OPERATIONS = ("add", "sub", "mul", "div", "compare")

#: The mixture behind the ``"words"`` dataset (the demo's task): additions and "how many more"
#: comparisons with operands <= 10. Measured on the embedded SmolLM2-135M when "compare" still
#: asked for the larger count (JSON schemas enforced, greedy, 40 test questions, 1 run;
#: ``benchmarks/demo_tasks.py``): zero-shot 10/40, zero-shot CoT 8/40, untrained prompter 3/40 --
#: inside the 10-70% band where methods can differ, unlike GSM8K (1/50) or all four operations
#: (1/50). Not measured again since compare asks for the difference.
DEMO_OPERATIONS = ("add", "compare")
DEMO_MAX_NUMBER = 10

_NAMES = ("Tom", "Anna", "Ravi", "Mia", "Lee", "Sara", "Omar", "Lena", "Jon", "Ada", "Kofi", "Yuki")
_ITEMS = ("apples", "books", "stickers", "marbles", "pencils", "cookies", "cards", "shells", "coins", "balloons")

# one template list per operation; {a} and {b} are the operands, the answer is a (op) b
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
        "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in all?",
        "{name} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {name} collect?",
    ),
    "sub": (
        "{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?",
        "There were {a} {item} in a jar. {name} took {b} {item} out. How many {item} are in the jar now?",
        "{name} wants {a} {item} and already has {b}. How many more {item} does {name} need?",
    ),
    "mul": (
        "{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?",
        "Each of {a} children has {b} {item}. How many {item} do the children have together?",
        "{name} puts {b} {item} on each of {a} shelves. How many {item} are on the shelves?",
    ),
    "compare": (
        "{name} has {a} {item} and {other} has {b} {item}. How many more {item} does the one with more {item} have?",
        "A red box holds {a} {item} and a blue box holds {b} {item}. How many more {item} are in the fuller box?",
        "{name} counted {a} {item} on Monday and {b} {item} on Tuesday. By how much is the larger count bigger?",
    ),
    "div": (
        "{name} shares {c} {item} equally among {a} friends. How many {item} does each friend get?",
        "{c} {item} are packed into boxes of {b}. How many boxes are filled?",
        "{name} splits {c} {item} into {a} equal piles. How many {item} are in each pile?",
    ),
}


def _problem(rng: random.Random, operation: str, max_number: int) -> tuple[str, int]:
    """One question and its answer; drawn again until the answer is none of the question's numbers."""
    while True:
        question, answer = _draw(rng, operation, max_number)
        if answer not in numbers_in(question):
            return question, answer


def _draw(rng: random.Random, operation: str, max_number: int) -> tuple[str, int]:
    template = rng.choice(_TEMPLATES[operation])
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, max_number), rng.randint(2, max_number)
    other = rng.choice([n for n in _NAMES if n != name])
    if operation == "add":
        answer = a + b
    elif operation == "compare":
        while b == a:
            b = rng.randint(2, max_number)
        answer = abs(a - b)
    elif operation == "sub":
        a, b = max(a, b) + 1, min(a, b)  # a positive difference
        answer = a - b
    elif operation == "mul":
        a, b = rng.randint(2, min(max_number, 10)), rng.randint(2, min(max_number, 10))
        answer = a * b
    else:  # division without remainder: c = a * b items into a groups (or groups of b)
        a, b = rng.randint(2, min(max_number, 10)), rng.randint(2, min(max_number, 10))
        answer = b if "{a}" in template else a
    question = template.format(name=name, other=other, item=item, a=a, b=b, c=a * b)
    return question, answer


def word_problems(
    n: int,
    *,
    split: str = "test",
    seed: int = 0,
    operations: Sequence[str] = OPERATIONS,
    max_number: int = 20,
) -> list[dspy.Example]:
    """``n`` one-step arithmetic word problems as ``dspy.Example``s (``question`` -> ``answer``).

    Args:
        n: how many questions.
        split: ``"train"`` or ``"test"``; the two splits of one seed never share a question.
        seed: the same seed and arguments give the same questions.
        operations: any of ``"add"``, ``"sub"``, ``"mul"``, ``"div"`` and ``"compare"`` (how
            many more the larger of two counts is), spread evenly.
        max_number: largest operand of additions and subtractions (products use factors <= 10).

    Raises:
        ValueError: bad ``n``, ``split``, operation or ``max_number``, or fewer distinct
            questions exist than asked for.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ValueError(f"operations must be among {OPERATIONS}, got {list(operations)}")
    if not isinstance(max_number, int) or max_number < 3:
        raise ValueError(f"max_number must be an int >= 3, got {max_number!r}")
    # one stream for both splits: a question goes to the split its hash picks, so a question
    # never appears in both, and asking for more train questions never changes the test ones
    rng = random.Random(f"trprompt-word-problems-{seed}-{','.join(operations)}-{max_number}")
    seen: set[str] = set()
    examples: list[dspy.Example] = []
    for attempt in range(200 * n + 1000):
        operation = operations[attempt % len(operations)]
        question, answer = _problem(rng, operation, max_number)
        if question in seen:
            continue
        seen.add(question)
        in_test = random.Random(question).random() < 0.5
        if in_test != (split == "test"):
            continue
        examples.append(
            dspy.Example(
                id=f"words-{split}-{len(examples)}", question=question, answer=str(answer), operation=operation
            ).with_inputs("question")
        )
        if len(examples) == n:
            return examples
    raise ValueError(f"only {len(examples)} distinct {split} questions exist for these settings (asked for {n})")
