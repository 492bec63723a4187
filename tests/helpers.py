"""Helpers shared by several test modules (import them with ``from helpers import ...``;
``conftest.py`` puts this folder on ``sys.path``, also for the child processes that import it).

- :data:`TINY_LM_KWARGS`, :func:`tiny_config`, :func:`tiny_teleprompter`: the smallest compile
  that exercises every stage on the tiny random model.
- :func:`compile_tiny_run`: the two-round compile that several tests only read (the session
  fixture ``tiny_run`` in ``conftest.py`` runs it once).
- :func:`start_child_compile`, :func:`wait_for_records`, :func:`has_records`: a compile in another
  process, interrupted at a known point.
- :func:`kill_when`, :func:`alive`: kill a server's processes on a condition; tell whether a pid runs.
- :func:`cli_error`: run the command line on arguments it must refuse; the error it printed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import dspy
import pytest

import trprompt_dspy as t
from trprompt_dspy.data import load_dataset
from trprompt_dspy.finetune import FinetuneConfig
from trprompt_dspy.infra.runs import read_jsonl
from trprompt_dspy.metrics import gsm8k_metric
from trprompt_dspy.reward_search import RewardSearchConfig
from trprompt_dspy.rollout.rollout import RolloutConfig
from trprompt_dspy.teleprompter import TRPromptConfig, TRPromptTeleprompter

TESTS = Path(__file__).resolve().parent

#: LM settings under which the tiny model's JSON replies usually fit (short strings, few tokens)
TINY_LM_KWARGS = {"max_tokens": 96, "max_string_length": 120, "cache": False}
#: LM settings under which EVERY JSON reply of the tiny model fits: strings of at most 40
#: characters leave room in 400 tokens for two fields even of multi-byte or escaped characters
FITTING_LM_KWARGS = {"max_tokens": 400, "max_string_length": 40, "cache": False}
#: output bounds of the reward search under which the tiny model closes its <IMPROVED_VARIABLE>
#: tag and its feedback and results fit the model's context (see test_reward_search)
TINY_SEARCH_BOUNDS = dict(max_reward_chars=200, regex_preamble_chars=40, proposal_max_tokens=400,
                          feedback_max_tokens=64, max_results_chars=1500, max_field_chars=100, patience=None)
#: an API key planted in the environment and in LMs; no file a compile writes may contain it
PLANTED_KEY = "sk-planted-0123456789abcdefSECRET"


def tiny_config(**overrides: Any) -> TRPromptConfig:
    """The smallest sizes that exercise every stage (two rounds unless overridden)."""
    fields = dict(
        rounds=2,
        rollout=RolloutConfig(n_samples=2, temperature=1.0, num_threads=8),
        finetune=FinetuneConfig(max_steps=2, per_device_batch_size=4, max_length=2048, lora_r=8, lora_alpha=16),
        search=RewardSearchConfig(steps=1, num_candidates=2, minibatch_size=2, num_threads=8, **TINY_SEARCH_BOUNDS),
        val_num_threads=8,
        progress=False,
        # the tiny random model's validation accuracy is noise: "best" would pick any round, so
        # the tests that read a compiled adapter get the last one (test_role_servers uses "best")
        select_round="last",
    )
    fields.update(overrides)
    return TRPromptConfig(**fields)


def tiny_teleprompter(server, log_dir, **overrides: Any) -> TRPromptTeleprompter:
    """A GSM8K teleprompter on ``server`` with :func:`tiny_config` (``overrides`` go to the config)."""
    return TRPromptTeleprompter(server=server, metric=gsm8k_metric, config=tiny_config(**overrides),
                                log_dir=log_dir, lm_kwargs=dict(TINY_LM_KWARGS))


def unload_all_adapters(server) -> None:
    """Unload every adapter from ``server`` (the shared one has 3 LoRA slots for the whole session)."""
    for name in list(server.adapters):
        server.unload_adapter(name)


# ---------------------------------------------------------------------- the shared compiled run


@dataclass(frozen=True)
class TinyRun:
    """A finished two-round compile: tests READ it (``compiled`` and ``log_dir`` are shared)."""

    compiled: dspy.Module
    #: the program given to ``compile`` (a compile must leave it untouched)
    student: dspy.Module
    log_dir: Path
    report: dict[str, Any]
    #: the critic's and optimizer's LM (one object, holding :data:`PLANTED_KEY` as its api key)
    keyed_lm: dspy.BaseLM


def compile_tiny_run(server, data_dir: Path, log_dir: Path) -> TinyRun:
    """Compile 4 GSM8K training questions for two rounds (3 to validate) with API keys planted.

    :data:`PLANTED_KEY` is in the environment (``OPENAI_API_KEY``, ``TRPROMPT_TEST_TOKEN``) during
    the compile, and the critic and the optimizer share one LM that sends it as its api key (the
    local server ignores it): one object playing two roles, on the model the prompter and target
    use too. Everything else is :func:`tiny_teleprompter`. Adapters the compile loaded are
    unloaded from ``server`` afterwards.
    """
    train = load_dataset("gsm8k", "train", data_dir=data_dir, limit=4)
    val = load_dataset("gsm8k", "test", data_dir=data_dir, limit=3)
    tele = tiny_teleprompter(server, log_dir)
    keyed = server.lm(structured=True, **{**tele.lm_kwargs, "api_key": PLANTED_KEY})
    tele.critic_lm, tele.optimizer_lm = keyed, keyed
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OPENAI_API_KEY", PLANTED_KEY)
        env.setenv("TRPROMPT_TEST_TOKEN", PLANTED_KEY + "-env")
        student = t.TRPromptProgram()
        try:
            compiled = tele.compile(student, trainset=train, valset=val)
        finally:
            unload_all_adapters(server)
    report = json.loads((log_dir / "report.json").read_text())
    return TinyRun(compiled=compiled, student=student, log_dir=log_dir, report=report, keyed_lm=keyed)


# ---------------------------------------------------------------------- a compile in a child process


def has_records(path: Path, at_least: int) -> bool:
    """The records file at ``path`` holds ``at_least`` rows."""
    return path.is_file() and len(read_jsonl(path)) >= at_least


def start_child_compile(model_path: str, data_dir: Path, log_dir: Path, *, rounds: int = 2,
                        pids_file: Path | None = None) -> subprocess.Popen:
    """Compile 4 GSM8K training questions in a new process, on a vLLM server of its own, with ONE
    rollout thread (records arrive one by one), so that a test can interrupt it at a known point.

    The child writes its server's pids to ``pids_file`` (when given) once the server runs; its
    stderr is a pipe (read it when it fails).
    """
    write_pids = f"open({str(pids_file)!r}, 'w').write(json.dumps(server.pids()))" if pids_file else ""
    script = textwrap.dedent(f"""
        import dataclasses, json, sys
        sys.path.insert(0, {str(TESTS)!r})
        import trprompt_dspy as t
        from trprompt_dspy.data import load_dataset
        from helpers import tiny_teleprompter
        server = t.VLLMServer(model={str(model_path)!r}, served_model_name="base", dtype="float32",
                              max_lora_rank=8, max_loras=3).start()
        {write_pids}
        tele = tiny_teleprompter(server, {str(log_dir)!r}, rounds={rounds!r})
        tele.config.rollout = dataclasses.replace(tele.config.rollout, num_threads=1)
        with server:
            train = load_dataset("gsm8k", "train", data_dir={str(data_dir)!r}, limit=4)
            tele.compile(t.TRPromptProgram(), trainset=train)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for_records(child: subprocess.Popen, records: Path, at_least: int, timeout_s: float = 300) -> None:
    """Wait until ``child`` has written ``at_least`` records; fail if it exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not has_records(records, at_least):
        assert child.poll() is None, child.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"fewer than {at_least} records after {timeout_s:.0f} s"
        time.sleep(0.1)


# ---------------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie awaiting its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def kill_when(server, ready: Callable[[], bool], timeout_s: float = 300) -> threading.Thread:
    """A thread that SIGKILLs every process of ``server`` once ``ready()`` is true."""

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                for pid in server.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------- the command line


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``trprompt argv``, which must refuse it: exit code 2 and a ``trprompt: error:``
    message on stderr (no traceback). Returns stderr."""
    from trprompt_dspy.app.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("trprompt: error:") and "Traceback" not in err, err
    return err


class Overlap:
    """The most calls (or, with ``distinct``, the most different keys) in flight at once.

    Each call waits, up to ``wait_s``, until ``want`` have been in flight together. Calls that
    the code makes concurrently then meet however slow a loaded machine starts its threads;
    calls made one after another never do (each only pays the wait). The maximum thus tells the
    two apart without any timing threshold.
    """

    def __init__(self, *, want: int = 2, wait_s: float = 10.0, distinct: bool = False):
        self.want, self.wait_s, self.distinct = want, wait_s, distinct
        self.cond = threading.Condition()
        self.inflight: collections.Counter = collections.Counter()
        self.max = 0

    def enter(self, key=None) -> None:
        with self.cond:
            self.inflight[key] += 1
            width = len(self.inflight) if self.distinct else sum(self.inflight.values())
            self.max = max(self.max, width)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.max >= self.want, timeout=self.wait_s)

    def exit(self, key=None) -> None:
        with self.cond:
            self.inflight[key] -= 1
            if not self.inflight[key]:
                del self.inflight[key]

    @contextlib.contextmanager
    def call(self, key=None):
        self.enter(key)
        try:
            yield
        finally:
            self.exit(key)
