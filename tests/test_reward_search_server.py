"""The t* search through a real vLLM server on the tiny random model: prompter and solver replies
are held to DSPy's JSON schema and the optimizer's to the <IMPROVED_VARIABLE> regex by vLLM's
structured outputs (the search's logic is tested against scripted LMs in test_reward_search.py)."""

from __future__ import annotations

import json

import dspy
import pytest
from dspy.utils.callback import BaseCallback
from helpers import TINY_SEARCH_BOUNDS, Overlap

from trprompt_dspy.metrics import gsm8k_metric
from trprompt_dspy.modules.roles import QueryAwarePrompter, Solver
from trprompt_dspy.reward_search import (
    BEST_REWARD_FILE,
    TRACE_FILE,
    RewardSearch,
    RewardSearchConfig,
    search_reward,
)

# ------------------------------------------------------------------------------ real vLLM server


@pytest.fixture
def server(vllm_server):
    """The suite's tiny-model server (tests/serving_fixtures.py)."""
    return vllm_server


def _tiny_lms(server):
    # The random model writes noise: vLLM holds the task replies to DSPy's JSON schema (short
    # strings) and the optimizer's to the <IMPROVED_VARIABLE> regex, so everything parses.
    task = server.lm(structured=True, max_string_length=60, max_tokens=128, temperature=0.0, cache=False)
    return task, server.lm(cache=False)


# Bounds the tiny model's replies: 40 + 200 characters of regex fit in 400 tokens, so every
# proposal closes its tag; the results text stays far inside the 4096-token context.
TINY = dict(TINY_SEARCH_BOUNDS, progress=False)


def test_search_end_to_end_on_a_real_vllm_server(server, shared_data_dir, tmp_path):
    from trprompt_dspy.data import load_dataset

    task_lm, optimizer_lm = _tiny_lms(server)
    trainset = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=12)
    cfg = RewardSearchConfig(steps=2, num_candidates=2, minibatch_size=4, num_threads=16, **TINY)
    with dspy.context(lm=task_lm, adapter=dspy.JSONAdapter()):
        result = search_reward(QueryAwarePrompter(), Solver(), trainset, gsm8k_metric, optimizer_lm=optimizer_lm,
                               config=cfg, run_dir=tmp_path / "run")

    assert isinstance(result.best_reward, str) and result.best_reward.strip()
    assert result.steps_run == 2 and [s.step for s in result.trace] == [0, 1, 2]
    candidates = [c for s in result.trace[1:] for c in s.candidates]
    assert len(candidates) == 4
    for step in result.trace[1:]:
        assert step.error is None and step.gradient is not None
    for c in candidates:  # each one was either evaluated or rejected with a reason
        assert c.accepted or c.reason
        if c.reason is None or c.reason.startswith(("not selected", "accuracy fell", "tie")):
            assert c.accuracy is not None
    # the regex made the random model emit the tags every time
    assert not any(c.reason and "IMPROVED_VARIABLE" in c.reason for c in candidates)
    assert any(c.accuracy is not None for c in candidates)

    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == sorted([TRACE_FILE, BEST_REWARD_FILE])
    saved = json.loads((run / TRACE_FILE).read_text())
    assert saved["status"] == "finished" and saved["structured_proposals"] is True
    assert len(saved["trace"]) == 3 and saved["best_reward"] == result.best_reward
    assert json.loads((run / BEST_REWARD_FILE).read_text())["reward"] == result.best_reward


class _CountCalls(BaseCallback):
    """Counts one LM's calls in flight (DSPy runs callbacks in the calling thread)."""

    def __init__(self, lm, overlap: Overlap):
        self.lm, self.overlap, self.counted = lm, overlap, set()

    def on_lm_start(self, call_id, instance, inputs):
        if instance is self.lm:
            self.counted.add(call_id)
            self.overlap.enter()

    def on_lm_end(self, call_id, outputs, exception=None):
        if call_id in self.counted:
            self.overlap.exit()


def test_candidates_are_evaluated_concurrently_on_a_real_server(server, shared_data_dir):
    """With selection="same" the task LM's calls in a step are the candidates' batch only: they
    overlap on the server, never more than num_threads at once."""
    from trprompt_dspy.data import load_dataset

    task_lm, optimizer_lm = _tiny_lms(server)
    trainset = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=32)
    cfg = RewardSearchConfig(steps=1, num_candidates=4, minibatch_size=16, num_threads=8, selection="same",
                             straggler_timeout_s=0, **TINY)
    search = RewardSearch(QueryAwarePrompter(), Solver(), gsm8k_metric, optimizer_lm=optimizer_lm, config=cfg)
    in_flight = Overlap()
    with dspy.context(lm=task_lm, adapter=dspy.JSONAdapter()):
        state = search.start(trainset)
        with dspy.context(callbacks=[_CountCalls(task_lm, in_flight)]):
            step = search.step(state)
    assert step.error is None and len(step.candidates) == 4
    assert any(c.accuracy is not None for c in step.candidates)  # at least one candidate was evaluated
    assert 1 < in_flight.max <= cfg.num_threads
