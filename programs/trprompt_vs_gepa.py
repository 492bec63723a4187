"""Your program, optimized two ways: TRPrompt (a prompt per question) and dspy.GEPA (one instruction).

Both optimize the same Solver on the same questions, GEPA with as many Solver runs as TRPrompt's
compile makes (its budget, counted before either runs). Then both answer the same test
questions, and the comparison prints accuracy, LM calls of the optimization and an exact McNemar
test on the paired answers (one run each: read the interval before the difference).

    python programs/trprompt_vs_gepa.py --data-dir ../shared/data                  # embedded default model
    python programs/trprompt_vs_gepa.py --model qwen2.5-coder-0.5b --data-dir ../shared/data --train 24 --test 50

``compare`` is importable (``tests/test_programs.py`` runs it on the tiny test model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import dspy
from scipy.stats import binomtest

import trprompt_dspy as t
from trprompt_dspy.baselines import gepa_instruction
from trprompt_dspy.infra.usage import UsageMeter
from trprompt_dspy.modules.roles import MODULE_ROLES
from trprompt_dspy.teleprompter.estimate import count_calls


def compare(server: t.VLLMServer, train: list, val: list, test: list, metric: Callable[..., Any], *,
            log_dir: str | Path, config: t.TRPromptConfig | None = None,
            lm_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile with TRPrompt and with GEPA on ``server``'s model, evaluate both on ``test``.

    Returns per method: accuracy, right/wrong per test question, the optimization's LM calls; and
    the exact McNemar test of TRPrompt against GEPA."""
    config = config or t.TRPromptConfig(rounds=2)
    lm_kwargs = dict(lm_kwargs or {"max_tokens": 512})
    log_dir = Path(log_dir)
    solver_lm = server.lm(structured=True, temperature=0.0, **lm_kwargs)
    out: dict[str, Any] = {}

    # TRPrompt: a prompter fine-tuned to write a prompt for each question
    tele = t.TRPromptTeleprompter(server=server, metric=metric, config=config, log_dir=log_dir / "trprompt",
                                  lm_kwargs=lm_kwargs)
    trprompt = tele.compile(t.TRPromptProgram(solver=t.Solver(lm=solver_lm)), trainset=train, valset=val)
    report = json.loads((log_dir / "trprompt" / "report.json").read_text())
    out["trprompt"] = {"optimization_lm_calls": report["usage_all_processes"]["calls"], "program": trprompt}

    # GEPA: the same Solver's instruction, reflected on by the same model, at TRPrompt's budget of Solver runs
    budget = sum(s.calls.get("target", 0) for s in count_calls(config, len(train), len(val)))
    meter = UsageMeter(MODULE_ROLES)
    with meter.stage("gepa"):
        gepa = gepa_instruction(train, val, metric, reflection_lm=server.lm(structured=True, temperature=1.0, **lm_kwargs),
                                solver=t.Solver(lm=solver_lm), max_metric_calls=budget)
    out["gepa"] = {"optimization_lm_calls": meter.totals()["calls"], "budget_target_calls": budget, "program": gepa,
                   "instruction": gepa.solver.solve.signature.instructions}

    for name in ("trprompt", "gepa"):
        report = t.evaluate(out[name]["program"], test, metric, progress=False)
        out[name].update(accuracy=report.accuracy, correct=[bool(r["correct"]) for r in report.rows])
    a, b = out["trprompt"]["correct"], out["gepa"]["correct"]
    gained, lost = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    out["mcnemar"] = {"trprompt_only": gained, "gepa_only": lost,
                      "p": binomtest(gained, gained + lost).pvalue if gained + lost else 1.0}
    return out


def main() -> None:
    from trprompt_dspy.data import train_val_test
    from trprompt_dspy.metrics import metric_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--log-dir", default="runs/trprompt-vs-gepa")
    args = parser.parse_args()

    train, val, test = train_val_test(args.dataset, args.train, args.val, args.test, data_dir=args.data_dir)
    metric = metric_for(args.dataset)
    with t.VLLMServer(model=args.model) as server, dspy.context(lm=server.lm(structured=True, max_tokens=512)):
        result = compare(server, train, val, test, metric, log_dir=args.log_dir)
    print(f"{args.dataset}, {len(test)} test questions, one run each, model {args.model}:")
    for name in ("trprompt", "gepa"):
        r = result[name]
        print(f"  {name:9s} accuracy {r['accuracy']:.1%}  optimization LM calls {r['optimization_lm_calls']}")
    m = result["mcnemar"]
    print(f"  right only with TRPrompt {m['trprompt_only']}, only with GEPA {m['gepa_only']}: exact McNemar p = {m['p']:.3f}")
    print("GEPA's instruction:", result["gepa"]["instruction"])


if __name__ == "__main__":
    main()
