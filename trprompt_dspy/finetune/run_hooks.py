"""What surrounds one trl run: the callbacks that record its loss and step times and let it be
cancelled, a collator that counts the tokens it trained on, the library bars and per-step log
dicts kept off the console, and one training at a time per process."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator, Sequence

logger = logging.getLogger(__name__)


def make_callbacks(cancel_event: threading.Event | None, extra: Sequence[Any]) -> tuple[list[Any], dict]:
    from transformers import TrainerCallback

    state: dict[str, Any] = {"log": [], "cancelled": False, "step_seconds": [], "step_started": None}

    class _Recorder(TrainerCallback):
        def on_step_begin(self, args, trainer_state, control, **kwargs):
            state["step_started"] = time.perf_counter()

        # Keeps the loss curve for the summary; trl/transformers print it too.
        def on_log(self, args, trainer_state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                entry = {"step": trainer_state.global_step, "loss": float(logs["loss"])}
                for key in ("learning_rate", "grad_norm"):
                    if key in logs:
                        entry[key] = float(logs[key])
                state["log"].append(entry)

        def on_step_end(self, args, trainer_state, control, **kwargs):
            if state["step_started"] is not None:
                state["step_seconds"].append(round(time.perf_counter() - state["step_started"], 4))
            if cancel_event is not None and cancel_event.is_set():
                state["cancelled"] = True
                control.should_training_stop = True

    return [_Recorder(), *extra], state


@contextlib.contextmanager
def library_bars(shown: bool) -> Iterator[None]:
    """transformers' and datasets' own bars (loading weights, preparing the dataset) only when
    this run shows progress itself (not when progress is off, or a display shows the steps)."""
    import datasets
    from transformers.utils import logging as hf_logging

    if shown:
        yield
        return
    was = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            hf_logging.enable_progress_bar()
        if was[1]:
            datasets.enable_progress_bars()


def quiet_logs(trainer: Any, extra_callbacks: Sequence[Any], *, progress: bool) -> None:
    """No raw ``{'loss': ...}`` dict per step on the console (the loss curve is in the summary):
    transformers' PrinterCallback goes, and its ProgressCallback keeps the bar without the dicts,
    or goes too when a callback shows the steps itself (``replaces_progress``: the compile's
    display, ``infra/progress.py``)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress and not any(getattr(c, "replaces_progress", False) for c in extra_callbacks):
        trainer.add_callback(_BarOnly())


class CountingCollator:
    """Wraps trl's collator to count the tokens every step really processed (for tokens/s)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.tokens = 0
        self.loss_tokens = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.tokens += int(batch["attention_mask"].sum())
        self.loss_tokens += int((batch["labels"] != -100).sum())
        return batch


_TRAINING_LOCK = threading.Lock()


@contextlib.contextmanager
def one_training_at_a_time():
    """One SFT run at a time in a process. Two compiles in threads of one process (e.g. sharing
    a server) would otherwise race on trl's lazy first import ("cannot import name 'SFTConfig'")
    and on process-wide state (torch's thread count, the seeded RNGs, accelerate's singleton);
    on a CPU two trainings at once are no faster than one after the other."""
    if not _TRAINING_LOCK.acquire(blocking=False):
        logger.info("another training runs in this process; waiting for it to finish")
        _TRAINING_LOCK.acquire()
    try:
        yield
    finally:
        _TRAINING_LOCK.release()
