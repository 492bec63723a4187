"""Hard caps on a compile (``max_lm_calls``, ``max_cost_usd``, ``max_wall_s``): the budget's logic
with a counting stand-in, then each cap stopping a real compile on the tiny model, and a
compile stopped by a cap resumed to the end."""

import json
import threading

import dspy
import pytest

import trprompt_dspy as t
from helpers import tiny_teleprompter
from trprompt_dspy.app.config_file import ConfigError, config_from_dict
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.budget import BUDGET_SETTING, Budget, BudgetExceeded
from trprompt_dspy.infra.parallel import run_parallel
from trprompt_dspy.infra.runs import read_jsonl
from trprompt_dspy.prompts.defaults import INITIAL_REWARD
from trprompt_dspy.rollout.rollout import RolloutConfig
from trprompt_dspy.teleprompter import TRPromptConfig
from trprompt_dspy.teleprompter.rounds import select_round


class CountingMeter:
    """A stand-in for UsageMeter: ``totals()`` of calls counted by hand."""

    def __init__(self, calls: int = 0, cost: float | None = None):
        self.calls, self.cost, self.lock = calls, cost, threading.Lock()

    def add(self, n: int = 1) -> None:
        with self.lock:
            self.calls += n

    def totals(self) -> dict:
        return {"calls": self.calls, "cost_usd": self.cost}


def test_the_budget_names_the_first_cap_reached():
    assert Budget(CountingMeter(10**6)).exceeded() is None  # no cap, no limit
    assert Budget(CountingMeter(4), max_lm_calls=5).exceeded() is None
    error = Budget(CountingMeter(5), max_lm_calls=5).exceeded()
    assert isinstance(error, BudgetExceeded) and error.cap == "max_lm_calls" and "5 LM calls" in str(error)
    # unpriced calls (cost None) never reach a dollar cap
    assert Budget(CountingMeter(3, cost=None), max_cost_usd=0.01).exceeded() is None
    assert Budget(CountingMeter(3, cost=0.02), max_cost_usd=0.01).exceeded().cap == "max_cost_usd"
    stale = Budget(CountingMeter(), max_wall_s=5.0)
    stale.started -= 6.0
    assert stale.exceeded().cap == "max_wall_s"
    with pytest.raises(BudgetExceeded, match="max_wall_s=5 reached"):
        stale.check()


def test_a_batch_starts_no_item_once_the_budget_is_spent():
    meter = CountingMeter()

    def one(item):
        meter.add()  # one "LM call" per item
        return item * 2

    with dspy.context(**{BUDGET_SETTING: Budget(meter, max_lm_calls=3)}):
        with pytest.raises(BudgetExceeded, match="max_lm_calls=3"):
            run_parallel(one, list(range(10)), num_threads=1, progress=False)
    assert meter.calls == 3  # items 4..10 never started
    # without a budget (or with room) the batch is whole
    assert run_parallel(one, [1, 2], num_threads=1, progress=False).outputs == [2, 4]
    with dspy.context(**{BUDGET_SETTING: Budget(meter, max_lm_calls=100)}):
        assert run_parallel(one, [1, 2], num_threads=2, progress=False).outputs == [2, 4]


def test_caps_are_checked_and_read_from_config_files():
    for bad in (dict(max_lm_calls=0), dict(max_lm_calls=2.5), dict(max_cost_usd=0), dict(max_wall_s=-1),
                dict(max_wall_s=True), dict(max_cost_usd="1")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TRPromptConfig(**bad)
    config = config_from_dict({"max_lm_calls": 50, "max_cost_usd": 2, "max_wall_s": 3600})
    assert (config.max_lm_calls, config.max_cost_usd, config.max_wall_s) == (50, 2.0, 3600.0)
    with pytest.raises(ConfigError, match="max_lm_calls"):
        config_from_dict({"max_lm_calls": "many"})
    assert select_round([], None) == 0  # stopped before any round was complete: round 0


def _stopped_report(log_dir):
    return json.loads((log_dir / "report.json").read_text())


def _assert_round_0(tele, compiled, report, cap):
    assert tele.stopped_by["cap"] == cap and report["stopped_by"] == tele.stopped_by
    assert report["stopped_by"]["rounds_completed"] == 0 and report["rounds"] == []
    # the best completed "round" is the untrained prompter with the initial reward
    assert report["selected_round"] == 0
    assert compiled.prompter.adapter is None and compiled.prompter.reward == INITIAL_REWARD


def test_max_lm_calls_stops_the_compile_and_a_resume_finishes_it(clean_adapters, shared_data_dir, tmp_path):
    log_dir, train = tmp_path / "run", load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    records = log_dir / "round_1" / "records.jsonl"
    one_thread = RolloutConfig(n_samples=2, temperature=1.0, num_threads=1)  # items start one by one
    tele = tiny_teleprompter(clean_adapters, log_dir, rounds=1, rollout=one_thread, max_lm_calls=7)
    compiled = tele.compile(t.TRPromptProgram(), trainset=train)
    report = _stopped_report(log_dir)
    _assert_round_0(tele, compiled, report, "max_lm_calls")
    calls = report["usage"]["totals"]["calls"]
    # each rollout item is 3 calls (prompter, solver, critic); one thread: at most one item past the cap
    assert 7 <= calls <= 7 + 3, calls
    before = read_jsonl(records)
    assert 1 <= len(before) < 8  # what was rolled out before the stop is kept
    # the saved program is the untrained prompter, and it runs
    compiled.save(tmp_path / "program")
    assert (tmp_path / "program" / "program.json").is_file()

    # the same compile without the cap (caps are speed-only: the run folder is the same run)
    resumed = tiny_teleprompter(clean_adapters, log_dir, rounds=1, rollout=one_thread)
    finished = resumed.compile(t.TRPromptProgram(), trainset=train)
    report = _stopped_report(log_dir)
    assert resumed.stopped_by is None and "stopped_by" not in report
    assert report["rounds"][0]["rollout"]["resumed"] == len(before)
    after = read_jsonl(records)
    assert len(after) == 8 and after[: len(before)] == before
    assert finished.prompter.adapter["name"].startswith("prompter-r1-")


def _capped_compile(server, data_dir, tmp_path, cap, value):
    """A one-round tiny compile of 4 questions, rolled out one item at a time, under one cap;
    checks that the cap stopped it at round 0 and returns its report."""
    train = load_dataset("gsm8k", "train", data_dir=data_dir, limit=4)
    one_thread = RolloutConfig(n_samples=2, temperature=1.0, num_threads=1)
    tele = tiny_teleprompter(server, tmp_path / "run", rounds=1, rollout=one_thread, **{cap: value})
    compiled = tele.compile(t.TRPromptProgram(), trainset=train)
    report = _stopped_report(tmp_path / "run")
    _assert_round_0(tele, compiled, report, cap)
    return report


def test_max_wall_s_stops_the_compile(clean_adapters, shared_data_dir, tmp_path):
    # a round (24 rollout calls, SFT, a search) cannot be complete within one second
    report = _capped_compile(clean_adapters, shared_data_dir, tmp_path, "max_wall_s", 1.0)
    assert report["wall_s"] >= 1.0


def test_max_cost_usd_stops_the_compile_on_priced_calls(clean_adapters, shared_data_dir, tmp_path, monkeypatch):
    import litellm

    from trprompt_dspy.infra import usage

    # the tiny local model is unpriced; give it a price as a user would for a custom model
    model = clean_adapters.lm(structured=True).model
    monkeypatch.setattr(litellm, "model_cost", dict(litellm.model_cost))
    monkeypatch.setattr(usage, "_PRICES", {})  # forget that this model had no price
    litellm.register_model({model: {"input_cost_per_token": 1e-4, "output_cost_per_token": 1e-4,
                                     "litellm_provider": "hosted_vllm", "mode": "chat"}})
    # one call of a few hundred tokens costs a few cents here: the first item passes the cap
    report = _capped_compile(clean_adapters, shared_data_dir, tmp_path, "max_cost_usd", 0.01)
    assert report["usage"]["totals"]["cost_usd"] >= 0.01
    assert report["usage"]["totals"]["calls"] <= 3  # one rollout item, then nothing new started


def test_the_command_line_caps_reach_the_config(tmp_path):
    from trprompt_dspy.app.cli import build_parser, compile_config

    parse = build_parser().parse_args
    config = compile_config(parse(["compile", "--max-lm-calls", "40", "--max-cost-usd", "0.5", "--max-wall-s", "90"]))
    assert (config.max_lm_calls, config.max_cost_usd, config.max_wall_s) == (40, 0.5, 90.0)
    # over a config file's own caps
    file = tmp_path / "c.toml"
    file.write_text("rounds = 1\nmax_lm_calls = 500\nmax_wall_s = 10\n")
    config = compile_config(parse(["compile", "--config", str(file), "--max-lm-calls", "40"]))
    assert (config.rounds, config.max_lm_calls, config.max_wall_s, config.max_cost_usd) == (1, 40, 10.0, None)
    assert compile_config(parse(["compile"])).max_lm_calls is None
