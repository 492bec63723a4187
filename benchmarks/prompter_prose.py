"""Do the prompter and the critic write real prose on a real model? Measured on TRAINING questions.

On a random sample of GSM8K train questions (never test questions), the untrained prompter
(initial reward) writes a prompt for each question, the prose Solver answers with it, and the
critic critiques the prompt -- the calls of one rollout, through the library's own modules in
the model's wire format. Reported:

* prompts that are empty, truncated (the reply hit ``max_tokens``), that give the gold answer
  away (:func:`trprompt_dspy.metrics.answer_in_text`: its number is in the prompt and not in the
  question), or that restate the question (its first 60 characters appear verbatim);
* critiques that are empty or truncated, or that give the gold answer away;
* the solver's accuracy with these prompts;
* five prompts and five critiques, verbatim.

Usage::

    .venv/bin/python benchmarks/prompter_prose.py --model qwen2.5-coder-0.5b --n 40

Writes ``benchmarks/results/prompter_prose.{json,md}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
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

from parse_rate import finish_reasons  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def _truncated(lm, marker: str) -> bool:
    """Whether the call of ``lm`` whose user message holds ``marker`` hit max_tokens."""
    for entry in lm.history:
        if any(marker in str(m.get("content", "")) for m in entry.get("messages") or []):
            return "length" in finish_reasons(entry.get("response"))
    return False


def one(question_example, prompter, solver, critic, metric, lms) -> dict:
    from trprompt_dspy.metrics import answer_in_text

    q, gold = question_example.question, question_example.answer
    row = {"question": q, "gold": gold}
    try:
        prompt = prompter(question=q).prompt
    except Exception as exc:  # noqa: BLE001 - a failed reply is a measured outcome
        return {**row, "error": f"prompter: {type(exc).__name__}"}
    prediction = solver(question=q, prompt=prompt)
    correct = bool(metric(question_example, prediction))
    critique = critic(question=q, prompt=prompt, solver_reasoning=prediction.reasoning, solver_answer=prediction.answer,
                      reference_answer=gold, is_correct=correct).critique
    return {
        **row, "prompt": prompt, "answer": prediction.answer, "correct": correct, "critique": critique,
        "prompt_empty": not prompt.strip(), "prompt_truncated": _truncated(lms["prompter"], q[:80]),
        "prompt_reveals": answer_in_text(prompt, gold, q), "prompt_restates": q[:60] in prompt,
        "critique_empty": not critique.strip(), "critique_truncated": _truncated(lms["critic"], prompt[:80] or q[:80]),
        "critique_reveals": answer_in_text(critique, gold, q),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=RESULTS / "prompter_prose.json")
    args = parser.parse_args()

    import trprompt_dspy as t
    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.infra.serving import ServerConfig, VLLMServer
    from trprompt_dspy.metrics import metric_for

    pool = load_dataset("gsm8k", "train", data_dir=args.data_dir)
    examples = random.Random(args.seed).sample(pool, args.n)
    metric = metric_for("gsm8k")
    log = Path(tempfile.mkdtemp(prefix="trprompt-prompter-prose-")) / "vllm.log"
    start = time.perf_counter()
    with VLLMServer(ServerConfig(model=args.model, device="cpu", log_path=log, enable_lora=False)) as server:
        kwargs = {"max_tokens": args.max_tokens, "temperature": 0.0, "cache": False}
        lms = {role: server.lm(structured=True, **kwargs) for role in ("prompter", "solver", "critic")}
        prompter, solver = t.QueryAwarePrompter(lm=lms["prompter"]), t.Solver(lm=lms["solver"])
        critic = t.TextualCritic(lm=lms["critic"])
        with cf.ThreadPoolExecutor(args.threads) as pool_:
            rows = list(pool_.map(lambda ex: one(ex, prompter, solver, critic, metric, lms), examples))
        output_format = server.output_format
    seconds = round(time.perf_counter() - start, 1)
    ok = [r for r in rows if "error" not in r]
    shares = {key: sum(r[key] for r in ok) for key in
              ("prompt_empty", "prompt_truncated", "prompt_reveals", "prompt_restates", "critique_empty",
               "critique_truncated", "critique_reveals", "correct")}
    result = {"model": args.model, "output_format": output_format, "n": args.n, "seed": args.seed,
              "max_tokens": args.max_tokens, "errors": len(rows) - len(ok), "counts": shares, "seconds": seconds,
              "command": " ".join(["python", *sys.argv]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    lines = [f"# Prompter and critic prose on {args.model} ({output_format})", "",
             f"{args.n} GSM8K *train* questions (random sample, seed {args.seed}), untrained prompter with the initial "
             f"reward, greedy, max_tokens {args.max_tokens}, 1 run, {seconds} s. Command: `{result['command']}`.", "",
             "| measure | count | share |", "|---|---|---|",
             f"| replies that failed to parse | {result['errors']} | {result['errors'] / args.n:.0%} |"]
    lines += [f"| {key.replace('_', ' ')} | {value} | {value / max(1, len(ok)):.0%} |" for key, value in shares.items()]
    lines += ["", "## Five prompts and their critiques", ""]
    for r in ok[:5]:
        lines += [f"**Question:** {r['question']}", "", f"**Prompt:** {r['prompt']}", "",
                  f"**Solver:** {r['answer']} ({'correct' if r['correct'] else 'wrong'}; gold {r['gold']})", "",
                  f"**Critique:** {r['critique']}", "", "---", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
