"""``programs/custom_task.py`` through the real stack on the tiny model: a user's own task with
no numeric answer, scored by an LLM judge (the paper's open question 2), compiled for one round.
(The other example programs run in tests/test_cli.py on the tiny demo's saved program.)"""

import importlib.util
import json
from pathlib import Path

import dspy
import pytest

from helpers import TINY_LM_KWARGS, tiny_config
from trprompt_dspy.infra.evaluation import evaluate
from trprompt_dspy.infra.runs import read_jsonl
from trprompt_dspy.infra.structured import SafeJSONAdapter

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"


@pytest.fixture(scope="module")
def custom_task():
    spec = importlib.util.spec_from_file_location("custom_task", PROGRAMS / "custom_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_judge_metric_scores_through_the_local_model(custom_task, vllm_server):
    example = dspy.Example(question="Send me the report now.", answer="the report").with_inputs("question")
    custom_task.judge.set_lm(vllm_server.lm(structured=True, **TINY_LM_KWARGS))
    # no key fact: rejected before the judge is asked
    assert custom_task.judged_metric(example, dspy.Prediction(answer="Hello there!")) is False
    assert not custom_task.judge.lm.history
    # with the key fact the (tiny, random) judge decides, with no adapter configured: it is asked
    # about this rewrite, vLLM is sent the judge's JSON schema, and the verdict is the model's reply
    rewritten = "Could you send me the report, please?"
    verdict = custom_task.judged_metric(example, dspy.Prediction(answer=rewritten))
    (call,) = custom_task.judge.lm.history
    inputs = {"original": example.question, "key_fact": "the report", "rewritten": rewritten}
    assert call["messages"] == SafeJSONAdapter().format(custom_task.Judge, demos=[], inputs=inputs)
    schema = call["kwargs"]["extra_body"]["structured_outputs"]["json"]
    assert schema["properties"]["acceptable"]["type"] == "boolean" and schema["required"] == ["acceptable"]
    output = call["outputs"][0]
    reply = json.loads(output if isinstance(output, str) else output["text"])
    assert type(reply["acceptable"]) is bool and verdict is reply["acceptable"]


def test_custom_judged_task_compiles_one_round(custom_task, clean_adapters, tmp_path):
    examples, metric, program = custom_task.polite_task()
    log_dir = tmp_path / "run"
    compiled, val = custom_task.compile_task(
        clean_adapters, examples, metric, program, log_dir=log_dir, lm_kwargs=dict(TINY_LM_KWARGS),
        config=tiny_config(rounds=1, validate_initial=False),
    )
    prompt = compiled.prompter(question=val[0].question).prompt
    # the whole compiled program on the validation messages; a tiny random model's rewrite can
    # run past max_tokens and not parse (seen once in CI), which evaluate counts, not raises
    run = evaluate(compiled, val, lambda example, prediction, trace=None: True, progress=False)

    assert len(val) == 4 and isinstance(prompt, str) and prompt
    assert run.n == 4 and run.n_correct + run.n_errors == 4 and run.n_correct >= 1, run.error_counts
    records = read_jsonl(log_dir / "round_1" / "records.jsonl")
    assert len(records) == 16  # 8 training messages x 2 sampled prompts, each critiqued
    assert all(r["question"] in {q for q, _ in custom_task.BLUNT} for r in records)
    report = json.loads((log_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1] and report["rounds"][0]["validation"]["n"] == 4
    assert compiled.prompter.adapter["name"].startswith("prompter-r1-")


def test_trprompt_against_gepa_on_the_same_questions(clean_adapters, shared_data_dir, tmp_path):
    """``programs/trprompt_vs_gepa.py``: both optimizers on the same Solver and questions, GEPA at
    TRPrompt's budget of Solver runs, the paired comparison computed from the same test answers."""
    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.metrics import gsm8k_metric

    spec = importlib.util.spec_from_file_location("trprompt_vs_gepa", PROGRAMS / "trprompt_vs_gepa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pool = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=6)
    test = load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=3)
    with dspy.context(lm=clean_adapters.lm(structured=True, **TINY_LM_KWARGS)):
        out = module.compare(clean_adapters, pool[:4], pool[4:], test, gsm8k_metric, log_dir=tmp_path / "cmp",
                             config=tiny_config(rounds=1, validate_initial=False), lm_kwargs=dict(TINY_LM_KWARGS))
    for name in ("trprompt", "gepa"):
        r = out[name]
        assert len(r["correct"]) == 3 and r["accuracy"] == sum(r["correct"]) / 3 and r["optimization_lm_calls"] > 0
    assert out["trprompt"]["program"].prompter.adapter["name"].startswith("prompter-r1-")
    assert out["gepa"]["budget_target_calls"] > 0 and isinstance(out["gepa"]["instruction"], str)
    m = out["mcnemar"]
    assert m["trprompt_only"] == sum(a and not b for a, b in zip(out["trprompt"]["correct"], out["gepa"]["correct"]))
    assert m["gepa_only"] == sum(b and not a for a, b in zip(out["trprompt"]["correct"], out["gepa"]["correct"]))
    assert 0.0 <= m["p"] <= 1.0
