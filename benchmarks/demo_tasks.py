"""Zero-shot accuracy of the embedded default model on candidate demo tasks (issue 8).

The demo must run on a task where the 135M model is neither always wrong nor always right, so
that prompting methods can differ. For each candidate this measures the Solver alone (zero-shot)
and with "Let's think step by step." (zero-shot CoT) and with the untrained prompter, JSON
schemas enforced by vLLM, greedy decoding, 1 run.

    python benchmarks/demo_tasks.py --n 50 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def candidates(n: int, data_dir: str) -> dict:
    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.data.word_problems import word_problems

    svamp = load_dataset("svamp", "test", data_dir=data_dir)
    # the loader keeps question and answer; the equation is read from the raw rows
    raw = [json.loads(line) for line in (Path(data_dir) / "svamp" / "test.jsonl").open()]
    one_op_ids = {row["id"] for row in raw if sum(row["Equation"].count(op) for op in "+-*/") == 1}
    one_op = [ex for ex in svamp if ex.id in one_op_ids]
    return {
        "words (add/sub/mul/div, operands <= 20)": word_problems(n, split="test"),
        "words (add/sub, operands <= 20)": word_problems(n, split="test", operations=("add", "sub")),
        "words (add/sub, operands <= 10)": word_problems(n, split="test", operations=("add", "sub"), max_number=10),
        "words (compare, operands <= 20)": word_problems(n, split="test", operations=("compare",)),
        "words (add, operands <= 5)": word_problems(n, split="test", operations=("add",), max_number=5),
        "words (add/compare, operands <= 10) = the demo's 'words'": word_problems(
            n, split="test", operations=("add", "compare"), max_number=10),
        "svamp, one-operation questions": one_op[:n],
        "svamp": svamp[:n],
        "gsm8k": load_dataset("gsm8k", "test", data_dir=data_dir, limit=n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--data-dir", default=os.environ.get("TRPROMPT_DATA_DIR", "../shared/data"))
    parser.add_argument("--out", default="benchmarks/results/demo_tasks.json")
    args = parser.parse_args()

    import dspy

    import trprompt_dspy as t
    from trprompt_dspy.infra.evaluation import evaluate
    from trprompt_dspy.metrics import gsm8k_metric
    from trprompt_dspy.prompts.defaults import ZERO_SHOT_COT_PROMPT

    class CoT(dspy.Module):
        def __init__(self):
            super().__init__()
            self.solver = t.Solver()

        def forward(self, question):
            return self.solver(question=question, prompt=ZERO_SHOT_COT_PROMPT)

    results = {"model": "SmolLM2-135M-Instruct (embedded)", "n": args.n, "runs": 1, "machine": os.uname().nodename,
               "tasks": {}}
    with t.VLLMServer(model="default") as server:
        lm = server.lm(structured=True, max_tokens=384, temperature=0.0)
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            for name, examples in candidates(args.n, args.data_dir).items():
                row = {}
                for method, program in (("zero-shot", t.Solver()), ("zero-shot CoT", CoT()),
                                        ("untrained prompter", t.TRPromptProgram())):
                    start = time.perf_counter()
                    report = evaluate(program, examples, gsm8k_metric, num_threads=16, progress=False)
                    row[method] = {"accuracy": report.accuracy, "n": report.n, "n_correct": report.n_correct,
                                   "unparsed": report.n_errors, "wall_s": round(time.perf_counter() - start, 1)}
                    print(f"{name:45s} {method:20s} {report.n_correct}/{report.n}", flush=True)
                results["tasks"][name] = row
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
