"""LM calls and tokens per stage and model, counted where DSPy records usage.

DSPy reports the usage of every LM call that was not a cache hit to
``dspy.settings.usage_tracker``. Its own tracker is copied into each worker thread of
``ParallelExecutor`` (and that copy is thrown away); :class:`UsageMeter` is one shared,
thread-safe tracker that survives the copy, so calls made in worker threads count too.
Cache hits are not LM calls and are not counted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import Any, Iterator

import dspy
from dspy.utils.callback import BaseCallback


class UsageMeter:
    """Counts LM calls and tokens by (stage, model). Use as ``with meter.stage("rollout"):``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # stages of a compile run one after another, so one current stage serves every thread
        self._current = "other"
        self._counts: dict[tuple[str, str], dict[str, int]] = defaultdict(
            lambda: {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )

    # DSPy copies the tracker into worker threads; all copies must be this one object.
    def __deepcopy__(self, memo: dict) -> UsageMeter:
        return self

    def __copy__(self) -> UsageMeter:
        return self

    @property
    def usage_data(self) -> dict:  # read by dspy.track_usage when nested under it
        return {}

    def add_usage(self, model: str, usage: dict[str, Any]) -> None:
        """Called by DSPy for every LM call that was not a cache hit."""
        with self._lock:
            entry = self._counts[(self._current, model)]
            entry["calls"] += 1
            for key in ("prompt_tokens", "completion_tokens"):
                value = usage.get(key) if isinstance(usage, dict) else None
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    entry[key] += int(value)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Attribute the calls made inside (in this thread and its DSPy worker threads) to ``name``."""
        previous, self._current = self._current, name
        try:
            with dspy.context(usage_tracker=self):
                yield
        finally:
            self._current = previous

    def by_stage(self, stage: str) -> dict[str, dict[str, int]]:
        """``{model: {calls, prompt_tokens, completion_tokens}}`` for one stage."""
        with self._lock:
            return {model: dict(v) for (s, model), v in self._counts.items() if s == stage}

    def totals(self) -> dict[str, int]:
        with self._lock:
            total = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
            for v in self._counts.values():
                for key in total:
                    total[key] += v[key]
            return total

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            stages: dict[str, dict] = defaultdict(dict)
            for (stage, model), v in self._counts.items():
                stages[stage][model] = dict(v)
        return {"stages": dict(stages), "totals": self.totals()}


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
