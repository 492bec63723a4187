"""The dry-run estimate against a compile that ran: calls per stage, tokens per role, LM time.

Reads a finished compile's run folder (``config.json``, ``fingerprint.json``, ``report.json``),
starts a server on the same model, makes the estimate of the same settings and data sizes
(``TRPromptTeleprompter.estimate``, probing ``--probe`` training questions) and writes, per stage
and role, the estimated against the actual LM calls, per role the tokens, and the estimated LM
time against the compile's (``lm_busy_s``: time with at least one LM call in flight).

Usage::

    .venv/bin/python benchmarks/estimate_check.py --run-dir runs/evidence/gsm8k-qwen0.5b/trprompt-s0/run \\
        --model qwen2.5-coder-0.5b --dataset gsm8k --name gsm8k-qwen0.5b --cpu-threads 2

Writes ``benchmarks/results/estimate_check_<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a finished compile's run folder")
    p.add_argument("--model", required=True, help="the prompter's base model of that compile")
    p.add_argument("--dataset", default="gsm8k", help="training questions for the probe")
    p.add_argument("--data-dir", default=os.environ.get("TRPROMPT_DATA_DIR"))
    p.add_argument("--probe", type=int, default=8)
    p.add_argument("--cpu-threads", type=int, default=None)
    p.add_argument("--name", required=True)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    import trprompt_dspy as t
    from trprompt_dspy.app.config_file import config_from_dict
    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.metrics import metric_for

    run = Path(args.run_dir)
    described = json.loads((run / "config.json").read_text())
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    report = json.loads((run / "report.json").read_text())
    config = config_from_dict(described["config"], where=str(run / "config.json"))
    n_train, n_val = len(fingerprint["trainset"]), len(fingerprint["valset"])
    # the probe reads only the first --probe questions; the counts only the sizes
    train = load_dataset(args.dataset, "train", data_dir=args.data_dir, limit=n_train)
    val = train[:n_val]
    with t.VLLMServer(t.ServerConfig(model=args.model, cpu_threads=args.cpu_threads)) as server:
        tele = t.TRPromptTeleprompter(server=server, metric=metric_for(args.dataset), config=config,
                                      lm_kwargs=described.get("lm_kwargs"))
        estimate = tele.estimate(t.TRPromptProgram(), trainset=train, valset=val or None, probe=args.probe)

    stages = []
    for s in estimate.stages:
        actual = {role: sum(m["calls"] for m in models.values())
                  for role, models in report["usage"]["stages"].get(s.stage, {}).items()}
        stages.append({"stage": s.stage, "estimated": s.calls, "at_most": s.at_most, "actual": actual})
    roles = {}
    actual_roles = report["usage"]["roles"]
    for role, est in estimate.role_totals().items():
        got = actual_roles.get(role, {})
        roles[role] = {"estimated": est, "actual": {k: got.get(k) for k in ("calls", "prompt_tokens", "completion_tokens")}}
    result = {
        "name": args.name, "run_dir": str(run), "model": args.model, "probe": estimate.probe,
        "stages": stages, "roles": roles,
        "lm_seconds": {"estimated": estimate.wall_s, "actual_lm_busy_s": report.get("lm_busy_s"),
                       "actual_wall_s": report.get("wall_s"), "actual_training_s": report.get("training_s")},
        "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
    }
    out = Path(args.out_dir)
    (out / f"estimate_check_{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"estimate_check_{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def markdown(r: dict) -> str:
    lines = [f"# Dry-run estimate against the compile it estimates: {r['name']}", "",
             f"Run folder `{r['run_dir']}`, model `{r['model']}`; probe: {r['probe']['questions']} training questions, "
             f"{r['probe'].get('concurrency')} at once, {r['probe'].get('seconds')} s. "
             "Command: `python benchmarks/estimate_check.py` (see its docstring).", "",
             "| stage | estimated calls | actual calls | |", "|---|---|---|---|"]
    for s in r["stages"]:
        est, act = sum(s["estimated"].values()), sum(s["actual"].values())
        lines.append(f"| {s['stage']} | {est} | {act} | {'at most' if s['at_most'] else ('exact' if est == act else 'differs')} |")
    lines += ["", "| role | calls est / actual | prompt tokens est / actual (ratio) | completion tokens est / actual (ratio) |",
              "|---|---|---|---|"]
    for role, v in r["roles"].items():
        e, a = v["estimated"], v["actual"]
        lines.append(f"| {role} | {e['calls']} / {a['calls']} | {e['prompt_tokens']} / {a['prompt_tokens']} "
                     f"({_ratio(e['prompt_tokens'], a['prompt_tokens'])}) | {e['completion_tokens']} / "
                     f"{a['completion_tokens']} ({_ratio(e['completion_tokens'], a['completion_tokens'])}) |")
    s = r["lm_seconds"]
    lines += ["", f"LM time: estimated {s['estimated']} s, actual {s['actual_lm_busy_s']} s with an LM call in flight "
              f"(ratio {_ratio(s['estimated'], s['actual_lm_busy_s'])}); the compile's wall time {s['actual_wall_s']} s, "
              f"of which SFT {s['actual_training_s']} s (not estimated).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
