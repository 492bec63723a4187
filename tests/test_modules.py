"""Modules with scripted LMs (DSPy's DummyLM): forward passes, per-module LMs, saved reward,
and batches that survive unparseable output. The same modules run on the real vLLM engine in
the serving tests."""

import json

import dspy
import pytest
from dspy.utils.dummies import DummyLM

import trprompt_dspy as t
from trprompt_dspy.infra.evaluation import EvaluationFailed, evaluate
from trprompt_dspy.metrics import gsm8k_metric
from trprompt_dspy.infra.parallel import run_parallel
from trprompt_dspy.prompts.defaults import INITIAL_REWARD


def _last_user_message(lm) -> str:
    return lm.history[-1]["messages"][-1]["content"]


def test_each_module_forward_pass():
    lm = DummyLM(
        [
            {"prompt": "Subtract what she eats, then multiply by the price."},
            {"critique": "The prompt named the right steps."},
            {"reasoning": "16-3-4=9; 9*2=18", "answer": "18"},
        ]
    )
    with dspy.context(lm=lm):
        prompt = t.QueryAwarePrompter()(question="Janet's ducks lay 16 eggs...").prompt
        critique = t.TextualCritic()(
            question="q", prompt=prompt, solver_reasoning="r", solver_answer="18",
            reference_answer="18", is_correct=True,
        ).critique
        solved = t.Solver()(question="q", prompt=prompt)
    assert prompt == "Subtract what she eats, then multiply by the price."
    assert critique == "The prompt named the right steps."
    assert (solved.reasoning, solved.answer) == ("16-3-4=9; 9*2=18", "18")


def test_prompter_fills_in_its_reward_and_accepts_an_override():
    lm = DummyLM([{"prompt": "p1"}, {"prompt": "p2"}])
    prompter = t.QueryAwarePrompter(reward="Concise and correct.", lm=lm)
    prompter(question="What is 2+2?")
    assert "Concise and correct." in _last_user_message(lm)
    prompter(question="What is 2+2?", textual_reward="The prompt misled the solver.")
    assert "The prompt misled the solver." in _last_user_message(lm)
    assert "Concise and correct." not in _last_user_message(lm)
    assert t.QueryAwarePrompter().reward == INITIAL_REWARD
    with pytest.raises(ValueError, match="non-empty string"):
        prompter.reward = "   "
    with pytest.raises(ValueError, match="non-empty string"):
        t.QueryAwarePrompter(reward=None)


def test_program_routes_each_role_to_its_own_lm():
    prompter_lm = DummyLM([{"prompt": "Add the two numbers."}])
    solver_lm = DummyLM([{"reasoning": "2+2=4", "answer": "4"}])
    global_lm = DummyLM([{"prompt": "WRONG LM"}] * 3)
    program = t.TRPromptProgram()
    program.prompter.set_lm(prompter_lm)
    program.solver.set_lm(solver_lm)
    with dspy.context(lm=global_lm):
        out = program(question="What is 2+2?")
    assert (out.prompt, out.reasoning, out.answer) == ("Add the two numbers.", "2+2=4", "4")
    assert len(prompter_lm.history) == 1 and len(solver_lm.history) == 1 and not global_lm.history
    # the solver saw the prompter's prompt
    assert "Add the two numbers." in _last_user_message(solver_lm)

    critic_lm = DummyLM([{"critique": "fine"}])
    critic = t.TextualCritic(lm=critic_lm)
    with dspy.context(lm=global_lm):
        critic(question="q", prompt="p", solver_reasoning="r", solver_answer="4", reference_answer="4", is_correct=True)
    assert len(critic_lm.history) == 1 and not global_lm.history


def test_saved_program_round_trips_the_reward(tmp_path):
    program = t.TRPromptProgram(prompter=t.QueryAwarePrompter(reward="t*: explain each step."))
    program.save(tmp_path / "compiled")
    state_file = tmp_path / "compiled" / "program.json"
    assert json.loads(state_file.read_text())["prompter.generate"]["reward"] == "t*: explain each step."
    assert not list((tmp_path / "compiled").glob("*.pkl"))

    restored = t.TRPromptProgram()
    assert restored.prompter.reward == INITIAL_REWARD
    restored.load(tmp_path / "compiled")
    assert restored.prompter.reward == "t*: explain each step."

    program.save(tmp_path / "state.json")
    again = t.TRPromptProgram()
    again.load(tmp_path / "state.json")
    assert again.prompter.reward == "t*: explain each step."

    with pytest.raises(FileNotFoundError, match="no program.json"):
        t.TRPromptProgram().load(tmp_path)


def test_prompter_reward_survives_save_and_load_inside_another_pipeline(tmp_path):
    class VerifyPipeline(dspy.Module):
        """A different program that reuses a prompter: prompt -> CoT -> verification."""

        def __init__(self):
            super().__init__()
            self.prompter = t.QueryAwarePrompter()
            self.solve = dspy.ChainOfThought("question, prompt -> answer")
            self.verify = dspy.Predict("question, answer -> is_correct: bool")

    pipeline = VerifyPipeline()
    pipeline.prompter.reward = "t*: name the unknown first."
    pipeline.save(str(tmp_path / "pipeline.json"))
    loaded = VerifyPipeline()
    loaded.load(str(tmp_path / "pipeline.json"))
    assert loaded.prompter.reward == "t*: name the unknown first."


def test_saved_state_holds_no_api_key(tmp_path):
    program = t.TRPromptProgram()
    program.prompter.set_lm(dspy.LM("openai/gpt-4o-mini", api_key="sk-PLANTED-SECRET-123"))
    program.save(tmp_path / "out")
    assert "sk-PLANTED-SECRET-123" not in (tmp_path / "out" / "program.json").read_text()


def test_bad_reward_in_saved_state_is_rejected(tmp_path):
    program = t.TRPromptProgram()
    program.save(tmp_path / "out")
    path = tmp_path / "out" / "program.json"
    state = json.loads(path.read_text())
    state["prompter.generate"]["reward"] = 42
    path.write_text(json.dumps(state))
    fresh = t.TRPromptProgram()
    with pytest.raises(ValueError, match="non-empty string"):
        fresh.load(tmp_path / "out")
    assert fresh.prompter.reward == INITIAL_REWARD  # untouched after the failed load


def test_unparseable_replies_are_counted_not_raised():
    # keyed by question: two questions get parseable answers, one gets a reply with no fields
    solver_lm = DummyLM(
        {
            "What is 2+2?": {"reasoning": "2+2", "answer": "4"},
            "What is 3+3?": {"reasoning": "3+3", "answer": "7"},
            "What is 5+5?": {"rambling": "I like turtles"},
        }
    )
    examples = [
        dspy.Example(id=str(i), question=q, answer=a).with_inputs("question")
        for i, (q, a) in enumerate([("What is 2+2?", "4"), ("What is 3+3?", "6"), ("What is 5+5?", "10")])
    ]
    report = evaluate(t.Solver(lm=solver_lm), examples, gsm8k_metric, num_threads=3, progress=False)
    assert (report.n, report.n_correct, report.n_errors) == (3, 1, 1)
    assert report.error_counts == {"AdapterParseError": 1}
    assert [row["correct"] for row in report.rows] == [True, False, False]
    assert report.rows[2]["error"].startswith("AdapterParseError")
    assert report.rows[0]["prediction"]["answer"] == "4"
    assert report.accuracy == pytest.approx(1 / 3)


def test_evaluation_that_cannot_reach_the_lm_says_so():
    class Unreachable(dspy.Module):
        def forward(self, question):
            raise ConnectionError("connection refused")

    examples = [dspy.Example(question=f"q{i}", answer="1").with_inputs("question") for i in range(3)]
    with pytest.raises(EvaluationFailed, match="all 3 examples failed; first error: ConnectionError"):
        evaluate(Unreachable(), examples, gsm8k_metric, num_threads=2, progress=False)
    with pytest.raises(ValueError, match="at least one example"):
        evaluate(Unreachable(), [], gsm8k_metric)


def test_run_parallel_keeps_order_and_counts_failures():
    def square_or_fail(x):
        if x % 3 == 0:
            raise KeyError(x)
        return x * x

    result = run_parallel(square_or_fail, list(range(10)), num_threads=4, progress=False)
    assert result.outputs == [None, 1, 4, None, 16, 25, None, 49, 64, None]
    assert sorted(result.errors) == [0, 3, 6, 9]
    assert result.error_counts() == {"KeyError": 4}
    with pytest.raises(ValueError, match="num_threads"):
        run_parallel(square_or_fail, [1], num_threads=0)


def test_call_cost_uses_litellm_prices_and_is_unknown_for_local_models():
    from trprompt_dspy.infra.usage import call_cost

    assert call_cost("hosted_vllm/base", 100, 10) is None
    assert call_cost("no-such-provider/no-such-model", 100, 10) is None
    cost = call_cost("gpt-4o-mini", 1_000_000, 0)
    assert cost is not None and 0.01 < cost < 10  # a price from litellm's local map, in USD


def test_usage_meter_tells_roles_apart_when_they_share_one_lm():
    from trprompt_dspy.infra.usage import UsageMeter
    from trprompt_dspy.modules.roles import MODULE_ROLES

    shared = DummyLM([{"prompt": "Think.", "reasoning": "r", "answer": "4", "critique": "ok"}] * 10)
    optimizer = DummyLM([{"x": "y"}])
    meter = UsageMeter(MODULE_ROLES)
    meter.assign_role(optimizer, "optimizer")
    prompter, solver = t.QueryAwarePrompter(), t.Solver()
    with dspy.context(lm=shared), meter.stage("round_1/rollout"):
        prompt = prompter(question="2+2?").prompt
        solver(question="2+2?", prompt=prompt)
        optimizer("improve the reward")
    with meter.stage("round_1/validation"):
        with dspy.context(lm=shared):
            solver(question="3+3?", prompt=prompt)
    rollout = meter.by_stage("round_1/rollout")
    assert {role: sum(m["calls"] for m in models.values()) for role, models in rollout.items()} == {
        "prompter": 1, "target": 1, "optimizer": 1}
    assert meter.by_role()["target"]["calls"] == 2 and meter.totals()["calls"] == 4
    assert meter.by_role()["target"]["cost_usd"] is None  # no price known for this model
