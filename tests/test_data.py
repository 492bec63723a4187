"""Dataset loaders on ../shared/data, user files, splitting, and the errors bad data gets."""

import json
from pathlib import Path

import dspy
import pytest

from trprompt_dspy.data import loaders as data
from trprompt_dspy.data import (
    DATASETS,
    DataError,
    load_dataset,
    load_file,
    load_jsonl,
    split_examples,
)
from trprompt_dspy.metrics import metric_for

EXPECTED_COUNTS = {
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("gsm_hard", "test"): 1319,
    ("math", "train"): 7498,  # 7500 rows; two solutions box an empty answer and are skipped
    ("math", "test"): 5000,
    ("math500", "test"): 500,
    ("svamp", "test"): 1000,
}


@pytest.mark.parametrize("name,split", sorted(EXPECTED_COUNTS))
def test_local_datasets_load_with_expected_counts(shared_data_dir, name, split):
    examples = load_dataset(name, split, data_dir=shared_data_dir)
    assert len(examples) == EXPECTED_COUNTS[(name, split)]
    first = examples[0]
    assert isinstance(first, dspy.Example)
    assert set(first.inputs().keys()) == {"question"}
    assert isinstance(first.answer, str) and first.answer
    assert first.id == f"{name}-{split}-0"
    assert len({ex.id for ex in examples}) == len(examples)
    assert all(ex.answer.strip() and ex.question.strip() for ex in examples)


def test_gold_answers_score_as_correct_under_the_dataset_metric(shared_data_dir):
    # each dataset's own gold answer must pass its default metric (catches loader/metric drift)
    for name, split in [("gsm8k", "test"), ("gsm_hard", "test"), ("svamp", "test"), ("math500", "test")]:
        metric = metric_for(name)
        for ex in load_dataset(name, split, data_dir=shared_data_dir, limit=40):
            assert metric(ex, dspy.Prediction(answer=ex.answer)), (name, ex.id, ex.answer)


def test_data_dir_from_environment(shared_data_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(shared_data_dir))
    examples = load_dataset("math500", limit=5)
    assert [ex.id for ex in examples] == [f"math500-test-{i}" for i in range(5)]


def test_hub_path_offline_gives_an_actionable_error(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match="TRPROMPT_DATA_DIR"):
        load_dataset("gsm8k", "test", limit=2)


def test_hub_rows_convert_to_question_and_answer():
    # the row shapes of the public hub datasets (checked against their dataset cards)
    gsm = DATASETS["gsm8k"]
    row = {"question": "How many?", "answer": "2+2=<<2+2=4>>4\n#### 1,004"}
    assert (gsm.question(row), gsm.answer(row)) == ("How many?", "1004")
    hard = DATASETS["gsm_hard"]
    assert hard.answer({"input": "q", "target": 3244047.1}) == "3244047.1"
    assert hard.answer({"input": "q", "target": 18.0}) == "18"
    math_spec = DATASETS["math"]
    assert math_spec.answer({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$."}) == "\\frac{1}{2}"
    svamp = DATASETS["svamp"]
    assert svamp.question({"Body": "Dan had 4 . ", "Question": " How many?"}) == "Dan had 4 . How many?"
    assert svamp.answer({"Answer": 51.0}) == "51"


def test_split_is_deterministic_and_disjoint(shared_data_dir):
    examples = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=300)
    a = split_examples(examples, [200, 50], seed=3)
    b = split_examples(examples, [200, 50], seed=3)
    c = split_examples(examples, [200, 50], seed=4)
    assert [[e.id for e in part] for part in a] == [[e.id for e in part] for part in b]
    assert [e.id for e in a[0]] != [e.id for e in c[0]]
    assert not {e.id for e in a[0]} & {e.id for e in a[1]}
    assert [len(p) for p in a] == [200, 50]
    with pytest.raises(ValueError, match="only 300 are available"):
        split_examples(examples, [200, 101])
    with pytest.raises(ValueError, match="non-negative"):
        split_examples(examples, [-1])


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"question": "q1", "answer": "1"}, {"question": "q2"}], r"bad\.jsonl:2: missing field 'answer'"),
        ([{"question": "  ", "answer": "1"}], r"bad\.jsonl:1: field 'question' is empty"),
        ([{"question": "q", "answer": 42}], r"bad\.jsonl:1: field 'answer' must be a string, got int 42"),
        ([{"question": "q", "answer": None}], r"bad\.jsonl:1: field 'answer' must be a string, got NoneType"),
        ([{"question": ["q"], "answer": "1"}], r"bad\.jsonl:1: field 'question' must be a string, got list"),
        ([{"question": "q", "answer": "1"}, "{not json"], r"bad\.jsonl:2: not valid JSON"),
        (["[1, 2]"], r"bad\.jsonl:1: expected an object"),
        ([], r"bad\.jsonl: no examples"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_jsonl(path)


def test_user_files_with_named_columns(tmp_path):
    jsonl = _write_jsonl(tmp_path / "mine.jsonl", [{"q": "What is 2+2?", "a": 4}, {"q": "3+3?", "a": 6.0}])
    with pytest.raises(DataError, match="coerce_answers=True"):
        load_file(jsonl, question_field="q", answer_field="a")
    examples = load_file(jsonl, question_field="q", answer_field="a", coerce_answers=True)
    assert [(e.question, e.answer) for e in examples] == [("What is 2+2?", "4"), ("3+3?", "6")]

    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("problem,solution\nWhat is 2+2?,4\n,5\n")
    with pytest.raises(DataError, match=r"mine\.csv:3: field 'question' is empty"):
        load_file(csv_path, question_field="problem", answer_field="solution")
    csv_path.write_text("problem,solution\nWhat is 2+2?,4\n")
    (ex,) = load_file(csv_path, question_field="problem", answer_field="solution")
    assert (ex.question, ex.answer, set(ex.inputs().keys())) == ("What is 2+2?", "4", {"question"})

    with pytest.raises(DataError, match="unsupported file type"):
        load_file(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no such file"):
        load_file(tmp_path / "missing.jsonl")


def test_dataset_name_split_and_folder_errors(shared_data_dir, tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'gsm9k'; known: gsm8k"):
        load_dataset("gsm9k", data_dir=shared_data_dir)
    with pytest.raises(DataError, match="math500 splits in .*: test"):
        load_dataset("math500", "train", data_dir=shared_data_dir)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("gsm8k", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match="limit must be positive"):
        load_dataset("gsm8k", data_dir=shared_data_dir, limit=0)


@pytest.mark.parametrize("operation", ["add", "sub", "mul", "div", "compare"])
def test_no_word_problem_is_answered_by_echoing_one_of_its_numbers(operation):
    from trprompt_dspy.data.word_problems import word_problems
    from trprompt_dspy.metrics import numbers_in

    metric = metric_for("words")
    questions = word_problems(60, operations=(operation,), max_number=10) + word_problems(
        60, split="train", operations=(operation,), max_number=10)
    for ex in questions:
        assert metric(ex, dspy.Prediction(answer=ex.answer))
        # a reply repeating any number the question holds (the last one, say) is never right
        for number in numbers_in(ex.question):
            assert not metric(ex, dspy.Prediction(answer=f"{number:g}")), ex.question
    if operation == "compare":
        assert all(int(ex.answer) < max(numbers_in(ex.question)) for ex in questions)
