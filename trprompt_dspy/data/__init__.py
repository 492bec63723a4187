"""Datasets as lists of ``dspy.Example(question, answer)``: local JSONL/CSV files, the benchmark
datasets (GSM8K, GSM-Hard, SVAMP, MATH, MATH-500; from ``TRPROMPT_DATA_DIR`` or the hub) and the
generated word problems of the demo."""

from .loaders import (
    DATA_DIR_ENV,
    DATASETS,
    DataError,
    DatasetSpec,
    dataset_names,
    load_csv,
    load_dataset,
    load_file,
    load_jsonl,
    resolve_data_dir,
    split_examples,
    train_val_test,
)

__all__ = [
    "DATA_DIR_ENV", "DATASETS", "DataError", "DatasetSpec", "dataset_names", "load_csv", "load_dataset",
    "load_file", "load_jsonl", "resolve_data_dir", "split_examples", "train_val_test",
]
