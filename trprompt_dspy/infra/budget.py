"""Hard caps on a compile: LM calls, dollars and wall time (``TRPromptConfig.max_lm_calls``,
``max_cost_usd``, ``max_wall_s``).

A :class:`Budget` reads the compile's :class:`~trprompt_dspy.infra.usage.UsageMeter` and clock.
It is checked between LM calls, never inside one: before each stage of a round, and before each
item of every batch (``infra.parallel.run_parallel`` finds the budget in the DSPy settings under
:data:`BUDGET_SETTING`, which DSPy carries into its worker threads). Once a cap is reached no
new item starts; items already in flight finish and are kept (a rollout's records are written),
so a compile may end a few calls past ``max_lm_calls``, at most one item per thread. The batch
then raises :class:`BudgetExceeded`, its stage is not marked done, and the compile returns the
best round completed so far; compiling again with the same ``log_dir`` and a larger cap goes on.

Caps count from the start of one ``compile`` call: a resumed compile gets the whole budget
again (what earlier calls spent is in their reports). Cache hits are not LM calls and cost
nothing. Local models have no price, so ``max_cost_usd`` only ever counts the API roles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import dspy

from ..errors import TRPromptError

#: the key of the active budget in ``dspy.settings`` (set by the compile with ``dspy.context``)
BUDGET_SETTING = "trprompt_budget"

#: the caps, as named in ``TRPromptConfig`` and (with dashes) on the command line
CAPS = ("max_lm_calls", "max_cost_usd", "max_wall_s")


class BudgetExceeded(TRPromptError, RuntimeError):
    """A cap of the compile was reached; ``cap`` names it (one of :data:`CAPS`)."""

    def __init__(self, cap: str, message: str):
        super().__init__(message)
        self.cap = cap


@dataclass
class Budget:
    """The caps of one compile over its usage meter (``None``: no cap of that kind).

    Args:
        meter: anything with ``totals()`` -> ``{"calls": int, "cost_usd": float | None, ...}``.
        max_lm_calls: LM calls (not cache hits), every role together.
        max_cost_usd: dollars of the priced (API) calls, every role together.
        max_wall_s: seconds since the budget was made.
    """

    meter: Any
    max_lm_calls: int | None = None
    max_cost_usd: float | None = None
    max_wall_s: float | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def capped(self) -> bool:
        return any(getattr(self, cap) is not None for cap in CAPS)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def exceeded(self) -> BudgetExceeded | None:
        """The error naming the first cap reached, or None while every cap has room."""
        if not self.capped:
            return None
        totals = self.meter.totals()
        if self.max_lm_calls is not None and totals["calls"] >= self.max_lm_calls:
            return BudgetExceeded("max_lm_calls", f"max_lm_calls={self.max_lm_calls} reached ({totals['calls']} LM calls)")
        cost = totals.get("cost_usd") or 0.0
        if self.max_cost_usd is not None and cost >= self.max_cost_usd:
            return BudgetExceeded("max_cost_usd", f"max_cost_usd={self.max_cost_usd:g} reached (${cost:.4f} spent)")
        elapsed = self.elapsed_s()
        if self.max_wall_s is not None and elapsed >= self.max_wall_s:
            return BudgetExceeded("max_wall_s", f"max_wall_s={self.max_wall_s:g} reached ({elapsed:.0f} s)")
        return None

    def check(self) -> None:
        """Raise :class:`BudgetExceeded` if a cap is reached."""
        error = self.exceeded()
        if error is not None:
            raise error


def budget_exceeded() -> BudgetExceeded | None:
    """What the budget active in this thread's DSPy settings says (None: no budget, or room)."""
    budget = dspy.settings.get(BUDGET_SETTING)
    return budget.exceeded() if budget is not None else None
