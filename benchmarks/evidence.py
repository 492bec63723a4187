"""Does compiling help? TRPrompt against its baselines on one target model, with seeds and paired tests.

The headline experiment of the evidence issue (14), resumable cell by cell so that it can be
spread over several sittings of a 2-core machine:

* a **cell** is (method, seed): the method is trained (where it trains) on that seed's
  training/validation questions, then evaluated on the SAME test questions as every other cell,
  in chunks of ``--chunk`` questions appended to ``<out>/evidence-<name>/<cell>/<dataset>.jsonl``
  (a killed run loses at most one chunk; commit these with the results, they are what a later
  sitting continues from). A TRPrompt/QPO compile resumes from its own run folder under
  ``--runs-dir`` while that folder exists; the TextGrad and COPRO instruction baselines train
  again when their cell is resumed before its test is complete.
* the **seed** draws which questions of the training pool are train and which are validation,
  and seeds every sampled call of the compile (``TRPromptConfig.seed``). Methods with nothing to
  sample (zero-shot, zero-shot CoT, untrained prompter: greedy, no training) are one cell, seed -.
* per cell: accuracy, 95% Wilson interval, unparsed replies, the **answer-in-prompt rate** (the
  gold answer as a number in the prompt and not in the question), LM calls and tokens (training
  and test), wall time; per TRPrompt/QPO cell the round it returned and each round's validation.
* per seed, every trained method against every baseline on the same questions: an exact McNemar
  test (two-sided binomial test on the discordant pairs).

Usage::

    .venv/bin/python benchmarks/evidence.py --name gsm8k-qwen0.5b --model qwen2.5-coder-0.5b \\
        --dataset gsm8k --methods zero-shot-cot,untrained-prompter,trprompt,qpo --seeds 0,1 --test 200

Writes ``benchmarks/results/evidence-<name>.json``, ``.md``, ``.png`` and ``-budget.png`` (accuracy
against the LM calls of the optimization, ``benchmarks/budgets.py``) after every finished cell; run folders (adapters, records) stay under ``--runs-dir``, never in the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TEXTGRAD_DISABLE_LOGGING", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from budgets import budget_markdown, plot_budget  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

#: methods without training or sampling: one cell, whatever the seeds
SEEDLESS = ("zero-shot", "zero-shot-cot", "untrained-prompter")
TRAINED = ("trprompt", "trprompt-no-update", "trprompt-numeric", "qpo", "textgrad-instruction", "copro", "gepa",
           "mipro", "mipro-demos")
METHODS = SEEDLESS + TRAINED
LABELS = {
    "zero-shot": "Zero-shot", "zero-shot-cot": "Zero-shot CoT", "untrained-prompter": "Untrained prompter",
    "trprompt": "TRPrompt", "trprompt-no-update": "TRPrompt, t* not updated",
    "trprompt-numeric": "TRPrompt, numeric reward", "qpo": "QPO (re-impl.)",
    "textgrad-instruction": "TextGrad task instruction", "copro": "DSPy COPRO task instruction",
    "gepa": "DSPy GEPA task instruction", "mipro": "DSPy MIPROv2 task instruction (0 demos)",
    "mipro-demos": "DSPy MIPROv2 instruction + up to 2 demos",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="results name: evidence-<name>.json/.md")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="prompter's base model (embedded name or folder)")
    p.add_argument("--target-model", default="local", help="'local' (the prompter's base model) or another model")
    p.add_argument("--critic-model", default="local")
    p.add_argument("--optimizer-model", default="local")
    p.add_argument("--dataset", default="gsm8k", help="training (and validation) dataset")
    p.add_argument("--test-datasets", default=None, help="comma-separated test datasets (default: --dataset)")
    p.add_argument("--methods", default="zero-shot-cot,untrained-prompter,trprompt,qpo")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train", type=int, default=32)
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--chunk", type=int, default=25, help="test questions per saved chunk")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n-samples", type=int, default=2, help="prompts sampled per training question and round")
    p.add_argument("--search-steps", type=int, default=2)
    p.add_argument("--num-candidates", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--num-threads", type=int, default=16)
    p.add_argument("--max-wall-s", type=float, default=None,
                   help="a TRPrompt/QPO compile stops at this many seconds (of one sitting) and returns its best "
                        "completed round (TRPromptConfig.max_wall_s); recorded as stopped_by in the cell")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="the engine's OpenMP threads (default: one less than the cores; on a 2-core machine "
                        "given to this run alone, 2 served 1.48x the tokens of 1: serving_speed_qwen0.5b.md)")
    p.add_argument("--no-reward-use", dest="reward_use", action="store_false",
                   help="skip the diagnostic: the compiled prompter's validation accuracy under t*, a negative "
                        "critique and the initial reward")
    p.add_argument("--data-dir", default=os.environ.get("TRPROMPT_DATA_DIR"))
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--runs-dir", default="runs/evidence")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; known: {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.test_datasets = [d.strip() for d in (args.test_datasets or args.dataset).split(",") if d.strip()]
    return args


def seed_split(pool: list, n_train: int, seed: int) -> tuple[list, list]:
    """(train, val) of the training pool for one seed: a seeded shuffle, cut at ``n_train``."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in sorted(order[:n_train])], [pool[i] for i in sorted(order[n_train:])]


def compile_config(args: argparse.Namespace, seed: int):
    import trprompt_dspy as t

    return t.TRPromptConfig(
        rounds=args.rounds, seed=seed, validate_initial=True,
        rollout=t.RolloutConfig(n_samples=args.n_samples, num_threads=args.num_threads),
        finetune=t.FinetuneConfig(num_epochs=1.0, per_device_batch_size=8),
        search=t.RewardSearchConfig(steps=args.search_steps, num_candidates=args.num_candidates,
                                    minibatch_size=min(args.minibatch, args.train), num_threads=args.num_threads),
        val_num_threads=args.num_threads, max_wall_s=args.max_wall_s,
    )


def evaluate_in_chunks(program, test: list, metric, path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every test question's row, evaluating only those not saved yet, ``--chunk`` at a time."""
    from trprompt_dspy.infra.evaluation import evaluate
    from trprompt_dspy.infra.runs import JsonlAppender, read_jsonl
    from trprompt_dspy.infra.scoring import example_id
    from trprompt_dspy.metrics import answer_in_text

    ids = [example_id(ex, i) for i, ex in enumerate(test)]
    rows = read_jsonl(path)  # a torn last line, from a kill, is dropped
    if path.is_file():  # ... and cut off before appending after it
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = {r["id"] for r in rows}
    todo = [(i, ex) for i, ex in zip(ids, test) if i not in done]
    saved = JsonlAppender(path)
    for start in range(0, len(todo), args.chunk):
        chunk = todo[start:start + args.chunk]
        report = evaluate(program, [ex for _, ex in chunk], metric, num_threads=args.num_threads, progress=False)
        for (i, _), row in zip(chunk, report.rows):
            prediction = row["prediction"] or {}
            prompt = prediction.get("prompt") or ""
            saved.append({
                "id": i, "correct": bool(row["correct"]), "unparsed": row["error"] is not None,
                "answer_in_prompt": answer_in_text(prompt, row["gold"], row["question"]) if prompt else False,
                # what was asked and answered, cut short: enough to read why a question was lost
                "prompt": prompt[:400], "answer": str(prediction.get("answer", ""))[:200],
                "error": (row["error"] or "")[:200] or None,
            })
        print(f"   {len(done) + start + len(chunk)}/{len(test)} test questions", flush=True)
    by_id = {r["id"]: r for r in read_jsonl(path)}
    return [by_id[i] for i in ids]


def reward_use(program, run_dir: Path, questions: list, metric, rounds: int, num_threads: int) -> dict[str, Any]:
    """Does the compiled prompter use its reward text? Validation accuracy (and how many prompts
    change) with the prompter conditioned on t*, on a typical negative critique of the last
    round's rollouts (the most common among wrong answers; any critique if none) and on the
    initial reward. The same accuracy under all three means it learned to ignore the reward."""
    from collections import Counter

    from trprompt_dspy.infra.evaluation import evaluate
    from trprompt_dspy.prompts.defaults import INITIAL_REWARD
    from trprompt_dspy.rollout.records import read_records

    records = read_records(run_dir / f"round_{rounds}" / "records.jsonl")
    wrong = [r.critique for r in records if r.correct is False and r.critique.strip()] or [r.critique for r in records]
    rewards = {"t*": program.prompter.reward, "negative critique": Counter(wrong).most_common(1)[0][0],
               "initial reward": INITIAL_REWARD}
    kept, out, prompts = program.prompter.reward, {}, {}
    try:
        for label, text in rewards.items():
            program.prompter.reward = text
            report = evaluate(program, questions, metric, num_threads=num_threads, progress=False)
            prompts[label] = [(r["prediction"] or {}).get("prompt") for r in report.rows]
            out[label] = {"accuracy": report.accuracy, "n": report.n, "reward": text[:300]}
    finally:
        program.prompter.reward = kept
    for label in ("negative critique", "initial reward"):
        out[label]["prompts_changed_vs_t*"] = sum(a != b for a, b in zip(prompts[label], prompts["t*"]))
    return out


def optimization_usage(meter, compile_usage: dict[str, Any], seconds: float) -> dict[str, Any]:
    """LM calls and tokens a method spent before its test, per role: this process's "train" stage
    (the baselines' optimizers; a compile's stages run in their own meter) plus a compile's own
    count of every stage it ran, in any sitting."""
    keys = ("calls", "prompt_tokens", "completion_tokens")
    roles: dict[str, dict[str, int]] = {}
    counted = [(role, m) for role, models in meter.by_stage("train").items() for m in models.values()]
    counted += list((compile_usage.get("roles") or {}).items())
    for role, m in counted:
        per_role = roles.setdefault(role, dict.fromkeys(keys, 0))
        for k in keys:
            per_role[k] += int(m.get(k, 0))
    return {"calls": sum(r["calls"] for r in roles.values()),
            "tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in roles.values()),
            "by_role": roles, "seconds": seconds}


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n, k = len(rows), sum(r["correct"] for r in rows)
    ci = binomtest(k, n).proportion_ci(method="wilson") if n else None
    return {
        "n": n, "n_correct": k, "accuracy": k / n if n else 0.0,
        "ci95": [round(ci.low, 4), round(ci.high, 4)] if ci else None,
        "unparsed": sum(r["unparsed"] for r in rows),
        "answer_in_prompt_rate": round(sum(r["answer_in_prompt"] for r in rows) / n, 4) if n else 0.0,
        "correct": [int(r["correct"]) for r in rows],
    }


def mcnemar(a: list[int], b: list[int]) -> dict[str, Any]:
    """Exact McNemar test of two methods' right/wrong on the same questions (a vs b)."""
    gained = sum(x and not y for x, y in zip(a, b))
    lost = sum(y and not x for x, y in zip(a, b))
    p = binomtest(gained, gained + lost).pvalue if gained + lost else 1.0
    return {"gained": gained, "lost": lost, "p": round(p, 4)}


def paired_tests(cells: dict[str, Any], datasets: list[str]) -> list[dict[str, Any]]:
    """Each trained cell against each seedless baseline and each other trained method of its seed."""
    tests, items = [], list(cells.items())
    for n, (key, cell) in enumerate(items):
        if cell["method"] not in TRAINED:
            continue
        for other_n, (other_key, other) in enumerate(items):
            # each pair of trained methods once: the later cell (in run order) against the earlier
            same_seed = other_n < n and other["method"] in TRAINED and other["seed"] == cell["seed"]
            if other["method"] in SEEDLESS or same_seed:
                for d in datasets:
                    if d in cell["test"] and d in other["test"]:
                        tests.append({"method": key, "vs": other_key, "dataset": d,
                                      **mcnemar(cell["test"][d]["correct"], other["test"][d]["correct"])})
    return tests


def write_markdown(results: dict[str, Any], path: Path) -> None:
    s = results["settings"]
    lines = [
        f"# evidence-{results['name']}", "",
        f"Prompter base model `{s['model']}`; target `{s['target_model']}`, critic `{s['critic_model']}`, optimizer "
        f"`{s['optimizer_model']}` ('local' = the prompter's base model, no adapter). Trained on {s['train']} "
        f"{s['dataset']} training questions with {s['val']} for validation (both drawn per seed from the first "
        f"{s['train'] + s['val']}), tested on the first {s['test']} test questions of each test dataset, the same "
        f"for every cell. Greedy target; {s['rounds']} rounds, {s['n_samples']} samples per question, "
        f"{s['search_steps']} search steps x {s['num_candidates']} candidates. One run per cell; "
        f"machine {results['machine']} ({results['cpus']} CPUs). Interval: Wilson 95%. Answer in prompt: the gold "
        "answer written in the prompt as a number the question does not hold.", "",
        "| method | seed | test set | accuracy | correct / n | 95% interval | unparsed | answer in prompt | "
        "round returned | LM calls | tokens | wall s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, c in results["cells"].items():
        for d, r in c["test"].items():
            lines.append(
                f"| {LABELS[c['method']]} | {'-' if c['seed'] is None else c['seed']} | {d} | {r['accuracy']:.1%} | "
                f"{r['n_correct']} / {r['n']} | {r['ci95'][0]:.1%} - {r['ci95'][1]:.1%} | {r['unparsed']} | "
                f"{r['answer_in_prompt_rate']:.1%} | {c.get('selected_round', '-')} | {c['lm_calls']} | {c['tokens']} | "
                f"{c['wall_s']} |")
    for key, c in results["cells"].items():
        if c.get("validation"):
            stop = c.get("stopped_by")
            lines.append(f"\n{key}: validation accuracy per round (0 = untrained) "
                         f"{', '.join('-' if v is None else f'{v:.1%}' for v in c['validation'])}; returned round "
                         f"{c.get('selected_round')}" + (f"; stopped: {stop['message']} after {stop['rounds_completed']} "
                                                        f"round(s)" if stop else "")
                         + (f"; LM usage not recorded for {', '.join(c['stages_without_usage'])}"
                            if c.get("stages_without_usage") else "") + ".")
    used = {k: c["reward_use"] for k, c in results["cells"].items() if c.get("reward_use")}
    if used:
        lines += ["", "Does the compiled prompter use its reward? Validation accuracy with the prompter conditioned "
                  "on each text (prompts changed: of the validation prompts, how many differ from those under t*):", "",
                  "| cell | t* | negative critique (prompts changed) | initial reward (prompts changed) |",
                  "|---|---:|---:|---:|"]
        for k, u in used.items():
            lines.append(f"| {k} | {u['t*']['accuracy']:.1%} | {u['negative critique']['accuracy']:.1%} "
                         f"({u['negative critique']['prompts_changed_vs_t*']}/{u['t*']['n']}) | "
                         f"{u['initial reward']['accuracy']:.1%} ({u['initial reward']['prompts_changed_vs_t*']}/{u['t*']['n']}) |")
    lines += budget_markdown(results)
    if results["paired"]:
        lines += ["", "Paired exact McNemar tests (gained = right here and wrong in the other):", "",
                  "| cell | vs | test set | gained | lost | p |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {t['method']} | {t['vs']} | {t['dataset']} | {t['gained']} | {t['lost']} | {t['p']:.3f} |"
                  for t in results["paired"]]
    path.write_text("\n".join(lines) + "\n")


def cell_label(cell: dict[str, Any]) -> str:
    seed = cell["seed"]
    return LABELS[cell["method"]] + ("" if seed is None else f", seed {seed}")


def plot(results: dict[str, Any], path: Path) -> None:
    """One bar per cell and test set, with its Wilson 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{cell_label(c)} / {d}", r) for c in results["cells"].values() for d, r in c["test"].items()]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4))
    acc = [r["accuracy"] for _, r in bars]
    err = [[a - r["ci95"][0] for a, (_, r) in zip(acc, bars)], [r["ci95"][1] - a for a, (_, r) in zip(acc, bars)]]
    ax.bar(range(len(bars)), acc, yerr=err, capsize=4)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=35, ha="right", fontsize=7)
    ax.set(ylabel="test accuracy (95% Wilson interval)", ylim=(0, 1), title=f"evidence-{results['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import dspy

    import trprompt_dspy as t
    from trprompt_dspy.app.cli import RoleServers, role_lm
    from trprompt_dspy.baselines import (
        QPOTeleprompter,
        ZeroShot,
        ZeroShotCoT,
        copro_instruction,
        gepa_instruction,
        mipro_instruction,
        mipro_trials,
        textgrad_instruction,
        untrained_prompter,
    )
    from trprompt_dspy.data import train_val_test
    from trprompt_dspy.teleprompter.estimate import count_calls
    from trprompt_dspy.infra.usage import UsageMeter
    from trprompt_dspy.metrics import metric_for
    from trprompt_dspy.modules.roles import MODULE_ROLES

    out_dir, runs = Path(args.out_dir), Path(args.runs_dir) / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / f"evidence-{args.name}.json"
    # one row per test question and cell, kept with the results (small, and what the paired
    # tests are computed from) so that a cell's test can go on in a later sitting
    rows_dir = out_dir / f"evidence-{args.name}"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"cells": {}}
    results.update(name=args.name, settings={k: v for k, v in vars(args).items() if k not in ("out_dir", "runs_dir")},
                   machine=os.uname().nodename, cpus=os.cpu_count())
    pool, _, _ = train_val_test(args.dataset, args.train + args.val, 0, 0, data_dir=args.data_dir)
    tests = {d: train_val_test(d, 0, 0, args.test, data_dir=args.data_dir)[2] for d in args.test_datasets}
    train_metric = metric_for(args.dataset)
    lm_kwargs = {"max_tokens": args.max_tokens}

    def save() -> None:
        results["paired"] = paired_tests(results["cells"], args.test_datasets)
        results_path.write_text(json.dumps(results, indent=1))
        write_markdown(results, out_dir / f"evidence-{args.name}.md")
        if results["cells"]:
            plot(results, out_dir / f"evidence-{args.name}.png")
            plot_budget(results, out_dir / f"evidence-{args.name}-budget.png", LABELS)

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)  # calls are counted per cell
    cells = [(m, None) for m in args.methods if m in SEEDLESS] + [
        (m, s) for s in args.seeds for m in args.methods if m in TRAINED]
    with t.VLLMServer(t.ServerConfig(model=args.model, cpu_threads=args.cpu_threads,
                                     log_path=runs / "vllm.log")) as server, \
            RoleServers(server, runs) as role_servers:
        local = server.lm(structured=True, temperature=0.0, **lm_kwargs)
        # a role is the prompter's server (local), a server of its own (the compile supervises
        # it) or an API LM; the baselines' solver needs it as an LM
        roles = {r: role_lm(r, getattr(args, f"{r}_model"), lm_kwargs, role_servers) or server
                 for r in ("target", "critic", "optimizer")}

        def as_lm(role: Any) -> Any:
            return role.lm(structured=True, temperature=0.0, **lm_kwargs) if isinstance(role, t.VLLMServer) else role

        for method, seed in cells:
            key = method if seed is None else f"{method}-s{seed}"
            cell_dir = runs / key
            if key in results["cells"] and set(results["cells"][key]["test"]) >= set(args.test_datasets):
                print(f"== {key}: done", flush=True)
                continue
            print(f"== {key}", flush=True)
            start, meter, cell = time.perf_counter(), UsageMeter(MODULE_ROLES), {"method": method, "seed": seed}
            solver = t.Solver(lm=as_lm(roles["target"]))
            compile_usage: dict[str, Any] = {}
            with dspy.context(lm=local), meter.stage("train"):
                if method == "zero-shot":
                    program = ZeroShot(solver)
                elif method == "zero-shot-cot":
                    program = ZeroShotCoT(solver)
                elif method == "untrained-prompter":
                    program = untrained_prompter()
                    program.prompter.set_lm(local)
                    program.solver = solver
                elif method in ("textgrad-instruction", "copro"):
                    train, _ = seed_split(pool, args.train, seed)
                    config = compile_config(args, seed)
                    proposer = as_lm(roles["optimizer"])
                    meter.assign_role(proposer, "optimizer")
                    if method == "copro":
                        program = copro_instruction(train, train_metric, prompt_lm=proposer,
                                                    solver=solver, breadth=3, depth=1, num_threads=args.num_threads)
                    else:
                        program, _ = textgrad_instruction(train, train_metric, optimizer_lm=proposer,
                                                          solver=solver, config=config.search, run_dir=cell_dir / "run")
                elif method in ("gepa", "mipro", "mipro-demos"):
                    train, val = seed_split(pool, args.train, seed)
                    # the budget: as many Solver runs as TRPrompt's compile of the same settings makes
                    budget = sum(s.calls.get("target", 0) for s in count_calls(compile_config(args, seed),
                                                                                 len(train), len(val)))
                    cell["budget_target_calls"] = budget
                    if method == "gepa":
                        # GEPA's reflection plays TRPrompt's critic; sampled, as GEPA's own examples do
                        reflection = (roles["critic"].lm(structured=True, temperature=1.0, **lm_kwargs)
                                      if isinstance(roles["critic"], t.VLLMServer) else roles["critic"])
                        meter.assign_role(reflection, "critic")
                        program = gepa_instruction(train, val, train_metric, reflection_lm=reflection, solver=solver,
                                                   max_metric_calls=budget, num_threads=args.num_threads, seed=seed)
                    else:
                        proposer = as_lm(roles["optimizer"])
                        meter.assign_role(proposer, "optimizer")
                        program = mipro_instruction(train, val, train_metric, prompt_lm=proposer, solver=solver,
                                                    num_trials=mipro_trials(budget, len(val), args.minibatch),
                                                    minibatch_size=args.minibatch, num_threads=args.num_threads,
                                                    seed=seed, demos=2 if method == "mipro-demos" else 0)
                    cell["instruction"] = program.solver.solve.signature.instructions
                else:
                    train, val = seed_split(pool, args.train, seed)
                    config = compile_config(args, seed)
                    if method == "trprompt-no-update":
                        config = dataclasses.replace(config, update_reward=False)
                    if method == "trprompt-numeric":
                        config = dataclasses.replace(config, reward="numeric")
                    own = {f"{r}_lm": roles[r] for r in ("target", "critic", "optimizer") if roles[r] is not server}
                    common = dict(server=server, metric=train_metric, lm_kwargs=lm_kwargs, log_dir=cell_dir / "run", **own)
                    tele = (QPOTeleprompter(loops=args.rounds, config=config, **common) if method == "qpo"
                            else t.TRPromptTeleprompter(config=config, **common))
                    program = tele.compile(t.TRPromptProgram(solver=solver), trainset=train, valset=val)
                    report = json.loads((cell_dir / "run" / "report.json").read_text())
                    # every process's stages (a compile resumed in a later sitting too)
                    compile_usage = report.get("usage_all_processes") or report["usage"]["totals"]
                    cell.update(selected_round=report.get("selected_round"),
                                validation=[report.get("initial_validation", {}).get("accuracy")]
                                + [r.get("validation", {}).get("accuracy") for r in report["rounds"]],
                                rollout_answer_in_prompt=[r["rollout"].get("answer_in_prompt_rate")
                                                          for r in report["rounds"]],
                                final_reward=report["final_reward"], compile_s=report["wall_s"],
                                stopped_by=report.get("stopped_by"),
                                stages_without_usage=compile_usage.get("stages_without_usage", []))
                    done = len(report["rounds"])  # fewer than --rounds when a cap stopped the compile
                    if method != "trprompt-numeric" and method != "qpo" and args.reward_use and done:
                        with meter.stage("diagnostic"):  # not part of the optimization's budget
                            cell["reward_use"] = reward_use(program, cell_dir / "run", val, train_metric, done,
                                                            args.num_threads)
            cell["train_s"] = round(time.perf_counter() - start, 1)
            cell["test"] = {}
            with dspy.context(lm=local), meter.stage("test"):
                for d, questions in tests.items():
                    rows = evaluate_in_chunks(program, questions, metric_for(d), rows_dir / key / f"{d}.jsonl", args)
                    cell["test"][d] = summarize_rows(rows)
                    print(f"   {d}: {cell['test'][d]['n_correct']}/{cell['test'][d]['n']}", flush=True)
            cell["optimization"] = optimization_usage(meter, compile_usage, cell["train_s"])
            usage = meter.totals()
            cell["lm_calls"] = usage["calls"] + int(compile_usage.get("calls", 0))
            cell["tokens"] = sum(int(u.get(f, 0)) for u in (usage, compile_usage)
                                 for f in ("prompt_tokens", "completion_tokens"))
            cell["wall_s"] = round(time.perf_counter() - start, 1)
            results["cells"][key] = cell
            for adapter in list(server.adapters):  # this cell is measured; free its LoRA slot
                server.unload_adapter(adapter)
            save()
    save()
    print((out_dir / f"evidence-{args.name}.md").read_text())
    return results


if __name__ == "__main__":
    main()
