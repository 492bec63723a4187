"""Run one function over many items in threads, without letting one bad item sink the batch.

A thin layer over DSPy's ``ParallelExecutor`` (which carries ``dspy.context`` settings into the
worker threads and shows a progress bar): every exception an item raises, above all DSPy's
``AdapterParseError`` when an LM's reply does not parse, is caught, kept and counted, and the
item's output is ``None``. The caller decides what a failed item means (a metric scores it as
wrong). ``KeyboardInterrupt`` is not caught. After Ctrl-C, or once the compile's budget
(``infra.budget``) is spent, no new item starts and the batch raises instead of returning.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import dspy
from dspy.utils.parallelizer import ParallelExecutor

from .budget import BudgetExceeded, budget_exceeded
from .progress import DISPLAY_SETTING

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Failed:
    error: BaseException


@dataclass
class BatchResult(Generic[T]):
    """Outputs in input order (``None`` where an item failed) and the errors by item index."""

    outputs: list[T | None]
    errors: dict[int, BaseException] = field(default_factory=dict)

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    def error_counts(self) -> dict[str, int]:
        """How many items failed, by exception type name (e.g. ``{"AdapterParseError": 3}``)."""
        return dict(Counter(type(e).__name__ for e in self.errors.values()))


#: set by :func:`watch_sigint` when Ctrl-C arrives; cleared when the watch starts
INTERRUPTED = threading.Event()


@contextlib.contextmanager
def watch_sigint() -> Iterator[None]:
    """Remember a Ctrl-C even when a library swallows the ``KeyboardInterrupt`` it raises.

    Seen: a SIGINT landing inside an HTTP call of a rollout came back from litellm as an ordinary
    exception, which counted as one failed item, and the compile went on. Inside this context a
    SIGINT sets :data:`INTERRUPTED` (then raises ``KeyboardInterrupt`` as usual); batches and
    stages check it and stop. Only the main thread can install a handler; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(sig, frame):
        INTERRUPTED.set()
        if callable(previous):
            previous(sig, frame)
        else:
            signal.default_int_handler(sig, frame)

    INTERRUPTED.clear()
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived under :func:`watch_sigint`."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt("interrupted (Ctrl-C)")


def run_parallel(
    fn: Callable[[Any], T],
    items: Sequence[Any],
    *,
    num_threads: int = 8,
    desc: str | None = None,
    progress: bool = True,
    straggler_timeout: float = 0,
) -> BatchResult[T]:
    """Apply ``fn`` to every item with ``num_threads`` threads; failures are caught and counted.

    Args:
        fn: called once per item.
        items: the inputs.
        num_threads: worker threads (DSPy settings and ``dspy.context`` overrides carry over).
        desc: a label logged with the error summary.
        progress: show a progress bar.
        straggler_timeout: seconds after which DSPy re-submits one of the last few slow items
            (0: never; re-submitting doubles the load on a local CPU server).
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be at least 1, got {num_threads}")

    # a compile's one display (infra/progress.py) replaces DSPy's bar of each batch
    display = dspy.settings.get(DISPLAY_SETTING)

    def guarded(item: Any) -> T | _Failed:
        if INTERRUPTED.is_set():  # drain the queue fast after Ctrl-C
            return _Failed(KeyboardInterrupt("interrupted (Ctrl-C)"))
        spent = budget_exceeded()  # between items: calls in flight finish and are kept
        if spent is not None:
            return _Failed(spent)
        try:
            out = fn(item)
        except Exception as exc:  # counted per item; the batch goes on
            out = _Failed(exc)
        if display is not None:
            display.item_done(None if isinstance(out, _Failed) else out)
        return out

    if display is not None and items:
        display.batch_started(len(items))
    executor = ParallelExecutor(
        num_threads=num_threads,
        max_errors=len(items) + 1,
        disable_progress_bar=not progress or display is not None,
        timeout=straggler_timeout,
    )
    try:
        raw = executor.execute(guarded, list(items)) if items else []
    except Exception:
        check_interrupted()  # DSPy turns a cancelled batch into a plain Exception
        raise
    check_interrupted()
    skipped = next((out.error for out in raw if isinstance(out, _Failed) and isinstance(out.error, BudgetExceeded)), None)
    if skipped is not None:  # a batch cut short by the budget is not a result
        raise skipped
    result: BatchResult[T] = BatchResult(outputs=[None] * len(raw))
    for i, out in enumerate(raw):
        if isinstance(out, _Failed):
            result.errors[i] = out.error
        else:
            result.outputs[i] = out
    if result.errors:
        first = result.errors[min(result.errors)]
        logger.warning(
            "%s: %d/%d items failed %s; first: %s: %s",
            desc or getattr(fn, "__name__", "batch"), result.n_errors, len(raw), result.error_counts(),
            type(first).__name__, str(first)[:300],
        )
    return result
