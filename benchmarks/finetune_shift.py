"""Does a LoRA adapter trained on rollout records shift the served prompter toward the trained prompts?

On the embedded default model (SmolLM2-135M-Instruct), CPU only:

1. Records: GSM8K train questions, each with a prompt in one fixed, question-specific style
   (it quotes the question's numbers and names a plan) and a critique (the textual reward).
   The style is far from anything the base prompter writes, so moving toward it is visible.
2. Train an adapter with ``finetune_prompter`` (JSONAdapter chats: the demo's configuration).
3. Start vLLM on the base model, load the adapter, and let the same ``QueryAwarePrompter`` write
   prompts for HELD-OUT questions, greedily, through DSPy with vLLM enforcing the JSON schema:
   once with the base model, once with the adapter.
4. Compare each output with the target prompt that the same style gives for that question:
   token-overlap F1 (bag of lower-cased words), the share of outputs that open like the
   trained prompts, and difflib similarity. Results: ``benchmarks/results/finetune_shift.json``.

    .venv/bin/python benchmarks/finetune_shift.py              # ~6-10 min on 2 cores
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "finetune_shift.json"
OPENING = "Plan: list the numbers"
CRITIQUES = [
    "The prompt listed the numbers and the steps, and the solver reached the correct answer.",
    "The prompt named each quantity and the order of operations; the solver followed it and was right.",
]


def target_prompt(question: str) -> str:
    """The trained style: quote the numbers, then a fixed plan (well under the 300-char cap)."""
    numbers = re.findall(r"\d+(?:\.\d+)?", question)[:5] or ["none"]
    return (f"{OPENING} ({', '.join(numbers)}), decide how they are related, compute one step at a time, "
            "and check the final number before answering.")


def words(text: str) -> Counter:
    return Counter(re.findall(r"[a-z0-9]+", text.lower()))


def overlap_f1(output: str, target: str) -> float:
    out, ref = words(output), words(target)
    common = sum((out & ref).values())
    if not common:
        return 0.0
    precision, recall = common / sum(out.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def load_questions(n: int) -> list[str]:
    path = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    with open(path) as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f)]


def score(outputs: list[str | None], targets: list[str]) -> dict:
    texts = [o or "" for o in outputs]
    return {
        "mean_overlap_f1": round(statistics.mean(overlap_f1(o, t) for o, t in zip(texts, targets)), 3),
        "mean_difflib_similarity": round(
            statistics.mean(difflib.SequenceMatcher(None, o, t).ratio() for o, t in zip(texts, targets)), 3),
        "opens_like_trained": sum(o.startswith(OPENING) for o in texts),
        "exact_match": sum(o == t for o, t in zip(texts, targets)),
        "failed": sum(o is None for o in outputs),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=40, help="training records")
    parser.add_argument("--heldout", type=int, default=16, help="held-out questions")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    import dspy

    from trprompt_dspy.finetune import FinetuneConfig, finetune_prompter
    from trprompt_dspy.infra.parallel import run_parallel
    from trprompt_dspy.infra.serving import VLLMServer
    from trprompt_dspy.modules.roles import QueryAwarePrompter
    from trprompt_dspy.rollout.records import RolloutRecord

    questions = load_questions(args.train + args.heldout)
    train_q, held_q = questions[: args.train], questions[args.train:]
    records = [
        RolloutRecord(question=q, prompt=target_prompt(q), critique=CRITIQUES[i % len(CRITIQUES)], correct=True)
        for i, q in enumerate(train_q)
    ]
    adapter = dspy.JSONAdapter()
    report = {"loadavg_before": Path("/proc/loadavg").read_text().strip(), "train_records": len(records),
              "heldout_questions": len(held_q)}
    with tempfile.TemporaryDirectory() as scratch:
        config = FinetuneConfig(max_steps=args.steps, learning_rate=args.lr, lr_scheduler="constant",
                                per_device_batch_size=8, progress=True)
        started = time.monotonic()
        result = finetune_prompter(records, Path(scratch) / "adapter", model="default", config=config,
                                   adapter=adapter)
        summary = result.summary
        report["training"] = {key: summary[key] for key in (
            "steps", "first_loss", "final_loss", "train_seconds", "steady_seconds_per_step", "tokens_per_second",
            "examples", "device")}
        report["training"]["loss_curve"] = [round(e["loss"], 4) for e in summary["loss_curve"]]
        report["training"]["wall_seconds"] = round(time.monotonic() - started, 1)
        print(f"trained {summary['steps']} steps in {summary['train_seconds']} s: loss "
              f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f}", flush=True)

        with VLLMServer(model="default", max_lora_rank=16, log_path=Path(scratch) / "vllm.log") as server:
            server.load_adapter("shifted", result.adapter_dir)
            runs = {}
            for label, name in (("base", None), ("adapter", "shifted")):
                lm = server.lm(name, structured=True, temperature=0.0, max_tokens=160, cache=False)
                prompter = QueryAwarePrompter(lm=lm)

                def write(question, prompter=prompter):
                    with dspy.context(adapter=adapter):
                        return prompter(question=question, textual_reward=CRITIQUES[0]).prompt

                started = time.monotonic()
                batch = run_parallel(write, held_q, num_threads=8, desc=label, progress=False)
                runs[label] = {"outputs": batch.outputs, "seconds": round(time.monotonic() - started, 1)}
    targets = [target_prompt(q) for q in held_q]
    for label, run in runs.items():
        report[label] = {**score(run["outputs"], targets), "generation_seconds": run["seconds"]}
        print(label, report[label], flush=True)
    report["samples"] = [
        {"question": q, "target": t, "base": b, "adapter": a}
        for q, t, b, a in list(zip(held_q, targets, runs["base"]["outputs"], runs["adapter"]["outputs"]))[:4]
    ]
    report["loadavg_after"] = Path("/proc/loadavg").read_text().strip()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
