"""Before a compile: its LM calls, tokens, dollars and minutes (``TRPromptTeleprompter.estimate``,
``trprompt compile --dry-run``).

**Calls** are counted from the config and the data sizes, per stage and role
(:func:`count_calls`): exact for the rollouts (one prompter, one solver and, with a textual
reward, one critic call per question and sample) and the validations (a prompter and a solver
call per question, less the held-out validation questions the round's t* search already scored
t* on when the LMs use DSPy's cache); an upper bound for the t* search, which makes fewer when proposals are
invalid (they are not evaluated) or ``patience`` stops it. Not counted: a DSPy adapter's
fallback call after an unparseable reply, a straggler re-sent by DSPy's executor.

**Tokens, dollars and time** come from a probe: a few training questions go through the
rollout's own path (prompter with the initial reward, solver, critic) on the compile's LMs, as
many at once as the rollout runs; each role's mean prompt and completion tokens per call are
scaled to the counted calls, and the probe's completion tokens per second give the LM time.
Every stage after round 1's SFT runs with the prompter's LoRA adapter served, which on a CPU
server is several times slower for every request in a batch (the 0.5B model's rollout: 212 s in
round 1, 731 s in round 2 with the same calls: ``benchmarks/results/estimate_check_*``). So a
second probe runs the same path with an untrained adapter of the compile's LoRA shape
loaded (:func:`~trprompt_dspy.finetune.trainer.write_untrained_adapter`; its zero B matrices
change nothing the model writes and cost what a trained adapter costs), and those stages are
timed at its throughput (:func:`stage_seconds`). It runs the same questions, as many at once
as the first: a server's throughput grows with the requests in flight (the 0.5B model with an
adapter: 21 tokens/s at 8 at once, 28 at 16). Known error: the t* search runs its own number of
requests at once (``search.num_threads``, 32 by default) and its calls are an upper bound, so
its time is over-estimated (the 0.5B compile: 1089 s per search estimated, 518 and 401 s taken).
The optimizer's calls (TextGrad feedback and proposals) are not probed: their completions count
at their token caps and their prompts from the results-text budget (upper bounds). Dollars come
from litellm's price map; a local model is "unpriced" (None), never $0. The time is LM time at
the probe's concurrency: SFT (no LM call), server start and a busier server are not in it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any, Sequence

from ..infra.usage import UsageMeter, call_cost
from .config import TRPromptConfig

ROLES = ("prompter", "target", "critic", "optimizer")

#: characters per token for the optimizer's prompts (English prose; only used there)
CHARS_PER_TOKEN = 4
#: characters of TextGrad's own instructions around the results text in a feedback or proposal prompt
TEXTGRAD_TEMPLATE_CHARS = 2500


@dataclasses.dataclass
class StageCalls:
    """LM calls of one stage (``round_k/<stage>``) by role; ``at_most``: an upper bound."""

    stage: str
    calls: dict[str, int]
    at_most: bool = False

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def heldout_count(config: TRPromptConfig, n_train: int, n_val: int) -> tuple[int, int]:
    """``(rolled out, held out)``: training questions rolled out and trained on, and the
    questions every t* candidate is also scored on (see ``rounds.search_split``)."""
    how, size = config.search_heldout, config.search_heldout_size
    if how == "valset" and not n_val:
        how = "none"
    if how == "valset":
        return n_train, min(size, n_val) if size else n_val
    if how == "trainset":
        return n_train - size, size
    return n_train, config.search.heldout_size


def count_calls(config: TRPromptConfig, n_train: int, n_val: int, *, cached: bool = False) -> list[StageCalls]:
    """The LM calls of a compile of ``n_train`` training and ``n_val`` validation questions, per
    stage and role, in the order the stages run (see the module doc for what is exact).

    ``cached``: the LMs answer a repeated call from DSPy's cache (DSPy's default). Then a
    round's validation re-asks nothing on the questions its t* search already scored t* on
    (``search_heldout="valset"``: the first ``held`` validation questions, same adapter and
    reward), so only the rest are counted."""
    textual = config.reward == "textual"
    rolled, held = heldout_count(config, n_train, n_val)
    searched_val = held if cached and config.search_heldout == "valset" else 0
    stages: list[StageCalls] = []

    def pairs(n: int) -> dict[str, int]:  # one prompter and one solver call per question
        return {"prompter": n, "target": n}

    if n_val and config.validate_initial:
        stages.append(StageCalls("round_0/validation", pairs(n_val)))
    search = config.search
    m, k = search.minibatch_size, search.num_candidates
    gradient_calls = 1 + (2 if search.llm_evaluation else 0)  # feedback on t* (+ TextLoss and its feedback)
    for r in range(1, config.rounds + 1):
        items = rolled * config.rollout.n_samples
        stages.append(StageCalls(f"round_{r}/rollout", {**pairs(items), **({"critic": items} if textual else {})}))
        if textual and (config.update_reward or r == 1):
            evaluated = m + held  # the initial reward: a minibatch and the held-out questions
            for step in range(1, search.steps + 1):
                current = m if search.selection == "next" or step > 1 else 0
                evaluated += current + k * (m + held)
            stages.append(StageCalls(f"round_{r}/reward_search",
                                     {**pairs(evaluated), "optimizer": search.steps * (gradient_calls + k)},
                                     at_most=True))
        if n_val:
            searched = searched_val if textual and (config.update_reward or r == 1) else 0
            stages.append(StageCalls(f"round_{r}/validation", pairs(n_val - searched)))
    return stages


@dataclasses.dataclass
class CompileEstimate:
    """What a compile will take (see the module doc). ``per_call`` holds each role's mean tokens
    (and dollars) per call from the probe; ``wall_s`` is None without a probe."""

    stages: list[StageCalls]
    per_call: dict[str, dict[str, Any]]
    probe: dict[str, Any]
    wall_s: float | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompileEstimate":
        """The estimate :meth:`to_dict` wrote (e.g. ``trprompt compile --dry-run --estimate-out``)."""
        return cls(stages=[StageCalls(**s) for s in data["stages"]], per_call=data["per_call"],
                   probe=data["probe"], wall_s=data["totals"]["wall_s"])

    def role_totals(self) -> dict[str, dict[str, Any]]:
        """Per role: calls, prompt and completion tokens, dollars (None: unpriced or not probed)."""
        out: dict[str, dict[str, Any]] = {}
        for role in ROLES:
            calls = sum(s.calls.get(role, 0) for s in self.stages)
            if not calls:
                continue
            tokens = self.per_call.get(role)
            cost = tokens.get("cost_usd") if tokens else None
            out[role] = {
                "calls": calls,
                "prompt_tokens": round(calls * tokens["prompt_tokens"]) if tokens else None,
                "completion_tokens": round(calls * tokens["completion_tokens"]) if tokens else None,
                "cost_usd": None if cost is None else round(calls * cost, 6),
            }
        return out

    def totals(self) -> dict[str, Any]:
        roles = self.role_totals().values()
        costs = [r["cost_usd"] for r in roles if r["cost_usd"] is not None]
        tokens = [r["prompt_tokens"] + r["completion_tokens"] for r in roles if r["prompt_tokens"] is not None]
        return {"calls": sum(r["calls"] for r in roles), "tokens": sum(tokens) if tokens else None,
                "cost_usd": round(sum(costs), 6) if costs else None, "wall_s": self.wall_s,
                "calls_exact": not any(s.at_most for s in self.stages)}

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [dataclasses.asdict(s) for s in self.stages], "per_call": self.per_call,
                "roles": self.role_totals(), "totals": self.totals(), "probe": self.probe}

    def table(self) -> str:
        """The estimate as a few plain-text lines for a terminal."""
        lines = ["stage                        " + "".join(f"{r:>10}" for r in ROLES) + "     total"]
        for s in self.stages:
            cells = "".join(f"{s.calls.get(r, 0) or '':>10}" for r in ROLES)
            lines.append(f"{s.stage:<29}{cells}{s.total:>10}{'  at most' if s.at_most else ''}")
        lines.append("")
        for role, t in self.role_totals().items():
            if t["prompt_tokens"] is None:
                lines.append(f"{role:<10} {t['calls']:>6} calls, tokens and dollars not probed")
                continue
            bound = "at most " if self.per_call[role].get("at_most") else "~"
            cost = "unpriced" if t["cost_usd"] is None else f"{bound}${t['cost_usd']:.4f}"
            lines.append(f"{role:<10} {t['calls']:>6} calls, {bound}{t['prompt_tokens']:,} prompt + "
                         f"{bound}{t['completion_tokens']:,} completion tokens, {cost}")
        total = self.totals()
        if not self.per_call:
            cost = "dollars not probed"
        else:
            cost = "unpriced (local models)" if total["cost_usd"] is None else f"~${total['cost_usd']:.4f}"
        wall = "not probed" if self.wall_s is None else f"~{self.wall_s / 60:.1f} min of LM time (SFT not included)"
        exact = "exact" if total["calls_exact"] else "the t* search at most"
        lines.append(f"total: {total['calls']} LM calls ({exact}), {cost}, {wall}")
        lines.append("not counted: requests DSPy re-sends (stragglers, retries) and an adapter's fallback call "
                     "after an unparseable reply")
        return "\n".join(lines)


def probe_rollout(prompter: Any, solver: Any, critic: Any, examples: Sequence[Any], metric: Any, *,
                  config: TRPromptConfig, reward: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Run ``examples`` through the rollout path once each (as concurrently as the rollout
    would) and return ``(per-call means by role, probe summary)``."""
    from ..modules.roles import MODULE_ROLES
    from ..rollout.rollout import run_rollout

    meter = UsageMeter(MODULE_ROLES)
    rollout = dataclasses.replace(config.rollout, n_samples=1, num_threads=min(config.rollout.num_threads, len(examples)))
    # a round of its own in the samples' rollout ids: DSPy's cache never answers a probe from an
    # earlier one (a cache hit has no usage to measure)
    probe_round = random.randrange(100, 1000)
    started = time.perf_counter()
    with meter.stage("probe"):
        result = run_rollout(prompter, solver, critic, examples, metric, reward=reward, round_index=probe_round,
                             config=rollout, records_path=None, progress=False)
    seconds = time.perf_counter() - started
    per_call: dict[str, dict[str, Any]] = {}
    completion = 0
    for role, models in meter.by_stage("probe").items():
        calls = sum(m["calls"] for m in models.values())
        if not calls:
            continue
        prompt_tokens = sum(m["prompt_tokens"] for m in models.values())
        completion_tokens = sum(m["completion_tokens"] for m in models.values())
        costs = [m["cost_usd"] for m in models.values()]
        completion += completion_tokens
        per_call[role] = {"prompt_tokens": prompt_tokens / calls, "completion_tokens": completion_tokens / calls,
                          "cost_usd": None if any(c is None for c in costs) else sum(costs) / calls}
    probe = {"questions": len(examples), "concurrency": rollout.num_threads, "seconds": round(seconds, 2),
             "failed": result.n_failed, "completion_tokens_per_s": round(completion / seconds, 2) if seconds else None}
    return per_call, probe


def optimizer_per_call(config: TRPromptConfig, optimizer_model: str | None) -> dict[str, Any]:
    """Upper-bound tokens (and dollars) of one TextGrad call, from the search's caps."""
    search = config.search
    prompt = (search.max_results_chars + TEXTGRAD_TEMPLATE_CHARS + search.max_reward_chars) / CHARS_PER_TOKEN
    completion = max(search.feedback_max_tokens, search.proposal_max_tokens)
    cost = call_cost(optimizer_model, int(prompt), completion) if optimizer_model else None
    return {"prompt_tokens": prompt, "completion_tokens": float(completion), "cost_usd": cost, "at_most": True}


def serves_adapter(stage: str) -> bool:
    """Whether a stage runs with the prompter's adapter served: everything after round 1's SFT
    (round 0's validation and round 1's rollout use the base model)."""
    return stage != "round_1/rollout" and not stage.startswith("round_0/")


def stage_seconds(stage: StageCalls, per_call: dict[str, dict[str, Any]], probe: dict[str, Any]) -> float | None:
    """LM time of one stage: its calls' completion tokens at the probe's throughput (the adapter
    probe's for a stage that serves the adapter, where that probe ran); None without a probe."""
    tokens_per_s = probe.get("completion_tokens_per_s")
    if serves_adapter(stage.stage) and (probe.get("adapter") or {}).get("completion_tokens_per_s"):
        tokens_per_s = probe["adapter"]["completion_tokens_per_s"]
    if not tokens_per_s:
        return None
    completion = sum(n * per_call[role]["completion_tokens"] for role, n in stage.calls.items() if role in per_call)
    return round(completion / tokens_per_s, 1)


def lm_seconds(stages: list[StageCalls], per_call: dict[str, dict[str, Any]], probe: dict[str, Any]) -> float | None:
    """LM time of the compile: the sum of :func:`stage_seconds`."""
    seconds = [stage_seconds(s, per_call, probe) for s in stages]
    return None if any(x is None for x in seconds) else round(sum(seconds), 1)
