"""Which wording stops the prompter from copying the question? Measured on TRAINING questions.

``prompter_prose.py`` found the untrained prompter of Qwen2.5-Coder-0.5B copying the question as
its "prompt" for 19 of 40 GSM8K train questions. In the prose format the question stood
unlabelled at the top of the user message, as in plain chat, so the model may take it as its own
task. The variants below change only the messages of single-output calls (the prompter's and the
critic's: the reply is *about* the question, not its answer); the Solver's messages stay the
library's. Chosen here on a random sample of the GSM8K *train* split (never test questions).

Variants (``ProseAdapter`` subclasses; greedy, max_tokens 384; the prose Solver answers with each
prompt):

* ``unlabelled``: the question unlabelled first (the adapter before this benchmark);
* ``labelled``: ``Question: ...`` like every other input field;
* ``labelled+no-copy``: labelled, and the output instruction adds "do not copy the inputs".

Reported per variant: prompts that restate the question (its first 60 characters appear
verbatim), that give the gold answer away, that are empty or hit max_tokens, the median prompt
length, and the Solver's accuracy with the prompts (p: exact McNemar test against
``unlabelled``).

Usage::

    .venv/bin/python benchmarks/prompter_wording.py --n 40

Writes ``benchmarks/results/prompter_wording.{json,md}`` (resumable by variant).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dspy  # noqa: E402
from evidence import mcnemar  # noqa: E402
from prompter_prose import _truncated  # noqa: E402

from trprompt_dspy.infra.prose import ProseAdapter  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


class _Variant(ProseAdapter):
    """ProseAdapter whose single-output calls label the question and may forbid copying."""

    def __init__(self, label_question: bool, no_copy: bool):
        super().__init__()
        self.label_question, self.no_copy = label_question, no_copy

    def output_instruction(self, signature):
        text = super().output_instruction(signature)
        if self.no_copy and len(signature.output_fields) == 1:
            text = text.rstrip(".") + "; do not copy the inputs."
        return text

    def format_user_message_content(self, signature, inputs, prefix="", suffix="", main_request=False):
        text = super().format_user_message_content(signature, inputs, prefix, suffix, main_request)
        question = inputs.get("question")
        if (self.label_question and len(signature.output_fields) == 1 and isinstance(question, str)
                and question.strip() and text.startswith(question)):
            text = "Question: " + text
        return text


VARIANTS = {"unlabelled": (False, False), "labelled": (True, False), "labelled+no-copy": (True, True)}


def one(example, prompter, solver, metric, prompter_lm, adapter) -> dict:
    from trprompt_dspy.metrics import answer_in_text

    q, gold = example.question, example.answer
    with dspy.context(adapter=adapter):
        try:
            prompt = prompter(question=q).prompt
        except Exception as exc:  # noqa: BLE001 - a failed reply is a measured outcome
            return {"question": q, "error": f"prompter: {type(exc).__name__}", "correct": False}
    prediction = solver(question=q, prompt=prompt)
    return {"question": q, "gold": gold, "prompt": prompt, "answer": prediction.answer,
            "correct": bool(metric(example, prediction)), "restates": q[:60] in prompt,
            "reveals": answer_in_text(prompt, gold, q), "empty": not prompt.strip(),
            "truncated": _truncated(prompter_lm, q[:80])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=RESULTS / "prompter_wording.json")
    args = parser.parse_args()

    import trprompt_dspy as t
    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.infra.serving import ServerConfig, VLLMServer
    from trprompt_dspy.metrics import metric_for

    examples = random.Random(args.seed).sample(load_dataset("gsm8k", "train", data_dir=args.data_dir), args.n)
    metric = metric_for("gsm8k")
    key = f"{args.model}|gsm8k-train|n={args.n}|seed={args.seed}"
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    cells = results.setdefault(key, {})
    todo = [v for v in args.variants if v not in cells]
    if todo:
        log = Path(tempfile.mkdtemp(prefix="trprompt-prompter-wording-")) / "vllm.log"
        with VLLMServer(ServerConfig(model=args.model, device="cpu", log_path=log, enable_lora=False)) as server:
            for variant in todo:
                kwargs = {"max_tokens": args.max_tokens, "temperature": 0.0, "cache": False}
                prompter_lm, solver_lm = server.lm(structured=True, **kwargs), server.lm(structured=True, **kwargs)
                prompter, solver = t.QueryAwarePrompter(lm=prompter_lm), t.Solver(lm=solver_lm)
                adapter = _Variant(*VARIANTS[variant])
                start = time.perf_counter()
                with cf.ThreadPoolExecutor(args.threads) as pool:
                    rows = list(pool.map(lambda ex: one(ex, prompter, solver, metric, prompter_lm, adapter), examples))
                cells[variant] = {"rows": rows, "seconds": round(time.perf_counter() - start, 1)}
                args.out.write_text(json.dumps(results, indent=1) + "\n")
                print(variant, sum(r["correct"] for r in rows), sum(r.get("restates", False) for r in rows), flush=True)

    lines = ["# Prompter wording, chosen on training questions", "",
             f"Untrained prompter (initial reward) then the prose Solver, greedy, max_tokens {args.max_tokens}, 1 run "
             "per cell; restates: the question's first 60 characters appear in the prompt; reveals: the gold answer "
             "as a number the question does not hold; p: exact McNemar test of the Solver's accuracy against "
             "`unlabelled` on the same questions. Command: `python benchmarks/prompter_wording.py "
             f"--n {args.n} --seed {args.seed}`.", ""]
    for cell_key, cell in results.items():
        lines += [f"## {cell_key}", "", "| variant | restates | reveals | empty | truncated | median prompt chars "
                  "| solver correct | p vs unlabelled | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        base = cell.get("unlabelled")
        for variant, data in cell.items():
            rows = data["rows"]
            ok = [r for r in rows if "error" not in r]
            count = {k: sum(r[k] for r in ok) for k in ("restates", "reveals", "empty", "truncated")}
            p = ""
            if base and variant != "unlabelled":
                test = mcnemar([r["correct"] for r in rows], [b["correct"] for b in base["rows"]])
                p = f"{test['p']:.3f} ({test['gained']} gained, {test['lost']} lost)"
            median = statistics.median(len(r["prompt"]) for r in ok) if ok else 0
            lines.append(f"| {variant} | {count['restates']}/{len(rows)} | {count['reveals']} | {count['empty']} | "
                         f"{count['truncated']} | {median:.0f} | {sum(r['correct'] for r in rows)}/{len(rows)} | {p} | "
                         f"{data['seconds']} |")
        lines.append("")
        for variant, data in cell.items():
            lines += [f"First three prompts, `{variant}`:", ""]
            lines += [f"- {r.get('prompt', r.get('error'))[:400]!r}" for r in data["rows"][:3]] + [""]
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
