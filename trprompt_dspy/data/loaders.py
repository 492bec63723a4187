"""Datasets as ``dspy.Example`` lists: GSM8K, GSM-Hard, MATH, MATH-500, SVAMP and user files.

Each built-in dataset loads from its public hub name through ``datasets`` or, when a local data
folder is given (``data_dir=`` or the ``TRPROMPT_DATA_DIR`` environment variable), from
``<data_dir>/<name>/<split>.jsonl`` laid out like ``../shared/data`` (one JSON object per line
with string fields ``question`` and ``answer``). Every example has ``question`` as its only
input and ``answer`` (a string) as its label, plus an ``id``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import dspy

from ..errors import TRPromptError
from ..metrics import last_braced

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "TRPROMPT_DATA_DIR"


class DataError(TRPromptError, ValueError):
    """Bad or missing data, with the file, line and field it concerns."""


# --------------------------------------------------------------------------- records -> examples

def _make_example(question: Any, answer: Any, *, id: str, where: str, coerce_answer: bool) -> dspy.Example:
    if not isinstance(question, str):
        raise DataError(f"{where}: field 'question' must be a string, got {type(question).__name__}")
    if not question.strip():
        raise DataError(f"{where}: field 'question' is empty")
    if isinstance(answer, bool) or not isinstance(answer, str):
        if coerce_answer and isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = _format_number(answer)
        else:
            raise DataError(
                f"{where}: field 'answer' must be a string, got {type(answer).__name__} {answer!r}"
                + (" (pass coerce_answers=True to accept numbers)" if isinstance(answer, (int, float)) else "")
            )
    if not answer.strip():
        raise DataError(f"{where}: field 'answer' is empty")
    return dspy.Example(id=id, question=question.strip(), answer=answer.strip()).with_inputs("question")


def _format_number(x: int | float) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def _records_to_examples(
    records: Iterable[tuple[str, dict]],
    *,
    source: str,
    question_field: str,
    answer_field: str,
    id_field: str | None,
    coerce_answers: bool,
    skip_empty_answers: bool = False,
) -> list[dspy.Example]:
    examples, skipped = [], []
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with fields, got {type(record).__name__}")
        for field in (question_field, answer_field):
            if field not in record:
                present = ", ".join(sorted(map(str, record))[:12])
                raise DataError(f"{where}: missing field {field!r} (fields present: {present})")
        if skip_empty_answers and isinstance(record[answer_field], str) and not record[answer_field].strip():
            skipped.append(where)
            continue
        ex_id = str(record[id_field]) if id_field and record.get(id_field) is not None else f"{source}-{len(examples)}"
        examples.append(
            _make_example(record[question_field], record[answer_field], id=ex_id, where=where, coerce_answer=coerce_answers)
        )
    if skipped:
        logger.warning("%s: skipped %d rows with an empty answer (first: %s)", source, len(skipped), skipped[0])
    if not examples:
        raise DataError(f"{source}: no examples (the dataset is empty)")
    return examples


# --------------------------------------------------------------------------- user files

def load_jsonl(
    path: str | os.PathLike,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = "id",
    coerce_answers: bool = False,
    limit: int | None = None,
    skip_empty_answers: bool = False,
) -> list[dspy.Example]:
    """Load a JSONL file (one object per line) with named question/answer fields.

    Any bad row raises ``DataError`` naming the file, line and field. ``coerce_answers`` accepts
    numeric answers (turned into strings); ``skip_empty_answers`` drops rows whose answer is an
    empty string, with a warning, instead of raising.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")

    def records():
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and lineno > limit:
                    return
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None

    return _records_to_examples(
        records(), source=str(path), question_field=question_field, answer_field=answer_field,
        id_field=id_field, coerce_answers=coerce_answers, skip_empty_answers=skip_empty_answers,
    )


def load_csv(
    path: str | os.PathLike,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = "id",
    limit: int | None = None,
) -> list[dspy.Example]:
    """Load a CSV file with a header row naming the question/answer columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        # line 1 is the header; DictReader does not report physical line numbers of rows
        rows = [(f"{path}:{i}", row) for i, row in enumerate(reader, 2) if limit is None or i - 1 <= limit]
    return _records_to_examples(
        rows, source=str(path), question_field=question_field, answer_field=answer_field,
        id_field=id_field, coerce_answers=False,
    )


def load_file(path: str | os.PathLike, **kwargs: Any) -> list[dspy.Example]:
    """Load a user's own ``.jsonl``/``.json`` lines or ``.csv`` file (see ``load_jsonl``/``load_csv``)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return load_jsonl(path, **kwargs)
    if suffix == ".csv":
        kwargs.pop("coerce_answers", None)
        return load_csv(path, **kwargs)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv")


# --------------------------------------------------------------------------- built-in datasets

def _last_boxed(solution: str) -> str:
    return last_braced(solution, "\\boxed") or ""


def _gsm8k_answer(row: dict) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives on the hub and how its rows become (question, answer) strings."""

    name: str
    hub_id: str
    hub_configs: tuple[str | None, ...]
    hub_splits: dict[str, str]  # our split name -> hub split name
    question: Callable[[dict], str]
    answer: Callable[[dict], str]
    local_splits: tuple[str, ...]
    description: str


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "gsm8k", "openai/gsm8k", ("main",), {"train": "train", "test": "test"},
            lambda r: r["question"], _gsm8k_answer, ("train", "test"),
            "Grade-school math word problems (Cobbe et al. 2021); integer answers.",
        ),
        DatasetSpec(
            "gsm_hard", "reasoning-machines/gsm-hard", (None,), {"test": "train"},
            lambda r: r["input"], lambda r: _format_number(r["target"]), ("test",),
            "GSM8K test with large numbers (Gao et al. 2022); float answers, some gold answers wrong.",
        ),
        DatasetSpec(
            "math", "EleutherAI/hendrycks_math",
            ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
             "number_theory", "prealgebra", "precalculus"),
            {"train": "train", "test": "test"},
            lambda r: r["problem"], lambda r: _last_boxed(r["solution"]), ("train", "test"),
            "Competition mathematics (Hendrycks et al. 2021); LaTeX answers.",
        ),
        DatasetSpec(
            "math500", "HuggingFaceH4/MATH-500", (None,), {"test": "test"},
            lambda r: r["problem"], lambda r: r["answer"], ("test",),
            "The 500-problem MATH test subset of Lightman et al. 2023; LaTeX answers.",
        ),
        DatasetSpec(
            "svamp", "ChilleD/SVAMP", (None,), {"train": "train", "test": "test"},
            lambda r: f"{r['Body'].strip()} {r['Question'].strip()}", lambda r: _format_number(r["Answer"]),
            ("test",),
            "Simple arithmetic word problems with variations (Patel et al. 2021).",
        ),
    ]
}


#: the generated dataset (``tasks.word_problems``): the demo's task, no file or network needed
GENERATED_DATASET = "words"
GENERATED_DEFAULT_SIZE = 200


def dataset_names() -> list[str]:
    """Every name ``load_dataset`` accepts."""
    return [*DATASETS, GENERATED_DATASET]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: the argument, else ``$TRPROMPT_DATA_DIR``, else None (use the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist (from {'argument' if data_dir else DATA_DIR_ENV})")
    return path


def load_dataset(
    name: str,
    split: str = "test",
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[dspy.Example]:
    """Load a built-in dataset split as ``dspy.Example``s (inputs: ``question``; label: ``answer``).

    Args:
        name: one of ``DATASETS`` (gsm8k, gsm_hard, math, math500, svamp), or ``"words"``:
            one-step word problems the library generates (``tasks.word_problems`` with
            ``tasks.DEMO_OPERATIONS``, seed 0; ``limit`` questions, 200 by default), no file or
            network needed.
        split: ``train`` or ``test`` (what the dataset has; see ``DATASETS[name].local_splits``).
        data_dir: a local folder laid out like ``../shared/data``; default ``$TRPROMPT_DATA_DIR``;
            when neither is set the dataset comes from the hub by its public name.
        limit: keep the first ``limit`` examples (file order).

    Rows with an empty gold answer (two MATH train solutions box nothing) are skipped with a
    warning; any other bad row raises ``DataError``.
    """
    if name not in DATASETS and name != GENERATED_DATASET:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    if name == GENERATED_DATASET:
        from .word_problems import word_problems

        if split not in ("train", "test"):
            raise DataError(f"{name} has splits train and test, not {split!r}")
        from .word_problems import DEMO_MAX_NUMBER, DEMO_OPERATIONS

        return word_problems(limit or GENERATED_DEFAULT_SIZE, split=split, operations=DEMO_OPERATIONS,
                             max_number=DEMO_MAX_NUMBER)
    spec = DATASETS[name]
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        path = folder / name / f"{split}.jsonl"
        if not path.is_file():
            available = sorted(p.stem for p in (folder / name).glob("*.jsonl")) if (folder / name).is_dir() else []
            raise DataError(
                f"{path}: no such file; {name} splits in {folder}: {', '.join(available) or 'none'}"
            )
        # MATH train has two solutions with an empty \boxed{} (upstream defect): skip, not fail
        return load_jsonl(path, limit=limit, skip_empty_answers=True)
    return _load_from_hub(spec, split, limit)


def _load_from_hub(spec: DatasetSpec, split: str, limit: int | None) -> list[dspy.Example]:
    import datasets

    if split not in spec.hub_splits:
        raise DataError(f"{spec.name} has no split {split!r} on the hub; available: {', '.join(spec.hub_splits)}")
    examples: list[dspy.Example] = []
    for config in spec.hub_configs:
        try:
            ds = datasets.load_dataset(spec.hub_id, config, split=spec.hub_splits[split])
        except Exception as exc:  # offline, unknown name, network: say what to do instead
            raise DataError(
                f"could not load {spec.hub_id}{'/' + config if config else ''} from the hub ({exc.__class__.__name__}: "
                f"{exc}). Without hub access, point {DATA_DIR_ENV} (or --data-dir) at a local copy."
            ) from exc
        for i, row in enumerate(ds):
            where = f"{spec.hub_id}{'/' + config if config else ''}[{spec.hub_splits[split]}][{i}]"
            if not str(spec.answer(row)).strip():
                logger.warning("%s: skipped, empty answer", where)
                continue
            examples.append(
                _make_example(spec.question(row), spec.answer(row), id=f"{spec.name}-{split}-{len(examples)}",
                              where=where, coerce_answer=False)
            )
            if limit is not None and len(examples) >= limit:
                return examples
    if not examples:
        raise DataError(f"{spec.hub_id}: split {split!r} is empty")
    return examples


# --------------------------------------------------------------------------- splitting

def split_examples(
    examples: Sequence[dspy.Example],
    sizes: Sequence[int],
    *,
    seed: int = 0,
) -> list[list[dspy.Example]]:
    """Shuffle deterministically with ``seed`` and cut into consecutive parts of the given sizes.

    ``split_examples(train, [200, 50], seed=0)`` -> ``[train_part, val_part]``. The same seed and
    input always give the same parts; the parts never share an example.
    """
    if any(s < 0 for s in sizes):
        raise ValueError(f"split sizes must be non-negative, got {list(sizes)}")
    if sum(sizes) > len(examples):
        raise ValueError(f"asked for {sum(sizes)} examples ({list(sizes)}) but only {len(examples)} are available")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append([examples[i] for i in order[start:start + size]])
        start += size
    return parts


def train_val_test(
    name: str,
    train: int,
    val: int,
    test: int | None,
    *,
    data_dir: str | os.PathLike | None = None,
) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    """Training, validation and test questions of a built-in dataset, never overlapping.

    Train and val are the first ``train + val`` questions of the training split; test the first
    ``test`` (None: all) of the test split. A dataset with only a test split (svamp, gsm_hard,
    math500 locally) is cut into disjoint parts of it with ``split_examples`` (seed 0).
    """
    need = train + val
    spec = DATASETS.get(name)
    folder = resolve_data_dir(data_dir)
    has_train = name == GENERATED_DATASET or (
        spec is not None and ((folder / name / "train.jsonl").is_file() if folder is not None else "train" in spec.hub_splits)
    )
    if has_train:
        pool = load_dataset(name, "train", data_dir=data_dir, limit=need) if need else []
        tests = load_dataset(name, "test", data_dir=data_dir, limit=test) if test != 0 else []
    else:
        everything = load_dataset(name, "test", data_dir=data_dir)
        if test is None:
            test = len(everything) - need
        if need + test > len(everything):
            raise DataError(f"{name} has {len(everything)} questions; asked for {need} to train and validate and {test} to test")
        pool, tests = split_examples(everything, [need, test], seed=0)
    if len(pool) < need:
        raise DataError(f"{name} has {len(pool)} training questions; asked for {train} + {val}")
    return pool[:train], pool[train:need], tests
