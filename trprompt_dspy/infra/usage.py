"""LM calls, tokens and cost per stage, role and model, counted where DSPy records usage.

DSPy reports the usage of every LM call that was not a cache hit to
``dspy.settings.usage_tracker``. Its own tracker is copied into each worker thread of
``ParallelExecutor`` (and that copy is thrown away); :class:`UsageMeter` is one shared,
thread-safe tracker that survives the copy, so calls made in worker threads count too.
Cache hits are not LM calls and are not counted.

Roles: one model often plays several roles (the paper's self-improvement setting: prompter,
target and critic are one LM), so the model name cannot tell them apart. The meter is also a
DSPy callback: it sees which module (``QueryAwarePrompter``, ``Solver``, ``TextualCritic``) is
running in the calling thread when an LM call is made, and LMs registered with
:meth:`UsageMeter.assign_role` (TextGrad's optimizer LM) name their own role.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import Any, Iterator

import dspy
from dspy.utils.callback import BaseCallback

OTHER_ROLE = "other"
_COUNT_KEYS = ("calls", "prompt_tokens", "completion_tokens")


_PRICES: dict[str, Any] = {}
_PRICES_LOCK = threading.Lock()


def call_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """USD cost of one call from litellm's price map, or None where litellm has no price.

    A local vLLM model (``hosted_vllm/...``) has no price: its cost is reported as unknown,
    never as zero.
    """
    with _PRICES_LOCK:
        known = _PRICES.get(model)
    if known is False:
        return None
    try:
        import litellm

        litellm.suppress_debug_info = True  # its "Provider List" banner for every unknown model
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
        cost = float(prompt_cost) + float(completion_cost)
    except Exception:  # litellm raises for models it does not price
        with _PRICES_LOCK:
            _PRICES[model] = False
        return None
    if prompt_tokens + completion_tokens > 0 and cost == 0.0 and model.startswith("hosted_vllm/"):
        with _PRICES_LOCK:
            _PRICES[model] = False
        return None
    return cost


class UsageMeter(BaseCallback):
    """Counts LM calls, tokens and cost by (stage, role, model).

    Install it as the DSPy usage tracker and callback: ``with meter.stage("rollout"):`` does
    both for the calls made inside (in this thread and its DSPy worker threads).

    Args:
        module_roles: module type -> role name (TRPrompt's: ``trprompt_dspy.modules.roles.MODULE_ROLES``);
            calls made outside these modules count as :data:`OTHER_ROLE` unless their LM has a role.
    """

    def __init__(self, module_roles: dict[type, str] | None = None) -> None:
        self._lock = threading.Lock()
        # stages of a compile run one after another, so one current stage serves every thread
        self._current = "other"
        self._module_roles = dict(module_roles or {})
        self._lm_roles: dict[int, str] = {}
        self._local = threading.local()
        self._counts: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(
            lambda: {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "unpriced_calls": 0}
        )

    # DSPy copies the tracker into worker threads; all copies must be this one object.
    def __deepcopy__(self, memo: dict) -> UsageMeter:
        return self

    def __copy__(self) -> UsageMeter:
        return self

    def assign_role(self, lm: Any, role: str) -> None:
        """Calls made by ``lm`` outside any role module count under ``role`` (e.g. "optimizer")."""
        if lm is not None:
            with self._lock:
                self._lm_roles[id(lm)] = role

    # ---------------------------------------------------------------- role of the calling thread

    def _stack(self) -> list[tuple[str, str | None]]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        role = next((r for t, r in self._module_roles.items() if isinstance(instance, t)), None)
        self._stack().append(("module", role))

    def on_module_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        stack = self._stack()
        if stack:
            stack.pop()

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._stack().append(("lm", self._lm_roles.get(id(instance))))

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: Exception | None = None) -> None:
        self.on_module_end(call_id, outputs, exception)

    def current_role(self) -> str:
        """The innermost role module (or role LM) running in this thread, else ``"other"``."""
        # a module's role wins over its LM's: the prompter's LM may also be the optimizer's
        stack = self._stack()
        for wanted in ("module", "lm"):
            for kind, role in reversed(stack):
                if kind == wanted and role is not None:
                    return role
        return OTHER_ROLE

    # ---------------------------------------------------------------- DSPy usage tracker

    @property
    def usage_data(self) -> dict:  # read by dspy.track_usage when nested under it
        return {}

    def add_usage(self, model: str, usage: dict[str, Any]) -> None:
        """Called by DSPy for every LM call that was not a cache hit."""
        tokens = {}
        for key in ("prompt_tokens", "completion_tokens"):
            value = usage.get(key) if isinstance(usage, dict) else None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            tokens[key] = int(value) if ok else 0
        cost = call_cost(str(model), tokens["prompt_tokens"], tokens["completion_tokens"])
        role = self.current_role()
        with self._lock:
            entry = self._counts[(self._current, role, str(model))]
            entry["calls"] += 1
            for key, value in tokens.items():
                entry[key] += value
            if cost is None:
                entry["unpriced_calls"] += 1
            else:
                entry["cost_usd"] += cost

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Attribute the calls made inside (in this thread and its DSPy worker threads) to ``name``."""
        previous, self._current = self._current, name
        callbacks = list(dspy.settings.get("callbacks", None) or [])
        if self not in callbacks:
            callbacks.append(self)
        try:
            with dspy.context(usage_tracker=self, callbacks=callbacks):
                yield
        finally:
            self._current = previous

    # ---------------------------------------------------------------- reading

    def by_stage(self, stage: str) -> dict[str, dict[str, dict[str, Any]]]:
        """``{role: {model: {calls, prompt_tokens, completion_tokens, cost_usd, unpriced_calls}}}``."""
        out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        with self._lock:
            for (s, role, model), v in self._counts.items():
                if s == stage:
                    out[role][model] = _rounded(v)
        return dict(out)

    def by_role(self) -> dict[str, dict[str, Any]]:
        """Totals per role over every stage."""
        return self._sum(lambda stage, role, model: role)

    def totals(self) -> dict[str, Any]:
        return self._sum(lambda stage, role, model: "all").get("all", _rounded(self._counts.default_factory()))

    def _sum(self, key_of) -> dict[str, dict[str, Any]]:
        sums: dict[str, dict[str, Any]] = {}
        with self._lock:
            for key, v in self._counts.items():
                acc = sums.setdefault(key_of(*key), {k: 0 for k in v} | {"cost_usd": 0.0})
                for k, value in v.items():
                    acc[k] += value
        return {k: _rounded(v) for k, v in sums.items()}

    def to_dict(self) -> dict[str, Any]:
        stages: dict[str, dict] = {}
        with self._lock:
            keys = sorted({s for s, _, _ in self._counts})
        for stage in keys:
            stages[stage] = self.by_stage(stage)
        return {"stages": stages, "roles": self.by_role(), "totals": self.totals()}


def _rounded(v: dict[str, Any]) -> dict[str, Any]:
    """Counts as they are; cost rounded, and None when no call of the group had a price."""
    out = dict(v)
    priced = out["calls"] - out.get("unpriced_calls", 0)
    out["cost_usd"] = round(out["cost_usd"], 6) if priced > 0 else None
    return out


class LMBusyClock(BaseCallback):
    """Wall time during which at least one LM call is in flight (cache hits included).

    A DSPy callback: register it with ``dspy.context(callbacks=[clock])``. Compile time minus
    this, minus training and server start, is the orchestration overhead of the library.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = 0.0
        self.busy_seconds = 0.0

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._since = time.perf_counter()
            self._in_flight += 1

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if self._in_flight == 0:
                self.busy_seconds += time.perf_counter() - self._since
