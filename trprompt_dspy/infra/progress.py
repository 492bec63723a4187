"""One progress display for a compile (``TRPromptConfig.progress``).

A compile used to interleave DSPy's per-batch bars, trl's ``{'loss': ...}`` dicts and its round
summaries. :class:`CompileDisplay` is one ``rich`` progress line for the running stage --
round, stage, items done / started, elapsed and remaining time, running accuracy, LM calls --
and prints each round's summary above it. Batches find it in the DSPy settings under
:data:`DISPLAY_SETTING` (``infra.parallel.run_parallel`` then reports each item to it instead
of showing DSPy's bar, also from worker threads); SFT reports its steps through
:meth:`CompileDisplay.trainer_callback` (trl's bar and dict logs are then left out).

On a terminal the line of the running stage is live; each finished stage is printed once above
it (written to a file, ``nohup ... > log``, only those lines appear). Log records go through
:func:`console` (``RichHandler``) so that they appear above the live line instead of through it;
:class:`OncePerMessage` keeps a warning repeated on every call (DSPy's "LM response was
truncated") to its first occurrence.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: the key of the active display in ``dspy.settings`` (set by the compile with ``dspy.context``)
DISPLAY_SETTING = "trprompt_display"

_CONSOLE: Console | None = None


def console() -> Console:
    """The one stderr console that the display and the command line's log handler share."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def _score(output: Any) -> float | None:
    """The metric's score of a batch item's output, where it says: a rollout record, a reward
    search row, an evaluation's ``(prediction, score)``."""
    if isinstance(output, tuple) and len(output) == 2:
        value = output[1]
    elif isinstance(output, dict):
        value = output.get("score", output.get("correct"))
    else:
        value = getattr(output, "score", None)
        if value is None:
            value = getattr(output, "correct", None)
    return float(value) if isinstance(value, (bool, int, float)) else None


class OncePerMessage:
    """A ``logging`` filter that lets a warning through once per logger and message start, and
    drops other libraries' INFO records (textgrad logs every prompt it builds at INFO)."""

    def __init__(self, own_prefix: str = "trprompt_dspy") -> None:
        self.own_prefix = own_prefix
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: Any) -> bool:
        if record.levelno >= 40:  # errors always
            return True
        if record.levelno < 30 and not record.name.startswith(self.own_prefix):
            return False
        key = (record.name, str(record.getMessage())[:60])
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


class CompileDisplay:
    """The live progress line of one compile (see the module doc).

    Args:
        rounds: the compile's rounds (shown as ``round k/rounds``).
        meter: the compile's ``UsageMeter`` (LM calls so far); None: not shown.
        console: where to draw; default :func:`console`.
    """

    def __init__(self, rounds: int, meter: Any = None, console_: Console | None = None):
        self.rounds, self.meter = rounds, meter
        self.console = console_ or console()
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=self.console, transient=False, redirect_stdout=False, redirect_stderr=False,
        )
        self._task: int | None = None
        self._right, self._scored = 0.0, 0
        self._loss: float | None = None
        #: a terminal gets the live line; a file one line per finished stage
        self.live = self.console.is_terminal

    def __enter__(self) -> CompileDisplay:
        if self.live:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.live:
            self._progress.stop()

    @contextlib.contextmanager
    def stage(self, key: str) -> Iterator[None]:
        """Show ``key`` (``round_k/<stage>``) while its work runs; totals grow as batches start."""
        round_part, _, name = key.partition("/")
        if round_part.startswith("round_") and name:
            k = round_part.removeprefix("round_")
            label = f"{'before round 1' if k == '0' else f'round {k}/{self.rounds}'} · {name}"
        else:  # work outside the rounds (e.g. the demo's baselines): the key is the label
            label = key
        started = time.perf_counter()
        with self._lock:
            self._right, self._scored = 0.0, 0
            self._loss = None
            self._task = self._progress.add_task(label, total=0, status="")
        try:
            yield
        finally:
            with self._lock:
                task, self._task = self._task, None
                status = self._status()
            done = self._find(task)
            count = f"{done.completed:g}/{done.total:g}" if done.total else ""
            # a finished stage leaves the live region and is printed once, above it
            self._progress.remove_task(task)
            self.print(" ".join(filter(None, [f"{label}:", count, f"in {time.perf_counter() - started:.0f} s",
                                              f"· {status}" if status else ""])))

    def _find(self, task: int) -> Any:
        return next(t for t in self._progress.tasks if t.id == task)

    def batch_started(self, total: int) -> None:
        """A batch of ``total`` items started in the current stage."""
        with self._lock:
            if self._task is not None:
                self._progress.update(self._task, total=self._find(self._task).total + total)

    def item_done(self, output: Any) -> None:
        """One item of a batch finished (its output, or None when it failed)."""
        score = _score(output)
        with self._lock:
            if score is not None:
                self._scored += 1
                self._right += score
            if self._task is not None:
                self._progress.update(self._task, advance=1, status=self._status())

    def set_steps(self, done: int, total: int, loss: float | None = None) -> None:
        """SFT progress: ``done`` of ``total`` optimizer steps, and the loss when logged."""
        with self._lock:
            if loss is not None:
                self._loss = loss
            if self._task is not None:
                self._progress.update(self._task, completed=done, total=total, status=self._status())

    def print(self, line: str) -> None:
        """A line above the live one (a round's summary)."""
        self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)  # a log file keeps it whole

    def _status(self) -> str:
        parts = [f"loss {self._loss:.3f}"] if self._loss is not None else []
        if self._scored:
            parts.append(f"acc {self._right / self._scored:.0%} of {self._scored}")
        if self.meter is not None:
            parts.append(f"{self.meter.totals()['calls']} LM calls")
        return " · ".join(parts)

    def trainer_callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that shows SFT's steps and loss on this line."""
        from transformers import TrainerCallback

        display = self

        class _Steps(TrainerCallback):
            replaces_progress = True  # finetune leaves out trl's own bar and dict logs

            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("loss")
                display.set_steps(state.global_step, state.max_steps, float(loss) if loss is not None else None)

            def on_step_end(self, args, state, control, **kwargs):
                display.set_steps(state.global_step, state.max_steps)

        return _Steps()
