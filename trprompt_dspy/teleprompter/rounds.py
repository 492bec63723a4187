"""One compile's round loop: rollout, finetune, serve the adapter, search t*, validate.

Round k (see ``../shared/DESIGN.md`` and arXiv 2507.18618):

1. **rollout** -- the prompter, conditioned on the current reward text, samples prompts for the
   training questions; the solver answers; the metric scores; the critic critiques each prompt
   (``rollout.run_rollout``; records appended to ``round_k/records.jsonl`` as they complete).
2. **finetune** -- LoRA SFT of the prompter on (question, critique) -> prompt
   (``finetune.finetune_prompter``; adapter in ``round_k/adapter``).
3. **serve** -- the adapter is loaded into the vLLM server and the prompter's LM points at it.
4. **reward search** -- TextGrad search of t* (``reward_search.search_reward``), which becomes the
   reward text of the next round and of the compiled prompter.
5. **validation** -- accuracy of prompter(t*) + solver on the valset.

Every stage's result is written to the run folder and marked done (``runs.RunFolder``), so a
compile started again with the same ``log_dir`` continues after the last completed stage. If the
local vLLM server dies, it is restarted (up to ``max_server_restarts``) and the stage runs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import dspy

from ..errors import TRPromptError
from ..finetune import finetune_prompter
from ..infra.adapters import adapter_fingerprint
from ..infra.budget import BudgetExceeded
from ..infra.evaluation import evaluate
from ..infra.parallel import check_interrupted
from ..infra.runs import DiskFullError, RunFolder, atomic_write_json, disk_full_as_error, disk_full_error, is_disk_full
from ..infra.serving import AdapterError
from ..infra.usage import LMBusyClock, UsageMeter
from ..modules.roles import QueryAwarePrompter, Solver, TextualCritic
from ..metrics import answer_in_text
from ..reward_search import RewardSearchConfig, search_reward
from ..rollout.records import RolloutRecord, read_records
from ..rollout.rollout import QPO_MAX_RETURN, numeric_reward, qpo_returns, records_path_for, run_rollout
from .config import STAGES, TRPromptConfig
from .integrity import repair_run_folder
from .report import write_report

logger = logging.getLogger(__name__)


class ServerDiedError(TRPromptError, RuntimeError):
    """The local vLLM server died more often than ``max_server_restarts`` allows."""


class CompileError(TRPromptError, RuntimeError):
    """A stage left the next one nothing to work on (no usable rollout record, nothing to train on)."""


class _RoundLoop:
    """The state of one compile: which round, which reward, which adapter, and the report.

    ``tele`` is the ``TRPromptTeleprompter`` (its server, metric, LMs and config); ``run`` the
    run folder; ``meter`` counts LM usage per stage and role; ``program`` is the copy being
    compiled, holding ``prompter`` and ``solver``; ``critic`` is None with a numeric reward.
    """

    def __init__(
        self,
        tele: Any,
        run: RunFolder,
        meter: UsageMeter,
        program: dspy.Module,
        prompter: QueryAwarePrompter,
        solver: Solver,
        critic: TextualCritic | None,
        trainset: list[dspy.Example],
        valset: list[dspy.Example],
    ):
        self.tele, self.folder, self.meter = tele, run, meter
        self.program, self.prompter, self.solver, self.critic = program, prompter, solver, critic
        self.config: TRPromptConfig = tele.config
        self.valset = valset
        # rollouts, SFT and the search's minibatches use self.trainset; t* candidates are also
        # scored on self.search_heldout, questions no adapter was trained on
        self.trainset, self.search_heldout = search_split(trainset, valset, self.config)
        self.clock = LMBusyClock()
        self.training_s = 0.0
        self.server_start_s = 0.0
        self.restarts = 0
        self.report: dict[str, Any] = {"rounds": [], "log_dir": str(run.path)}
        self.reward = self.initial_reward_text = initial_reward(self.config)
        #: the caps (``infra/budget.py``); the compile puts it in the DSPy settings for the batches
        self.budget = self.config.budget(meter)
        #: ``infra.tracking.MLflowTracker`` and ``infra.progress.CompileDisplay`` (set by the compile) or None
        self.tracker: Any = None
        self.display: Any = None

    def run(self) -> None:
        start = time.perf_counter()
        # a resumed folder's done stages are checked against their files first (integrity.py)
        repairs = repair_run_folder(self.folder)
        if repairs:
            self.report["repairs"] = repairs
        try:
            if self.valset and self.config.validate_initial:
                self.prompter.reward = self.reward
                validation, _, _ = self._stage(0, "validation", lambda: self._validate(self.folder.round_dir(0)))
                self.report["initial_validation"] = validation
            for k in range(1, self.config.rounds + 1):
                self._round(k)
        except BudgetExceeded as stop:
            done = len(self.report["rounds"])
            self.report["stopped_by"] = {"cap": stop.cap, "message": str(stop), "rounds_completed": done}
            logger.warning("compile stopped: %s after %d of %d rounds; returning the best completed round. Compile "
                           "again with the same log_dir and a larger cap to go on.", stop, done, self.config.rounds)
        self._return_selected_round()
        self.report["wall_s"] = round(time.perf_counter() - start, 2)
        # time with no LM call in flight and no training: what the library itself costs
        self.report["lm_busy_s"] = round(self.clock.busy_seconds, 2)
        self.report["training_s"] = round(self.training_s, 2)
        self.report["server_start_s"] = round(self.server_start_s, 2)
        self.report["orchestration_s"] = round(
            self.report["wall_s"] - self.clock.busy_seconds - self.training_s - self.server_start_s, 2
        )
        self.report["usage"] = self.meter.to_dict()  # this process
        self.report["usage_all_processes"] = self._usage_of_done_stages()
        self.report["final_reward"] = self.reward
        self._write_report()

    def _write_report(self) -> None:
        def needed() -> int:  # the report's JSON and the plot it replaces
            png = self.folder.file("report.png")
            return len(json.dumps(self.report, default=str)) + (png.stat().st_size if png.is_file() else 0)

        with disk_full_as_error(self.folder.path, "writing the report", needed):
            write_report(self.folder, self.report)

    def _usage_of_done_stages(self) -> dict[str, Any]:
        """LM calls and tokens of every done stage, whichever process ran it (stages done before
        stage results carried their usage count as 0; ``stages_without_usage`` lists them)."""
        totals = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        roles: dict[str, dict[str, int]] = {}
        missing = []
        for stage in self.folder.completed:
            usage = (self.folder.result(stage) or {}).get("usage")
            if usage is None:
                missing.append(stage)
                continue
            for role, models in usage.items():
                per_role = roles.setdefault(role, dict.fromkeys(totals, 0))
                for m in models.values():
                    for key in totals:
                        totals[key] += int(m.get(key, 0))
                        per_role[key] += int(m.get(key, 0))
        return {**totals, "roles": roles, "stages_without_usage": missing}

    def _return_selected_round(self) -> None:
        """Leave the program holding the round :func:`select_round` picks (its t* and adapter)
        among the completed ones (all of them, unless a cap stopped the compile)."""
        rows = self.report["rounds"]
        k = select_round(rows, self.report.get("initial_validation"), self.config.select_round)
        self.report["selected_round"] = k
        if k == self.config.rounds:
            return  # the program already holds the last round
        if k == 0:
            self.reward = self.initial_reward_text  # textual or numeric
            # the last round's adapter is not returned: free its LoRA slot (a shared server's
            # other compiles need it)
            last = self.prompter.adapter
            if last and last["name"] in self.tele.server.adapters:
                self.tele.server.unload_adapter(last["name"])
            self.prompter.adapter = None
            self.prompter.set_lm(self.tele._server_lm())
        else:
            row = rows[k - 1]
            self.reward = row["reward_search"]["best_reward"]
            self._ensure_server(f"round_{k}/serve_adapter")
            self._serve_adapter(k, self.folder.round_dir(k) / "adapter")
        self.prompter.reward = self.reward
        self._say(f"returning round {k}, the best on validation (select_round={self.config.select_round!r})")

    def _say(self, line: str) -> None:
        """A line the user reads (a round's summary): logged at INFO, and printed above the progress
        display when no handler shows this logger's INFO records (the command line's does)."""
        logger.info(line)
        if self.display is not None and not logger.isEnabledFor(logging.INFO):
            self.display.print(line)

    # ------------------------------------------------------------------ one round

    def _stage(self, k: int, name: str, fn: Callable[[], Any], uses_server: bool = True) -> tuple[Any, float, bool]:
        """Run a stage unless the run folder marks it done; returns (result, seconds, resumed).

        If the local server died while the stage ran, its result is not trusted (requests failed
        for that reason, not the model's): the server is restarted and the stage runs again,
        keeping what it had completed (a rollout resumes from its records; a search starts over,
        its finished LM calls answered from DSPy's cache when the cache is on).
        """
        key = f"round_{k}/{name}"
        if self.folder.is_done(key):
            return self.folder.result(key), 0.0, True
        self.budget.check()  # a stage starts only with budget left
        t0, restarting_before = time.perf_counter(), self.server_start_s
        while True:
            if uses_server:
                self._ensure_server(key)
            try:
                with self.meter.stage(key), self.display.stage(key) if self.display else contextlib.nullcontext():
                    result = fn()
            except Exception as exc:
                check_interrupted()
                if is_disk_full(exc) and not isinstance(exc, DiskFullError):
                    raise disk_full_error(self.folder.path, key) from exc
                if isinstance(exc, BudgetExceeded) or self._servers_up() or not uses_server:
                    raise
                logger.warning("%s failed while the vLLM server was down (%s: %s)", key, type(exc).__name__, exc)
                continue
            check_interrupted()  # a Ctrl-C swallowed inside the stage: never mark it done
            if self._servers_up() or not uses_server:
                break
            logger.warning("the vLLM server died during %s; its result is discarded and the stage runs again", key)
        # the time spent restarting the server is counted as server start, not as the stage
        seconds = round(time.perf_counter() - t0 - (self.server_start_s - restarting_before), 2)
        # the stage's LM usage travels with its result: a resumed compile still reports it
        result = {**(result or {}), "seconds": seconds, "usage": self.meter.by_stage(key)}
        self.folder.mark_done(key, result)
        return result, seconds, False

    def _servers_up(self) -> bool:
        return all(server.running for server in self.tele.servers)

    def _ensure_server(self, where: str) -> None:
        """Restart every local server that died (the prompter's and the roles' own; bounded by
        ``config.max_server_restarts`` over all of them)."""
        for server in self.tele.servers:
            if server.running:
                continue
            if self.restarts >= self.config.max_server_restarts:
                raise ServerDiedError(
                    f"the vLLM server of {server.config.model} died during {where} (log: {server.log_path}) after "
                    f"{self.restarts} restart(s) (max_server_restarts={self.config.max_server_restarts}). "
                    f"Completed work is kept in {self.folder.path}: start a server and compile again "
                    "with the same log_dir to resume."
                )
            self.restarts += 1
            t0 = time.perf_counter()
            server.restart()
            self.server_start_s += time.perf_counter() - t0
            self.report.setdefault("server_restarts", []).append(
                {"during": where, "model": str(server.config.model), "seconds": round(time.perf_counter() - t0, 1)})

    def _round(self, k: int) -> None:
        round_dir = self.folder.round_dir(k)
        row: dict[str, Any] = {"round": k, "reward_in": self.reward}

        rollout, _, _ = self._stage(k, "rollout", lambda: self._rollout(k, round_dir))
        row["rollout"] = rollout
        # SFT does not use the server: if it dies meanwhile, it is restarted before the adapter is served
        finetune, seconds, _ = self._stage(k, "finetune", lambda: self._finetune(k, round_dir), uses_server=False)
        self.training_s += seconds  # 0 for a stage resumed from an earlier process
        row["finetune"] = finetune
        self._ensure_server(f"round_{k}/serve_adapter")
        # where the run folder is now (it may have been moved since the adapter was trained)
        self._serve_adapter(k, round_dir / "adapter")

        if self.config.reward == "numeric" or (not self.config.update_reward and k > 1):
            search = {"best_reward": self.reward, "skipped": True}
            row["reward_search"] = search
        else:
            search, _, _ = self._stage(k, "reward_search", lambda: self._search(k, round_dir))
            row["reward_search"] = search
        self.reward = search["best_reward"]
        self.prompter.reward = self.reward

        if self.valset:
            validation, _, _ = self._stage(k, "validation", lambda: self._validate(round_dir))
            row["validation"] = validation
        # a stage done by an earlier process brings its usage in its result (older folders: none)
        row["usage"] = {stage: (row[stage].get("usage") if isinstance(row.get(stage), dict) and "usage" in row[stage]
                                else self.meter.by_stage(f"round_{k}/{stage}")) for stage in STAGES}
        counts = [m for roles in row["usage"].values() for models in roles.values() for m in models.values()]
        calls = sum(m["calls"] for m in counts)
        tokens = sum(m["prompt_tokens"] + m["completion_tokens"] for m in counts)
        self.report["rounds"].append(row)
        self._write_report()
        if self.tracker is not None:
            self.tracker.log_round(row)
        summary = "round %d: val acc %s | rollout acc %.3f on %d records | t* %s | %d LM calls, %d tokens | %s" % (
            k, f"{row['validation']['accuracy']:.3f}" if "validation" in row else "n/a",
            rollout["accuracy"], rollout["records"], "updated" if not search.get("skipped") else "kept",
            calls, tokens,
            " ".join(f"{s} {row[s]['seconds']}s" for s in STAGES if s in row and "seconds" in row[s]),
        )
        self._say(summary)

    def _rollout(self, k: int, round_dir: Path) -> dict[str, Any]:
        result = run_rollout(
            self.prompter, self.solver, self.critic, self.trainset, self.tele.metric,
            reward=self.reward, round_index=k, config=self.config.rollout,
            records_path=records_path_for(round_dir), progress=self.config.progress,
        )
        if not result.records:
            raise CompileError(f"round {k}: the rollout produced no usable record ({result.error_counts})")
        return result.summary()

    def _training_records(self, k: int) -> list[RolloutRecord]:
        rounds = range(1, k + 1) if self.config.train_on_all_rounds else [k]
        qpo = self.config.reward == "numeric" and self.config.numeric_return == "qpo"
        records = []
        for i in rounds:
            got = read_records(records_path_for(self.folder.round_dir(i)))
            # QPO's return needs the round's mean score: known only once the round is rolled out
            records += qpo_returns(got, self.config.rollout.reward_template) if qpo else got
        # a small prompter sometimes writes an empty prompt (or the critic an empty critique):
        # nothing to learn from, so such records are left out and counted, not fatal
        usable = [r for r in records if r.prompt.strip() and r.critique.strip()]
        if len(usable) < len(records):
            logger.warning("round %d: %d of %d records have an empty prompt or critique and are not trained on",
                           k, len(records) - len(usable), len(records))
        records = usable
        if self.config.answer_leaks == "drop":
            kept = without_answer_leaks(records)
            if len(kept) < len(records):
                logger.warning("round %d: %d of %d records give the gold answer away in the prompt and are not "
                               "trained on (answer_leaks='drop')", k, len(records) - len(kept), len(records))
            records = kept
        if self.config.rebalance == "balance":
            records = rebalance_records(records, seed=self.config.seed + k)
        return records

    def _finetune(self, k: int, round_dir: Path) -> dict[str, Any]:
        records = self._training_records(k)
        if not records:
            raise CompileError(f"round {k}: no usable record to train on (every prompt or critique was empty, "
                               "or gave the answer away)")
        ft_config = self.config.finetune.replace(overwrite=True, progress=self.config.progress)
        if self.config.continue_training and k > 1:
            ft_config = ft_config.replace(init_from="previous",
                                          previous_adapter=str(self.folder.round_dir(k - 1) / "adapter"))
        result = finetune_prompter(
            records, round_dir / "adapter", model=self.tele.server.model_path, config=ft_config,
            prompter=self.prompter, adapter=dspy.settings.adapter,
            callbacks=[self.display.trainer_callback()] if self.display is not None else (),
            # the trained JSON must be what the server's grammar lets the model write
            compact_json=self.tele.server.config.compact_json,
        )
        summary = result.summary
        return {
            "adapter_dir": str(result.adapter_dir),
            "records": len(records),
            "steps": summary.get("steps"),
            "final_loss": (result.loss_curve or [None])[-1],
            "loss_curve": list(result.loss_curve or []),
        }

    def _serve_adapter(self, k: int, adapter_dir: Path) -> None:
        server = self.tele.server
        name = f"prompter-r{k}-{adapter_fingerprint(adapter_dir)[:12]}"
        previous = self.prompter.adapter
        if name not in server.adapters:
            if previous and previous["name"] in server.adapters:
                server.unload_adapter(previous["name"])
            try:
                server.load_adapter(name, adapter_dir)
            except AdapterError as error:  # e.g. every LoRA slot taken by other compiles on this server
                raise AdapterError(f"round {k}: {error} Round {k}'s adapter is kept in {adapter_dir}: compile again "
                                   "with the same log_dir to resume.") from error
        self.prompter.set_lm(self.tele._server_lm(name))
        self.prompter.adapter = {"name": name, "path": str(adapter_dir), "base_model": server.model_path}

    def _search_config(self, k: int) -> RewardSearchConfig:
        """The search's settings for round k: t* no longer than the longest critique trained on
        (``reward_chars_from_critiques``), but never below the search's own minimum."""
        cfg = self.config.search
        if not self.config.reward_chars_from_critiques:
            return cfg
        longest = max((len(r.critique.strip()) for r in self._training_records(k)), default=cfg.max_reward_chars)
        cap = max(cfg.min_reward_chars, min(cfg.max_reward_chars, longest))
        return cfg if cap == cfg.max_reward_chars else dataclasses.replace(cfg, max_reward_chars=cap)

    def _search(self, k: int, round_dir: Path) -> dict[str, Any]:
        config = self._search_config(k)
        result = search_reward(
            self.prompter, self.solver, self.trainset, self.tele.metric,
            optimizer_lm=self.tele.optimizer_lm, config=config,
            run_dir=round_dir / "reward_search", initial_reward=self.reward, heldout=self.search_heldout,
        )
        return {
            "best_reward": result.best_reward, "best_accuracy": result.best_accuracy,
            "accuracy_source": result.accuracy_source, "steps_run": result.steps_run,
            "stop_reason": result.stop_reason, "max_reward_chars": config.max_reward_chars,
            "heldout": len(self.search_heldout) if self.search_heldout is not None else config.heldout_size,
        }

    def _validate(self, round_dir: Path) -> dict[str, Any]:
        report = evaluate(
            self.program, self.valset, self.tele.metric,
            num_threads=self.config.val_num_threads, progress=self.config.progress,
        )
        atomic_write_json(round_dir / "validation.json", report.to_dict())
        return {"accuracy": report.accuracy, "n": report.n, "n_correct": report.n_correct, "n_errors": report.n_errors}


def initial_reward(config: TRPromptConfig) -> str:
    """The reward text of round 1's rollouts: ``config.initial_reward``, or with a numeric reward
    the full score."""
    if config.reward == "numeric":
        best = QPO_MAX_RETURN if config.numeric_return == "qpo" else 1.0
        return numeric_reward(best, config.rollout.reward_template)
    return config.initial_reward


def search_split(
    trainset: Sequence[dspy.Example], valset: Sequence[dspy.Example], config: TRPromptConfig
) -> tuple[list[dspy.Example], list[dspy.Example] | None]:
    """``(train, heldout)``: the questions rolled out and trained on, and those every t*
    candidate is also scored on (None: the search holds out its own, ``search.heldout_size``).
    See ``TRPromptConfig.search_heldout``; ``"trainset"`` draws its slice with ``config.seed``
    and keeps the trainset's order in both parts."""
    trainset = list(trainset)
    how, size = config.search_heldout, config.search_heldout_size
    if how == "valset" and not valset:
        logger.warning("no valset: t* is chosen on training questions only (search_heldout='none')")
        how = "none"
    if how == "none":
        return trainset, None
    if how == "valset":
        return trainset, list(valset[:size] if size else valset)
    if size >= len(trainset):
        raise ValueError(f"search_heldout_size={size} leaves no training question of {len(trainset)}")
    held = set(random.Random(config.seed).sample(range(len(trainset)), size))
    return ([ex for i, ex in enumerate(trainset) if i not in held],
            [ex for i, ex in enumerate(trainset) if i in held])


def select_round(rows: Sequence[dict[str, Any]], initial_validation: dict[str, Any] | None, how: str = "best") -> int:
    """The round a compile returns (see ``TRPromptConfig.select_round``): with ``"best"``, the
    highest validation accuracy, the later round on a tie, round 0 (``initial_validation``) only
    when strictly best; the last round with ``"last"`` or without validation."""
    last = len(rows)
    if not last:
        return 0  # a cap stopped the compile before its first round was complete
    if how == "last" or not all("validation" in row for row in rows):
        return last
    best = max(range(last), key=lambda i: (rows[i]["validation"]["accuracy"], i))
    if initial_validation is not None and initial_validation["accuracy"] > rows[best]["validation"]["accuracy"]:
        return 0
    return best + 1


def without_answer_leaks(records: Sequence[RolloutRecord]) -> list[RolloutRecord]:
    """The records whose prompt does not write the gold answer (``metrics.answer_in_text``)."""
    return [r for r in records if not answer_in_text(r.prompt, r.reference, r.question)]


def rebalance_records(records: Sequence[RolloutRecord], seed: int = 0) -> list[RolloutRecord]:
    """As many records with wrong answers as with right ones: the larger group is subsampled."""
    right = [r for r in records if r.correct]
    wrong = [r for r in records if not r.correct]
    if not right or not wrong:
        return list(records)
    rng = random.Random(seed)
    n = min(len(right), len(wrong))
    keep = {id(r) for r in rng.sample(right, n) + rng.sample(wrong, n)}
    return [r for r in records if id(r) in keep]
