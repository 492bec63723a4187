"""Every baseline through the real stack on the tiny model: it runs and returns a prediction for
every question (issue 7). Accuracy of a random model means nothing; the plumbing does."""

import json

import dspy
import pytest

from trprompt_dspy.baselines import (
    QPO_REWARD_TEMPLATE,
    QPOTeleprompter,
    ZeroShot,
    ZeroShotCoT,
    copro_instruction,
    textgrad_instruction,
    untrained_prompter,
)
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.evaluation import evaluate
from trprompt_dspy.metrics import gsm8k_metric
from trprompt_dspy.infra.runs import read_jsonl
from trprompt_dspy.infra.structured import SafeJSONAdapter

from test_teleprompter import tiny_config  # noqa: E402


@pytest.fixture
def tiny_lm(vllm_server):
    lm = vllm_server.lm(structured=True, max_tokens=96, max_string_length=120, cache=False)
    with dspy.context(lm=lm, adapter=SafeJSONAdapter()):
        yield lm
    for name in list(vllm_server.adapters):
        vllm_server.unload_adapter(name)


@pytest.fixture
def questions(shared_data_dir):
    return load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=3)


def _answers_everything(program, questions):
    report = evaluate(program, questions, gsm8k_metric, num_threads=4, progress=False)
    assert report.n == len(questions)
    assert len(report.rows) == len(questions) and all("correct" in row for row in report.rows)
    return report


@pytest.mark.parametrize("make", [ZeroShot, ZeroShotCoT, untrained_prompter])
def test_prompt_baselines_answer_every_question(tiny_lm, questions, make):
    _answers_everything(make(), questions)


def test_qpo_trains_on_returns_and_answers_every_question(vllm_server, tiny_lm, questions, shared_data_dir, tmp_path):
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    tele = QPOTeleprompter(server=vllm_server, metric=gsm8k_metric, loops=2, log_dir=tmp_path / "qpo",
                           config=tiny_config(validate_initial=False),
                           lm_kwargs={"max_tokens": 96, "max_string_length": 120, "cache": False})
    compiled = tele.compile(__import__("trprompt_dspy").TRPromptProgram(), trainset=train)
    # queried with the highest return; trained on the returns the prompts earned
    assert compiled.prompter.reward == QPO_REWARD_TEMPLATE.format(score=1.0)
    rewards = {r["critique"] for r in read_jsonl(tmp_path / "qpo" / "round_2" / "records.jsonl")}
    assert rewards <= {QPO_REWARD_TEMPLATE.format(score=s) for s in (0.0, 1.0)}
    report = json.loads((tmp_path / "qpo" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2] and all(r["reward_search"]["skipped"] for r in report["rounds"])
    _answers_everything(compiled, questions)


def test_textgrad_instruction_search_answers_every_question(tiny_lm, questions, shared_data_dir, tmp_path):
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    program, result = textgrad_instruction(train, gsm8k_metric, optimizer_lm=tiny_lm,
                                           config=tiny_config().search, run_dir=tmp_path / "tg")
    assert program.prompter.reward == result.best_reward and (tmp_path / "tg" / "reward_search.json").is_file()
    report = _answers_everything(program, questions)
    # one instruction for every question: each prediction carries the searched text as its prompt
    prompts = [row["prediction"]["prompt"] for row in report.rows if row["prediction"]]
    assert prompts and set(prompts) == {result.best_reward}


def test_copro_instruction_answers_every_question(vllm_server, tiny_lm, questions, shared_data_dir):
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=2)
    # COPRO does not catch an unparseable proposal: short strings and a token budget that always
    # fits the whole JSON reply of the random tiny model
    proposer = vllm_server.lm(structured=True, max_tokens=400, max_string_length=40, cache=False)
    program = copro_instruction(train, gsm8k_metric, prompt_lm=proposer, breadth=2, depth=1, num_threads=4)
    assert program.solver.solve.signature.instructions  # an instruction was chosen
    _answers_everything(program, questions)


def test_accuracy_benchmark_writes_json_table_and_plot(vllm_server, shared_data_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--model", vllm_server.model_path, "--dataset", "gsm8k", "--data-dir",
         str(shared_data_dir), "--train", "4", "--val", "2", "--test", "3", "--methods", "zero-shot,qpo,textgrad-instruction",
         "--num-threads", "4", "--name", "tiny", "--out-dir", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "accuracy-tiny.json").read_text())
    assert list(results["methods"]) == ["zero-shot", "qpo", "textgrad-instruction"]
    for row in results["methods"].values():
        assert row["n"] == 3 and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    assert results["methods"]["qpo"]["lm_calls"] > 0  # training calls are counted
    table = (tmp_path / "out" / "accuracy-tiny.md").read_text()
    assert "| QPO (re-impl.) |" in table and "95% interval" in table
    assert (tmp_path / "out" / "accuracy-tiny.png").stat().st_size > 1000
