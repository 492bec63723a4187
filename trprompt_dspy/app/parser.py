"""The ``trprompt`` command line's arguments: every subcommand, flag, default and help text
(the commands themselves are in :mod:`.cli`). Parsing needs no heavy import, so ``--help`` and
argument errors answer at once."""

from __future__ import annotations

import argparse

LOCAL = "local"


def positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def positive_number(value: str) -> float:
    """argparse type: a number > 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


FILE_FIELDS = {"question_field": "question", "answer_field": "answer", "id_field": "id"}


def add_data_args(parser: argparse.ArgumentParser, *, file_help: str) -> None:
    from ..data.loaders import dataset_names

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", default="gsm8k", help=f"built-in dataset: {', '.join(dataset_names())} (default gsm8k)")
    source.add_argument("--file", default=None, help=file_help)
    parser.add_argument("--data-dir", default=None, help="local data folder (default: $TRPROMPT_DATA_DIR, else the hub)")
    parser.add_argument("--metric", default=None, help="metric by dataset name (default: the dataset's own; required with --file)")
    for field, default in FILE_FIELDS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", default=None, metavar="COLUMN",
                            help=f"the {field.split('_')[0]} column of --file (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trprompt", description="TRPrompt (query-aware prompt optimization from textual rewards) for DSPy.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile and compare TRPrompt on the embedded default model (the main job)")
    demo.add_argument("--dataset", default="words", help="words (generated one-step word problems, default), gsm8k, svamp, ...")
    demo.add_argument("--tiny", action="store_true", help="the tiny random test model and minimal sizes (checks the plumbing in about a minute)")
    demo.add_argument("--model", default="default", help="'default', a model folder, a .gguf file or a hub id")
    demo.add_argument("--train", type=positive, default=16, help="training questions of the compile")
    demo.add_argument("--val", type=positive, default=16, help="validation questions of the compile")
    demo.add_argument("--test", type=positive, default=40, help="held-out test questions every method is measured on")
    demo.add_argument("--rounds", type=positive, default=2)
    demo.add_argument("--num-threads", type=positive, default=16)
    demo.add_argument("--data-dir", default=None, help="local data folder (default: $TRPROMPT_DATA_DIR, else the hub)")
    demo.add_argument("--log-dir", default=None, help="run folder (default: runs/demo-<time>)")
    demo.set_defaults(command_name="demo")

    comp = sub.add_parser("compile", help="compile a TRPromptProgram on a dataset or your own file")
    add_data_args(comp, file_help="your own .jsonl/.csv with question and answer columns (see --question-field)")
    comp.add_argument("--val-file", default=None, help="validation examples (with --file; default: cut from --file)")
    comp.add_argument("--train-size", type=positive, default=32)
    comp.add_argument("--val-size", type=int, default=50)
    comp.add_argument("--model", default="default", help="the prompter's base model, served locally by vLLM")
    for role in ("target", "critic", "optimizer"):
        comp.add_argument(f"--{role}-model", default=LOCAL,
                          help=f"the {role}'s LM: 'local' (the prompter's base model), another local model (an embedded "
                               "name such as qwen2.5-coder-1.5b, a folder or a .gguf: served by a vLLM server of its own) "
                               "or a litellm name")
    comp.add_argument("--rounds", type=positive, default=None, help="overrides the config file")
    comp.add_argument("--config", default=None, help="a TOML, YAML or JSON file of TRPromptConfig settings")
    comp.add_argument("--log-dir", default=None, help="run folder (default: runs/compile-<time>)")
    comp.add_argument("--resume", action="store_true", help="continue the run in --log-dir after its last completed stage")
    comp.add_argument("--out", default=None, help="where to save the compiled program (default: <log-dir>/program)")
    comp.add_argument("--max-tokens", type=positive, default=384)
    comp.add_argument("--max-lm-calls", type=positive, default=None,
                      help="stop after this many LM calls and save the best round so far (resumable)")
    comp.add_argument("--max-cost-usd", type=positive_number, default=None,
                      help="stop once the API roles cost this many dollars (local models are unpriced)")
    comp.add_argument("--max-wall-s", type=positive_number, default=None, help="stop after this many seconds")
    comp.add_argument("--track", choices=("mlflow",), default=None,
                      help="log settings, per-round metrics, t*, the report and the program to MLflow "
                           "(pip install 'trprompt-dspy[track]')")
    comp.add_argument("--track-uri", default=None,
                      help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<log-dir>/mlflow.db)")
    comp.add_argument("--dry-run", action="store_true",
                      help="print the compile's LM calls per stage and role, tokens, dollars and LM time, and stop")
    comp.add_argument("--probe", type=int, default=8,
                      help="with --dry-run: training questions run through the rollout to measure tokens and "
                           "speed (about 3 LM calls each; 0: count calls only, no model started)")
    comp.add_argument("--estimate-out", default=None, metavar="FILE",
                      help="with --dry-run: also write the estimate as JSON to FILE (benchmarks/estimate_check.py "
                           "compares it with the compile afterwards)")
    comp.add_argument("--port", type=int, default=None, help="port of the local vLLM server (default: a free one)")
    comp.set_defaults(command_name="compile")

    ev = sub.add_parser("evaluate", help="measure a saved program on a dataset or file")
    ev.add_argument("program", help="folder written by compiled.save() or trprompt compile")
    add_data_args(ev, file_help="your own .jsonl/.csv")
    ev.add_argument("--split", default="test")
    ev.add_argument("--n", type=positive, default=None, help="first N questions (default: all)")
    ev.add_argument("--target-model", default=None,
                    help="the solver's LM: 'local' (the prompter's base model), another local model, or a litellm name "
                         "(default: the one the program was compiled with, from its manifest)")
    ev.add_argument("--max-tokens", type=positive, default=384)
    ev.add_argument("--num-threads", type=positive, default=16)
    ev.add_argument("--port", type=int, default=None)
    ev.add_argument("--out", default=None, help="write per-question results (JSON) here")
    ev.set_defaults(command_name="evaluate")

    serve = sub.add_parser("serve", help="start a vLLM server with a saved program's adapter and print the endpoint")
    serve.add_argument("program", help="folder written by compiled.save() or trprompt compile")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(command_name="serve")
    return parser
