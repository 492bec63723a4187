"""Rollout: records from scripted LMs (pure logic), resume from a records file, and one pass
through the real vLLM server on the tiny model."""

import dataclasses

import dspy
import pytest
from dspy.utils.dummies import DummyLM

import trprompt_dspy as t
from trprompt_dspy.data import load_dataset
from trprompt_dspy.metrics import gsm8k_metric, metric_for
from trprompt_dspy.rollout.rollout import RolloutConfig, numeric_reward, run_rollout
from trprompt_dspy.infra.runs import read_jsonl
from trprompt_dspy.prompts.signatures import CritiquePrompt
from trprompt_dspy.rollout.records import read_records


def _examples(n):
    return [dspy.Example(id=f"q{i}", question=f"What is {i}+{i}?", answer=str(2 * i)).with_inputs("question") for i in range(n)]


def _roles(n_prompts, solver_answers, critic=True):
    prompter = t.QueryAwarePrompter(lm=DummyLM([{"prompt": f"prompt-{i}"} for i in range(n_prompts)]))
    solver = t.Solver(lm=DummyLM(solver_answers))
    critic_module = t.TextualCritic(lm=DummyLM([{"critique": f"critique-{i}"} for i in range(n_prompts)])) if critic else None
    return prompter, solver, critic_module


def test_records_pair_each_prompt_with_its_critique_and_score(tmp_path):
    examples = _examples(2)
    # sequential (num_threads=1): q0 sample 0, q0 sample 1, q1 sample 0, q1 sample 1
    solver_answers = [{"reasoning": "r", "answer": a} for a in ("0", "5", "2", "2")]
    prompter, solver, critic = _roles(4, solver_answers)
    path = tmp_path / "records.jsonl"
    result = run_rollout(
        prompter, solver, critic, examples, gsm8k_metric, reward="be clear", round_index=1,
        config=RolloutConfig(n_samples=2, num_threads=1), records_path=path, progress=False,
    )
    assert (result.n_new, result.n_resumed, result.n_failed) == (4, 0, 0)
    assert [(r.example_id, r.extra["sample"], r.prompt, r.correct) for r in result.records] == [
        ("q0", 0, "prompt-0", True), ("q0", 1, "prompt-1", False), ("q1", 0, "prompt-2", True), ("q1", 1, "prompt-3", True),
    ]
    assert [r.critique for r in result.records] == ["critique-0", "critique-1", "critique-2", "critique-3"]
    assert all(r.reward == "be clear" and r.round == 1 for r in result.records)
    assert result.accuracy == 0.75
    assert result.answer_in_prompt_rate == 0.0 and result.summary()["answer_in_prompt_rate"] == 0.0
    leaky = dataclasses.replace(result, records=[dataclasses.replace(r, prompt=f"The answer is {r.reference}.")
                                                 for r in result.records])
    assert leaky.answer_in_prompt_rate == 0.5  # q1 (2): given away; q0 (0): a number of the question itself
    # the prompter was conditioned on the reward, with a distinct rollout id per sample
    history = prompter.generate.lm.history
    assert all("be clear" in h["messages"][-1]["content"] for h in history)
    assert [h["kwargs"]["rollout_id"] for h in history] == [100_000, 100_001, 100_000, 100_001]
    # the file holds the same records
    assert [row["prompt"] for row in read_jsonl(path)] == ["prompt-0", "prompt-1", "prompt-2", "prompt-3"]


def test_the_seed_reaches_every_sampled_prompt():
    """Repeated runs with other seeds in one process must not share DSPy's cached samples."""
    ids = {}
    for seed in (0, 3):
        prompter, solver, critic = _roles(2, [{"reasoning": "r", "answer": "0"}] * 2)
        run_rollout(prompter, solver, critic, _examples(1), gsm8k_metric, reward="x", round_index=2,
                    config=RolloutConfig(n_samples=2, num_threads=1, seed=seed), progress=False)
        ids[seed] = [h["kwargs"]["rollout_id"] for h in prompter.generate.lm.history]
    assert ids[0] == [200_000, 200_001] and len(set(ids[0]) | set(ids[3])) == 4
    config = t.TRPromptConfig(seed=3)
    assert config.rollout.seed == 3 and config.search.seed == 3
    assert t.TRPromptConfig(seed=3, rollout=RolloutConfig(seed=5)).rollout.seed == 5  # its own seed is kept


def test_resume_keeps_completed_records_and_generates_only_the_rest(tmp_path):
    examples = _examples(2)
    path = tmp_path / "records.jsonl"
    first = run_rollout(
        *_roles(2, [{"reasoning": "r", "answer": "0"}, {"reasoning": "r", "answer": "0"}]),
        examples[:1], gsm8k_metric, reward="x", config=RolloutConfig(n_samples=2, num_threads=1),
        records_path=path, progress=False,
    )
    assert first.n_new == 2
    # simulate a kill mid-write: a torn last line is dropped, not fatal
    with open(path, "a") as f:
        f.write('{"question": "torn')
    prompter, solver, critic = _roles(2, [{"reasoning": "r", "answer": "2"}] * 2)
    second = run_rollout(
        prompter, solver, critic, examples, gsm8k_metric, reward="x",
        config=RolloutConfig(n_samples=2, num_threads=1), records_path=path, progress=False,
    )
    assert (second.n_resumed, second.n_new) == (2, 2)
    assert len(prompter.generate.lm.history) == 2  # only q1's two samples were generated
    assert [r.example_id for r in second.records] == ["q0", "q0", "q1", "q1"]


def test_unparseable_solver_reply_is_a_wrong_answer_with_a_critique_and_bad_prompter_reply_is_counted():
    examples = _examples(2)
    prompter = t.QueryAwarePrompter(lm=DummyLM({"What is 0+0?": {"prompt": "ok"}, "What is 1+1?": {"nothing": "x"}}))
    solver = t.Solver(lm=DummyLM([{"no_fields": "garbage"}] * 4))
    critic = t.TextualCritic(lm=DummyLM([{"critique": "the prompt did not help"}] * 2))
    result = run_rollout(
        prompter, solver, critic, examples, gsm8k_metric, reward="x",
        config=RolloutConfig(n_samples=1, num_threads=1), progress=False,
    )
    assert result.n_failed == 1 and result.error_counts == {"AdapterParseError": 1}
    (record,) = result.records
    assert (record.example_id, record.correct, record.answer) == ("q0", False, "")
    assert record.critique == "the prompt did not help"
    assert "could not be parsed" in record.reasoning


def test_numeric_reward_mode_needs_no_critic():
    prompter, solver, _ = _roles(2, [{"reasoning": "r", "answer": "0"}, {"reasoning": "r", "answer": "3"}], critic=False)
    result = run_rollout(
        prompter, solver, None, _examples(2), gsm8k_metric, reward=numeric_reward(1.0),
        config=RolloutConfig(n_samples=1, num_threads=1, reward="numeric"), progress=False,
    )
    assert [r.critique for r in result.records] == [numeric_reward(1.0), numeric_reward(0.0)]
    assert "1.00" in numeric_reward(1.0) and "0.00" in numeric_reward(0.0)


def test_bad_rollout_arguments():
    prompter, solver, critic = _roles(1, [])
    with pytest.raises(ValueError, match="TextualCritic is needed"):
        run_rollout(prompter, solver, None, _examples(1), gsm8k_metric, reward="x")
    with pytest.raises(ValueError, match="at least one example"):
        run_rollout(prompter, solver, critic, [], gsm8k_metric, reward="x")
    duplicated = _examples(1) * 2
    with pytest.raises(ValueError, match="distinct ids"):
        run_rollout(prompter, solver, critic, duplicated, gsm8k_metric, reward="x")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RolloutConfig(n_samples=2, temperature=0)
    with pytest.raises(ValueError, match="n_samples"):
        RolloutConfig(n_samples=0)
    with pytest.raises(ValueError, match="reward must be"):
        RolloutConfig(reward="scalar")


def test_rollout_through_the_vllm_server(vllm_server, shared_data_dir, tmp_path):
    lm = vllm_server.lm(structured=True, max_tokens=96, temperature=0, cache=False, max_string_length=120)
    examples = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=3)
    path = tmp_path / "records.jsonl"
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        result = run_rollout(
            t.QueryAwarePrompter(), t.Solver(), t.TextualCritic(), examples, metric_for("gsm8k"),
            reward="be specific", config=RolloutConfig(n_samples=2, temperature=1.0, num_threads=6),
            records_path=path, progress=False,
        )
    assert result.n_failed == 0, result.error_counts
    assert len(result.records) == 6 and len(read_jsonl(path)) == 6
    # two samples per question at temperature 1 from a random model: the prompts differ
    for i in range(3):
        a, b = result.records[2 * i], result.records[2 * i + 1]
        assert a.example_id == b.example_id and a.prompt != b.prompt
    # each critique is the critic's reply about exactly that record: its prompt, answer and verdict
    adapter = dspy.JSONAdapter()
    for r in result.records:
        inputs = dict(question=r.question, prompt=r.prompt, solver_reasoning=r.reasoning, solver_answer=r.answer,
                      reference_answer=r.reference, is_correct=r.correct)
        expected = adapter.format(CritiquePrompt, demos=[], inputs=inputs)
        (call,) = [entry for entry in lm.history if entry["messages"] == expected]
        reply = call["outputs"][0]
        assert adapter.parse(CritiquePrompt, reply if isinstance(reply, str) else reply["text"])["critique"] == r.critique
    # the file holds the same records (in the order they finished), as plain JSON
    key = lambda r: (r.example_id, r.extra["sample"])  # noqa: E731
    assert sorted(read_records(path), key=key) == result.records


def test_qpo_returns_add_the_rounds_mean_accuracy_and_keep_a_repeated_prompt_once():
    from trprompt_dspy.prompts.defaults import QPO_REWARD_TEMPLATE
    from trprompt_dspy.rollout.records import RolloutRecord
    from trprompt_dspy.rollout.rollout import QPO_MAX_RETURN, qpo_returns

    records = [RolloutRecord(question="q1", prompt="p1", critique="c", correct=True),
               RolloutRecord(question="q1", prompt="p1", critique="c", correct=True),  # the same sample again
               RolloutRecord(question="q1", prompt="p2", critique="c", correct=False),
               RolloutRecord(question="q2", prompt="p1", critique="c", correct=False, score=0.5)]
    out = qpo_returns(records, QPO_REWARD_TEMPLATE)
    # mean score of the round: (1 + 1 + 0 + 0.5) / 4 = 0.625, every record's 10 x that plus 10 x its own
    assert [(r.question, r.prompt) for r in out] == [("q1", "p1"), ("q1", "p2"), ("q2", "p1")]
    assert [r.critique for r in out] == [QPO_REWARD_TEMPLATE.format(score=s) for s in (16.25, 6.25, 11.25)]
    assert records[0].critique == "c"  # the records read from disk are left as they were
    assert QPO_REWARD_TEMPLATE.format(score=QPO_MAX_RETURN) == QPO_REWARD_TEMPLATE.format(score=10 * 1 + 10 * 1.0)
    assert qpo_returns([]) == []
