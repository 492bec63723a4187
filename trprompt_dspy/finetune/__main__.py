"""``python -m trprompt_dspy.finetune``: LoRA SFT of a prompter on a records file.

Also the entry point under Accelerate, one process per GPU::

    accelerate launch --num_processes 4 -m trprompt_dspy.finetune \\
        --records runs/x/rollouts/r1.jsonl --output runs/x/adapters/r1 --model /path/to/model

Every :class:`~trprompt_dspy.finetune.FinetuneConfig` field but ``target_modules``,
``previous_adapter``, ``overwrite`` and ``progress`` is an option of the same name
(``--lora-r 8``); those four have options of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from ..infra.runs import RunFolderError
from ..rollout.records import RecordError, read_records
from .config import FinetuneConfig, FinetuneInputError
from .trainer import finetune_prompter

#: what the command reports as bad input (exit status 2): unusable records, settings or folders
_BAD_INPUT = (FinetuneInputError, RecordError, RunFolderError)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m trprompt_dspy.finetune``."""
    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(
        prog="python -m trprompt_dspy.finetune",
        description="LoRA SFT of the TRPrompt prompter on rollout records (JSON lines).",
    )
    parser.add_argument("--records", required=True, help="rollout records, one JSON object per line")
    parser.add_argument("--output", required=True, help="adapter folder to create")
    parser.add_argument("--model", default="default", help="base model: 'default', a folder or a .gguf file")
    parser.add_argument("--adapter", choices=("chat", "json", "prose"), default="chat",
                        help="DSPy adapter the prompter runs with (json: JSONAdapter with structured outputs; "
                             "prose: the library's ProseAdapter, for real models)")
    parser.add_argument("--json-style", choices=("compact", "indented"), default="compact",
                        help="with --adapter json: the server's JSON grammar (compact: ServerConfig.compact_json)")
    for field in dataclasses.fields(FinetuneConfig):
        if field.name in ("target_modules", "previous_adapter", "progress", "overwrite"):
            continue
        value = getattr(defaults, field.name)
        kind = {bool: _parse_bool, int: int, float: float}.get(type(value), str)
        if field.name in ("bf16", "gradient_checkpointing", "load_bf16"):
            kind = _parse_bool
        elif field.name in ("max_steps", "cpu_threads"):
            kind = int
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None, help=f"default: {value}")
    parser.add_argument("--target-modules", default=None, help="comma-separated module names, or all-linear")
    parser.add_argument("--previous-adapter", default=None, help="adapter to continue (with --init-from previous)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the summary path. Exit status 2 on bad input."""
    args = build_parser().parse_args(argv)
    import dspy  # after parsing: --help and argument errors do not wait for dspy/litellm

    from ..infra.prose import ProseAdapter

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    changes = {}
    for field in dataclasses.fields(FinetuneConfig):
        value = getattr(args, field.name, None)
        if value is not None and field.name not in ("target_modules", "progress", "overwrite"):
            changes[field.name] = value
    if args.target_modules:
        changes["target_modules"] = (
            "all-linear" if args.target_modules == "all-linear" else [n.strip() for n in args.target_modules.split(",")]
        )
    changes["overwrite"] = args.overwrite
    changes["progress"] = not args.no_progress
    try:
        config = FinetuneConfig(**changes)
        records = read_records(args.records)
        adapter = {"json": dspy.JSONAdapter, "prose": ProseAdapter}.get(args.adapter, dspy.ChatAdapter)()
        result = finetune_prompter(records, args.output, model=args.model, config=config, adapter=adapter,
                                   compact_json=args.json_style == "compact")
    except _BAD_INPUT as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
