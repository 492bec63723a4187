"""Which wording of the prose Solver keeps a real model's skill? Measured on TRAINING questions.

``format_fidelity.py`` found the library's prose Solver 8 points under plain chat on the first 100
GSM8K test questions (Qwen2.5-Coder-0.5B, 19 vs 27). The wording is chosen here, on a random
sample of the GSM8K *train* split (never on test questions), and the winner is then measured once
on the test questions by ``format_fidelity.py``.

Variants (all through the real ``Solver`` and a ``ProseAdapter`` subclass; greedy, same
max_tokens as plain chat):

* ``plain chat``: the reference, "<question>\\nReason step by step, then write the final answer
  after ####." (no system message: the chat template adds the model's own);
* ``system``: the signature's instructions as the system message, the output instruction built
  from the field descriptions (the adapter before this benchmark);
* ``user``: the same words, all in the user message, so the model keeps its default system prompt;
* ``system+short`` / ``user+short``: the output instruction is plain chat's sentence.

Usage::

    .venv/bin/python benchmarks/prose_wording.py --n 60

Writes ``benchmarks/results/prose_wording.{json,md}`` (resumable by variant).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dspy  # noqa: E402
from format_fidelity import PLAIN_SUFFIX, PlainChat  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

from trprompt_dspy.infra.prose import ProseAdapter  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


class _Variant(ProseAdapter):
    """ProseAdapter with the instructions in the system or the user message, and a chosen
    output instruction."""

    def __init__(self, where: str, short: bool):
        super().__init__()
        self.where, self.short = where, short

    def format_system_message(self, signature):
        return super().format_system_message(signature) if self.where == "system" else ""

    def output_instruction(self, signature):
        return PLAIN_SUFFIX if self.short else super().output_instruction(signature)

    def format(self, signature, demos, inputs):
        messages = super().format(signature, demos, inputs)
        if self.where == "user":
            messages = [m for m in messages if m["role"] != "system" or m["content"].strip()]
            first = next(m for m in messages if m["role"] == "user")
            first["content"] = f"{signature.instructions.strip()}\n\n{first['content']}"
        return messages


VARIANTS = {
    "plain chat": None,
    "system": ("system", False),
    "user": ("user", False),
    "system+short": ("system", True),
    "user+short": ("user", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=RESULTS / "prose_wording.json")
    parser.add_argument("--label", default="", help="appended to the name of every variant but plain chat (a "
                        "new version of the adapter measured beside the old cells)")
    args = parser.parse_args()

    import trprompt_dspy as t
    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.infra.evaluation import evaluate
    from trprompt_dspy.infra.serving import ServerConfig, VLLMServer
    from trprompt_dspy.metrics import metric_for

    pool = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    examples = random.Random(args.seed).sample(pool, args.n)
    key = f"{args.model}|{args.dataset}-train|n={args.n}|seed={args.seed}"
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"cells": {}}
    cells = results["cells"].setdefault(key, {})
    name = {v: v if VARIANTS[v] is None else v + args.label for v in args.variants}
    todo = [v for v in args.variants if name[v] not in cells]
    common = {"max_tokens": args.max_tokens, "temperature": 0.0, "cache": False}
    if todo:
        log = Path(tempfile.mkdtemp(prefix="trprompt-wording-")) / "vllm.log"
        with VLLMServer(ServerConfig(model=args.model, device="cpu", log_path=log, enable_lora=False)) as server:
            for variant in todo:
                lm = server.lm(**common)
                if VARIANTS[variant] is None:
                    program, adapter = PlainChat(lm), None
                else:
                    program, adapter = t.Solver(lm=lm), _Variant(*VARIANTS[variant])
                start = time.perf_counter()
                with dspy.context(adapter=adapter):
                    report = evaluate(program, examples, metric_for(args.dataset), num_threads=args.threads, progress=False)
                cells[name[variant]] = {
                    "correct": report.n_correct, "n": report.n, "unparsed": report.error_counts.get("AdapterParseError", 0),
                    "seconds": round(time.perf_counter() - start, 1),
                    "per_question": [bool(r["correct"]) for r in report.rows],
                    "first_messages": lm.history[0]["messages"] if lm.history else None,
                }
                print(json.dumps({"variant": name[variant], **{k: cells[name[variant]][k] for k in ("correct", "n", "unparsed", "seconds")}}), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Prose Solver wording, chosen on training questions", "",
             f"Greedy, max_tokens {args.max_tokens}, 1 run per cell; p: exact McNemar test against plain chat "
             "on the same questions. Command: `python benchmarks/prose_wording.py " + " ".join(sys.argv[1:]) + "`.", ""]
    for key, cells in results["cells"].items():
        lines += [f"## {key}", "", "| variant | correct | unparsed | p vs plain chat | seconds |", "|---|---|---|---|---|"]
        plain = cells.get("plain chat")
        for variant, cell in cells.items():
            p = ""
            if plain and variant != "plain chat":
                b = sum(x and not y for x, y in zip(plain["per_question"], cell["per_question"]))
                c = sum(y and not x for x, y in zip(plain["per_question"], cell["per_question"]))
                p = f"{binomtest(b, b + c).pvalue:.3f} ({c} gained, {b} lost)" if b + c else "1.000"
            lines.append(f"| {variant} | {cell['correct']}/{cell['n']} | {cell['unparsed']} | {p} | {cell['seconds']} |")
        lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
