"""The ``trprompt`` command.

``trprompt demo`` is, for now, a smoke run of the whole inference stack on the embedded default
model: it starts a local vLLM server, loads held-out questions, and evaluates the Solver alone
(zero-shot) and the untrained prompter + Solver. Compilation (the TRPrompt training loop) joins
it when the teleprompter lands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake in the command line or its inputs: one message, exit status 2, no traceback."""


def _demo(args: argparse.Namespace) -> int:
    import dspy
    from rich.console import Console
    from rich.table import Table

    from .data import DataError, load_dataset
    from .evaluation import evaluate
    from .metrics import metric_for
    from .models import ModelNotAvailableError
    from .modules import Solver, TRPromptProgram
    from .serving import ServerError, VLLMServer

    console = Console()
    try:
        examples = load_dataset(args.dataset, "test", data_dir=args.data_dir, limit=args.n)
    except DataError as exc:
        raise UserError(str(exc)) from None
    metric = metric_for(args.dataset)
    run_dir = Path(args.log_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)

    console.print(f"[bold]trprompt demo[/bold]: {len(examples)} {args.dataset} test questions, model {args.model}")
    console.print("starting the local vLLM server (about 30 s on 2 CPU cores)...")
    try:
        server = VLLMServer(model=args.model, log_path=run_dir / "vllm.log").start()
    except (ModelNotAvailableError, ServerError) as exc:
        raise UserError(str(exc)) from None
    with server:
        # JSON schemas enforced by vLLM: without them a 135M model's replies rarely parse
        lm = server.lm(structured=True, max_tokens=args.max_tokens, temperature=0.0)
        methods = {
            "zero-shot solver": Solver(),
            "untrained prompter + solver": TRPromptProgram(),
        }
        results = {}
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            for name, program in methods.items():
                console.print(f"evaluating {name}...")
                start = time.perf_counter()
                report = evaluate(program, examples, metric, num_threads=args.num_threads)
                results[name] = {**report.to_dict(), "wall_s": round(time.perf_counter() - start, 1)}

    table = Table(title=f"{args.dataset} test, first {len(examples)} questions, {args.model} (1 run)")
    for column in ("method", "accuracy", "correct", "unparsed", "wall s"):
        table.add_column(column)
    for name, r in results.items():
        table.add_row(name, f"{r['accuracy']:.1%}", f"{r['n_correct']}/{r['n']}", str(r["n_errors"]), str(r["wall_s"]))
    console.print(table)
    (run_dir / "report.json").write_text(json.dumps(
        {"dataset": args.dataset, "model": args.model, "n": len(examples), "results": results}, indent=2
    ))
    console.print(f"report: {run_dir / 'report.json'}  server log: {run_dir / 'vllm.log'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trprompt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--dataset", default="svamp", help="gsm8k, gsm_hard, math, math500 or svamp")
    demo.add_argument("--n", type=int, default=20, help="number of test questions")
    demo.add_argument("--data-dir", default=None, help="local data folder (default: $TRPROMPT_DATA_DIR, else the hub)")
    demo.add_argument("--model", default="default", help="'default', a model folder, a .gguf file or a hub id")
    demo.add_argument("--max-tokens", type=int, default=384, help="token cap per reply (reasoning strings are capped at 300 characters)")
    demo.add_argument("--num-threads", type=int, default=16)
    demo.add_argument("--log-dir", default=None, help="run folder (default: runs/demo-<time>)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trprompt`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "n", 1) is not None and getattr(args, "n", 1) < 1:
        print("trprompt: error: --n must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"trprompt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
