"""Which questions the search sees: the held-out split and the minibatches.

Both draw from one ``random.Random`` seeded by ``RewardSearchConfig.seed``, so a search with the
same seed sees the same questions in the same order.
"""

from __future__ import annotations

import random
from typing import Sequence

import dspy


def split_trainset(
    trainset: Sequence[dspy.Example],
    heldout: Sequence[dspy.Example] | None,
    *,
    heldout_size: int,
    minibatch_size: int,
    rng: random.Random,
) -> tuple[list, list]:
    """``(pool, heldout)``: the examples minibatches are drawn from, and the held-out ones.

    An explicit ``heldout`` leaves the whole trainset to the pool; else ``heldout_size`` random
    examples are held out (both parts keep the trainset's order).

    Raises:
        ValueError: the pool is smaller than one minibatch, or an example has no ``question``.
    """
    trainset = list(trainset)
    if heldout is not None:
        heldout, pool = list(heldout), trainset
    else:
        order = list(range(len(trainset)))
        rng.shuffle(order)
        cut = len(order) - heldout_size
        pool = [trainset[i] for i in sorted(order[:cut])]
        heldout = [trainset[i] for i in sorted(order[cut:])] if heldout_size else []
    if len(pool) < minibatch_size:
        held = f" after holding out {len(heldout)}" if heldout else ""
        raise ValueError(
            f"the trainset leaves {len(pool)} examples for minibatches{held}, fewer than "
            f"minibatch_size={minibatch_size}; pass more examples or lower minibatch_size/heldout_size"
        )
    for example in pool + heldout:
        if "question" not in example:
            raise ValueError(f"every example needs a 'question' field; got keys {list(example.keys())}")
    return pool, heldout


class MinibatchSampler:
    """Minibatches without replacement within an epoch; reshuffled every epoch."""

    def __init__(self, pool: Sequence[dspy.Example], size: int, rng: random.Random):
        self.pool, self.size, self.rng = list(pool), size, rng
        self.order: list[int] = []

    def next(self) -> list[dspy.Example]:
        """The next ``size`` examples."""
        if len(self.order) < self.size:
            fresh = list(range(len(self.pool)))
            self.rng.shuffle(fresh)
            # Keep the epoch's leftovers first so every example is seen once per epoch; the rest
            # comes from the new shuffle without repeating a leftover in the same minibatch.
            left = set(self.order)
            self.order = self.order + [i for i in fresh if i not in left] + [i for i in fresh if i in left]
        batch, self.order = self.order[: self.size], self.order[self.size :]
        return [self.pool[i] for i in batch]


__all__ = ["MinibatchSampler", "split_trainset"]
