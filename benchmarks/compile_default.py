"""A TRPrompt compile on the embedded default model (SmolLM2-135M-Instruct) on this machine.

2 rounds on 32 GSM8K training questions, validation on 50 GSM8K test questions (issue 6). Writes
the run folder (report.json, report.png) and ``benchmarks/results/compile_default.json`` with the
per-round figures, the orchestration overhead (wall time outside LM calls, training and server
start) and, with ``--warm-rerun``, the LM calls of a second identical compile with DSPy's cache on.

    python benchmarks/compile_default.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TEXTGRAD_DISABLE_LOGGING", "1")


def warm_rollout_calls(tele, train, config, folder: str) -> dict:
    """Round 1's rollout of a second, identical compile, with DSPy's cache warm: LM calls made.

    It builds the roles exactly as ``TRPromptTeleprompter.compile`` does (same LMs, adapter,
    reward, rollout ids) and writes to a fresh records file, so nothing is resumed from disk:
    every record must come from DSPy's cache for the call count to be 0.
    """
    import dspy

    import trprompt_dspy as t
    from trprompt_dspy.infra.structured import SafeJSONAdapter
    from trprompt_dspy.infra.usage import UsageMeter
    from trprompt_dspy.modules.roles import MODULE_ROLES
    from trprompt_dspy.rollout.rollout import run_rollout

    shutil.rmtree(folder, ignore_errors=True)
    program = t.TRPromptProgram()
    program.prompter.set_lm(tele._server_lm())
    program.solver.set_lm(tele._server_lm())
    critic = t.TextualCritic(lm=tele.critic_lm)
    meter = UsageMeter(MODULE_ROLES)
    start = time.perf_counter()
    with dspy.context(adapter=SafeJSONAdapter()), meter.stage("warm/rollout"):
        result = run_rollout(program.prompter, program.solver, critic, train, tele.metric, reward=config.initial_reward,
                             round_index=1, config=config.rollout, records_path=Path(folder) / "records.jsonl")
    return {"records": len(result.records), "lm_calls": meter.totals()["calls"],
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TRPROMPT_DATA_DIR", "../shared/data"))
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--log-dir", default="runs/bench-compile-default")
    parser.add_argument("--resume", action="store_true", help="continue the run in --log-dir instead of starting over")
    parser.add_argument("--warm-rerun", action="store_true",
                        help="rerun round 1's rollout of an identical compile with the cache warm and count LM calls")
    parser.add_argument("--out", default="benchmarks/results/compile_default.json")
    args = parser.parse_args()

    import trprompt_dspy as t
    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.finetune import FinetuneConfig
    from trprompt_dspy.metrics import gsm8k_metric
    from trprompt_dspy.reward_search import RewardSearchConfig
    from trprompt_dspy.rollout.rollout import RolloutConfig
    from trprompt_dspy.teleprompter import TRPromptConfig, TRPromptTeleprompter

    train = load_dataset("gsm8k", "train", data_dir=args.data_dir, limit=args.train)
    val = load_dataset("gsm8k", "test", data_dir=args.data_dir, limit=args.val)
    config = TRPromptConfig(
        rounds=args.rounds,
        rollout=RolloutConfig(n_samples=4, temperature=1.0, num_threads=32),
        finetune=FinetuneConfig(num_epochs=1.0, per_device_batch_size=8, max_length=1024),  # micro-batches of 2 on CPU
        search=RewardSearchConfig(steps=3, num_candidates=4, minibatch_size=16, num_threads=32),
        val_num_threads=32,
    )
    if not args.resume:
        shutil.rmtree(args.log_dir, ignore_errors=True)
    t0 = time.perf_counter()
    server = t.VLLMServer(model="default").start()
    server_s = time.perf_counter() - t0
    results = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "model": "SmolLM2-135M-Instruct (embedded)",
               "train": len(train), "val": len(val), "server_start_s": round(server_s, 1)}
    with server:
        tele = TRPromptTeleprompter(server=server, metric=gsm8k_metric, config=config, log_dir=args.log_dir)
        start = time.perf_counter()
        tele.compile(t.TRPromptProgram(), trainset=train, valset=val)
        results["compile_wall_s"] = round(time.perf_counter() - start, 1)
        report = json.loads(Path(args.log_dir, "report.json").read_text())
        results["report"] = report
        # share of the compile outside LM calls and training (server start is outside compile)
        results["orchestration_share"] = round(report["orchestration_s"] / report["wall_s"], 4)
        results["usage_by_role"] = report["usage"].get("roles")
        results["reward_search_share"] = round(
            sum(float(r["reward_search"].get("seconds", 0.0)) for r in report["rounds"]) / report["wall_s"], 4
        )
        if args.warm_rerun:
            results["warm_rerun"] = warm_rollout_calls(tele, train, config, args.log_dir + "-warm")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    for row in report["rounds"]:
        print(f"round {row['round']}: val {row.get('validation', {}).get('accuracy')} rollout acc {row['rollout']['accuracy']:.3f} "
              + " ".join(f"{s}={row[s].get('seconds')}s" for s in ("rollout", "finetune", "reward_search", "validation") if s in row))
    print(json.dumps({k: v for k, v in results.items() if k != "report"}, indent=2))


if __name__ == "__main__":
    main()
