"""Wall time of one optimal-textual-reward search step: k candidates in parallel vs sequentially.

One step = TextGrad gradient on t* + k proposals + evaluation of the current t* and the k
candidates on a minibatch. The parallel search makes the k proposals at once and evaluates all
(k+1) x minibatch items in one batch; the sequential implementation (``num_threads=1``) does
everything one call after another, as a plain TextGrad loop does. Both run the same code on
the same server, from the same starting state (same t*, same forward results, same next
minibatch), in one process.

    python benchmarks/reward_search_speed.py                      # embedded SmolLM2-135M, k = 1 4 8
    python benchmarks/reward_search_speed.py --sequential-ks 1 4  # skip the slowest baseline
    python benchmarks/reward_search_speed.py --api-base http://127.0.0.1:8000/v1 --model NAME

Results go to ``benchmarks/results/reward_search_speed.{json,md}``. Targets (issue 5): k=4
costs at most 1.5x k=1. The share of a whole compile spent in reward search needs the
teleprompter and is not measured here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("reward_search_speed")


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} x {os.cpu_count()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8], help="candidates per step (parallel runs)")
    parser.add_argument("--sequential-ks", type=int, nargs="*", default=[1, 4, 8], help="k for the sequential baseline")
    parser.add_argument("--repeats", type=int, default=2, help="parallel runs per k (the sequential ones run once)")
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--model", default="default", help="model for a new server (default: embedded SmolLM2-135M)")
    parser.add_argument("--api-base", default=None, help="use a running vLLM server instead of starting one")
    parser.add_argument("--max-string-length", type=int, default=200, help="JSON string cap of task replies")
    parser.add_argument("--max-tokens", type=int, default=256, help="token cap of task replies")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reward_search_speed"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "LiteLLM", "litellm", "textgrad", "dspy"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import dspy

    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.metrics import metric_for
    from trprompt_dspy.modules.roles import QueryAwarePrompter, Solver
    from trprompt_dspy.reward_search import RewardSearch, RewardSearchConfig
    from trprompt_dspy.infra.serving import ServerConfig, VLLMServer
    from trprompt_dspy.infra.structured import StructuredLM

    server = None
    if args.api_base is None:
        server = VLLMServer(ServerConfig(model=args.model, enable_lora=False)).start()
        api_base, name = server.api_base, server.served_model_name
        logger.info("server ready in %.1f s", server.ready_seconds)
    else:
        api_base, name = args.api_base, args.model
    try:
        # No cache anywhere: every configuration pays for every call.
        task_lm = StructuredLM(f"hosted_vllm/{name}", api_base=api_base, api_key="local", cache=False,
                               temperature=0.0, max_tokens=args.max_tokens, max_string_length=args.max_string_length)
        optimizer_lm = dspy.LM(f"hosted_vllm/{name}", api_base=api_base, api_key="local", cache=False)
        trainset = load_dataset(args.dataset, "train", data_dir=args.data_dir, limit=4 * args.minibatch)
        metric = metric_for(args.dataset)

        def search(k: int, threads: int) -> RewardSearch:
            cfg = RewardSearchConfig(steps=1, num_candidates=k, minibatch_size=args.minibatch, num_threads=threads,
                                     progress=False)
            return RewardSearch(QueryAwarePrompter(), Solver(), metric, optimizer_lm=optimizer_lm, config=cfg)

        runs, load_before = [], _load()
        with dspy.context(lm=task_lm, adapter=dspy.JSONAdapter()):
            t0 = time.perf_counter()
            state0 = search(1, args.minibatch).start(trainset)
            initial_eval_s = time.perf_counter() - t0
            logger.info("initial minibatch evaluation (%d questions, parallel): %.1f s, accuracy %.3f",
                        args.minibatch, initial_eval_s, state0.latest_accuracy)
            plan = [("parallel", k) for _ in range(args.repeats) for k in args.ks]
            plan += [("sequential", k) for k in args.sequential_ks]
            for mode, k in plan:
                threads = (k + 1) * args.minibatch if mode == "parallel" else 1
                state = copy.deepcopy(state0)  # same t*, forward results and next minibatch for every run
                load = _load()
                t0 = time.perf_counter()
                record = search(k, threads).step(state)
                wall = time.perf_counter() - t0
                runs.append({
                    "mode": mode, "k": k, "num_threads": threads, "wall_s": round(wall, 2),
                    "phases_s": {n: round(v, 2) for n, v in record.seconds.items()},
                    "evaluated_candidates": sum(c.accuracy is not None for c in record.candidates),
                    "rejections": [c.reason for c in record.candidates if c.reason and c.accuracy is None],
                    "eval_errors": sum(c.eval_errors for c in record.candidates),
                    "error": record.error, "load_before": load,
                })
                logger.info("%s k=%d: %.1f s %s", mode, k, wall, runs[-1]["phases_s"])
    finally:
        if server is not None:
            server.stop()

    def best(mode: str, k: int) -> float | None:
        walls = [r["wall_s"] for r in runs if r["mode"] == mode and r["k"] == k]
        return min(walls) if walls else None

    summary = []
    for k in sorted(set(args.ks) | set(args.sequential_ks)):
        par, seq = best("parallel", k), best("sequential", k)
        summary.append({
            "k": k, "parallel_s": par, "sequential_s": seq,
            "parallel_vs_k1": round(par / best("parallel", 1), 2) if par and best("parallel", 1) else None,
            "sequential_vs_k1": round(seq / best("sequential", 1), 2) if seq and best("sequential", 1) else None,
            "speedup": round(seq / par, 2) if par and seq else None,
        })
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {
        "what": "wall time of one reward-search step (gradient + k proposals + evaluation of k+1 rewards)",
        "model": args.model, "minibatch": args.minibatch, "dataset": args.dataset,
        "task_lm": {"max_tokens": args.max_tokens, "max_string_length": args.max_string_length, "structured": True},
        "machine": _cpu(), "load_before": load_before, "load_after": _load(), "git": git,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "initial_minibatch_eval_s": round(initial_eval_s, 2),
        "search_config": {k: v for k, v in dataclasses.asdict(RewardSearchConfig()).items()
                          if not isinstance(v, (str, tuple))},
        "summary": summary, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Reward search: wall time of one step",
        "",
        f"{report['what']}; model `{args.model}`, minibatch {args.minibatch} ({args.dataset}), "
        f"{report['machine']}, load {load_before} -> {report['load_after']}, {report['date']}, git {git}.",
        f"A parallel evaluation of the minibatch alone took {report['initial_minibatch_eval_s']} s.",
        "",
        f"Best of {args.repeats} parallel runs and of 1 sequential run per k.",
        "",
        "| k | parallel (s) | vs k=1 | sequential (s) | vs k=1 | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary:
        cells = [row["k"], row["parallel_s"], row["parallel_vs_k1"], row["sequential_s"], row["sequential_vs_k1"],
                 row["speedup"]]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    lines += ["", "Per run (phases in seconds):", ""]
    lines += [f"- {r['mode']} k={r['k']} threads={r['num_threads']}: {r['wall_s']} s {r['phases_s']}"
              f" (load {r['load_before']})" + (f" error: {r['error']}" if r["error"] else "") for r in runs]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
