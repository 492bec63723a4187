"""The dry-run estimate against a compile that ran: calls per stage, tokens per role, LM time.

Reads a finished compile's run folder (``config.json``, ``fingerprint.json``, ``report.json``),
starts a server on the same model, makes the estimate of the same settings and data sizes
(``TRPromptTeleprompter.estimate``, probing ``--probe`` training questions) and writes, per stage
and role, the estimated against the actual LM calls, per role the tokens, and the estimated LM
time against the compile's (``lm_busy_s``: time with at least one LM call in flight).

With ``--estimate FILE`` it compares the estimate ``trprompt compile --dry-run --estimate-out FILE``
wrote before the compile, instead of probing again afterwards (the honest order: the estimate
a user would have read before starting).

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
    p.add_argument("--report", default=None, help="the report to compare with (default: <run-dir>/report.json)")
    p.add_argument("--model", required=True, help="the prompter's base model of that compile")
    p.add_argument("--dataset", default="gsm8k", help="training questions for the probe")
    p.add_argument("--data-dir", default=os.environ.get("TRPROMPT_DATA_DIR"))
    p.add_argument("--estimate", default=None, help="an estimate written before the compile (--estimate-out)")
    p.add_argument("--probe", type=int, default=8)
    p.add_argument("--cpu-threads", type=int, default=None)
    p.add_argument("--name", required=True)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    import trprompt_dspy as t
    from trprompt_dspy.app.config_file import config_from_dict
    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.metrics import metric_for
    from trprompt_dspy.teleprompter.estimate import CompileEstimate, stage_seconds

    run = Path(args.run_dir)
    described = json.loads((run / "config.json").read_text())
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    report = json.loads(Path(args.report or run / "report.json").read_text())
    stage_results = json.loads((run / "stages.json").read_text())
    config = config_from_dict(described["config"], where=str(run / "config.json"))
    n_train, n_val = len(fingerprint["trainset"]), len(fingerprint["valset"])
    # the probe reads only the first --probe questions; the counts only the sizes
    train = load_dataset(args.dataset, "train", data_dir=args.data_dir, limit=n_train)
    val = train[:n_val]
    if args.estimate:
        estimate = CompileEstimate.from_dict(json.loads(Path(args.estimate).read_text()))
    else:
        with t.VLLMServer(t.ServerConfig(model=args.model, cpu_threads=args.cpu_threads)) as server:
            tele = t.TRPromptTeleprompter(server=server, metric=metric_for(args.dataset), config=config,
                                          lm_kwargs=described.get("lm_kwargs"))
            estimate = tele.estimate(t.TRPromptProgram(), trainset=train, valset=val or None, probe=args.probe)

    # the actual calls and seconds of each stage that ran: from the report's rounds (their usage
    # is per stage), and the stage results (seconds; usage where the stage result carries it)
    rows = {f"round_{r['round']}/{stage}": (r.get("usage") or {}).get(stage) for r in report["rounds"] for stage in r.get("usage", {})}
    stages, est_s, act_s = [], 0.0, 0.0
    per_call = estimate.per_call
    for st in estimate.stages:
        done = stage_results.get(st.stage)
        if done is None:
            continue  # not run (a compile stopped by a cap)
        usage = done.get("usage") or rows.get(st.stage)
        actual = None if usage is None else {role: sum(m["calls"] for m in models.values()) for role, models in usage.items()}
        seconds = stage_seconds(st, per_call, estimate.probe)
        if seconds is not None:
            est_s += seconds
            act_s += done.get("seconds", 0.0)
        stages.append({"stage": st.stage, "estimated": st.calls, "at_most": st.at_most, "actual": actual,
                       "estimated_s": seconds, "actual_s": done.get("seconds")})
    ran = {s["stage"] for s in stages}
    roles = {}
    for role in ("prompter", "target", "critic", "optimizer"):
        tokens = per_call.get(role)
        calls = [(s["actual"] or {}).get(role, 0) for s in stages if s["actual"] is not None]
        actual_tokens = {"prompt_tokens": 0, "completion_tokens": 0}
        for name in ran:
            usage = stage_results[name].get("usage") or rows.get(name) or {}
            for m in usage.get(role, {}).values():
                for k in actual_tokens:
                    actual_tokens[k] += m[k]
        n = sum(calls)
        if tokens and n:
            roles[role] = {"estimated_per_call": {k: round(tokens[k], 1) for k in ("prompt_tokens", "completion_tokens")},
                           "actual_per_call": {k: round(v / n, 1) for k, v in actual_tokens.items()}, "calls": n}
    # all tokens of the stages that ran: the estimate's counted calls x its tokens per call, against
    # what the compile's meters recorded
    est_tokens = sum(n * sum(per_call[r][k] for k in ("prompt_tokens", "completion_tokens"))
                     for s in stages for r, n in s["estimated"].items() if r in per_call)
    act_tokens = 0
    for name in ran:
        usage = stage_results[name].get("usage") or rows.get(name) or {}
        act_tokens += sum(m["prompt_tokens"] + m["completion_tokens"] for models in usage.values() for m in models.values())
    result = {
        "name": args.name, "run_dir": str(run), "model": args.model, "probe": estimate.probe,
        "stages": stages, "roles": roles,
        "tokens": {"estimated_stages_run": round(est_tokens), "actual_stages_run": act_tokens},
        "estimate_source": args.estimate or "probed after the compile",
        "lm_seconds": {"estimated_stages_run": round(est_s, 1), "actual_stages_run": round(act_s, 1),
                       "note": "the LM stages that ran (SFT excluded); actual: each stage's wall seconds"},
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
             f"{r['probe'].get('concurrency')} at once, {r['probe'].get('seconds')} s, "
             f"{r['probe'].get('completion_tokens_per_s')} completion tokens/s"
             + (f" (with an untrained adapter served: {r['probe']['adapter']['questions']} questions, "
                f"{r['probe']['adapter']['completion_tokens_per_s']} tokens/s, the rate of the stages after round 1's SFT)"
                if r["probe"].get("adapter") else " (no adapter probe: every stage at that rate)")
             + "; estimate "
             f"{r.get('estimate_source', 'probed after the compile')}. Command: "
             "`python benchmarks/estimate_check.py` (see its docstring). Only the stages the compile ran.", "",
             "| stage | estimated calls | actual calls | | estimated LM s | actual s |", "|---|---:|---:|---|---:|---:|"]
    for s in r["stages"]:
        est = sum(s["estimated"].values())
        act = None if s["actual"] is None else sum(s["actual"].values())
        kind = "at most" if s["at_most"] else ("exact" if est == act else ("not recorded" if act is None else "differs"))
        lines.append(f"| {s['stage']} | {est} | {'-' if act is None else act} | {kind} | {s['estimated_s']} | {s['actual_s']} |")
    lines += ["", "| role | calls | prompt tokens per call, est / actual (ratio) | completion tokens per call, est / actual (ratio) |",
              "|---|---:|---|---|"]
    for role, v in r["roles"].items():
        e, a = v["estimated_per_call"], v["actual_per_call"]
        lines.append(f"| {role} | {v['calls']} | {e['prompt_tokens']} / {a['prompt_tokens']} "
                     f"({_ratio(e['prompt_tokens'], a['prompt_tokens'])}) | {e['completion_tokens']} / "
                     f"{a['completion_tokens']} ({_ratio(e['completion_tokens'], a['completion_tokens'])}) |")
    tok = r.get("tokens")
    if tok:
        lines += ["", f"Tokens (prompt + completion) of the stages run: estimated {tok['estimated_stages_run']:,}, actual "
                  f"{tok['actual_stages_run']:,} (ratio {_ratio(tok['estimated_stages_run'], tok['actual_stages_run'])})."]
    s = r["lm_seconds"]
    lines += ["", f"LM time of the stages run: estimated {s['estimated_stages_run']} s, actual {s['actual_stages_run']} s "
              f"(ratio {_ratio(s['estimated_stages_run'], s['actual_stages_run'])}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
