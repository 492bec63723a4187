"""``TRPromptTeleprompter``: the TRPrompt bootstrap loop, and nothing else.

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
compile started again with the same ``log_dir`` continues after the last completed stage.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from ..finetune.trainer import FinetuneConfig, finetune_prompter
from ..infra.checks import check_choice, check_ints
from ..infra.evaluation import evaluate
from ..infra.parallel import check_interrupted, watch_sigint
from ..infra.runs import RunFolder, atomic_write_json, versions
from ..infra.scoring import example_id
from ..infra.structured import SafeJSONAdapter
from ..infra.usage import LMBusyClock, UsageMeter
from ..modules.roles import QueryAwarePrompter, Solver, TextualCritic
from ..prompts.defaults import INITIAL_REWARD
from ..reward_search.search import RewardSearchConfig, search_reward
from ..rollout.records import RolloutRecord, read_records
from ..rollout.rollout import (
    RolloutConfig,
    numeric_reward,
    records_path_for,
    run_rollout,
)

logger = logging.getLogger(__name__)

STAGES = ("rollout", "finetune", "reward_search", "validation")
# settings that change how fast a run goes, not what it computes: a run may be resumed with
# other values (more threads, no progress bars, another device)
_NOT_FINGERPRINTED = frozenset({
    "progress", "max_server_restarts", "val_num_threads", "num_threads", "cpu_threads", "device",
    "gradient_checkpointing", "overwrite", "straggler_timeout_s", "micro_batch_size",
})


class ServerDiedError(RuntimeError):
    """The local vLLM server died more often than ``max_server_restarts`` allows."""


def _fingerprinted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _fingerprinted(v) for k, v in value.items() if k not in _NOT_FINGERPRINTED}
    return value


@dataclasses.dataclass
class TRPromptConfig:
    """Settings of a TRPrompt compile. Every field has a documented default.

    Attributes:
        rounds: bootstrap rounds (the paper runs a few; each is rollout, SFT, t* search).
        initial_reward: the reward text of round 0's rollouts (no prior data needed).
        update_reward: search a new t* every round (True, the method). False is the paper's
            ablation: t* is searched once, after round 1, and kept.
        reward: ``"textual"`` (critiques, the method) or ``"numeric"`` (the ablation: the
            prompter is conditioned on a score; t* is the best score, no TextGrad search).
        rebalance: ``"none"``, or ``"balance"`` -- train on as many records of wrong answers as
            of right ones (the majority is subsampled with ``seed``), for easy datasets where
            most critiques are positive (the paper's open question 3).
        train_on_all_rounds: SFT on the records of every round so far (True), not only the
            current one; with ``finetune.init_from="base"`` this keeps what earlier rounds taught.
        rollout: :class:`RolloutConfig` (samples per question, temperature, threads).
        finetune: :class:`FinetuneConfig` (LoRA rank, steps, learning rate...).
        search: :class:`RewardSearchConfig` (steps, candidates, minibatch...).
        validate_initial: also validate the untrained prompter with the initial reward
            ("round 0"), the baseline each round is compared with.
        val_num_threads: threads of the validation pass.
        seed: seeds rebalancing.
        progress: progress bars.
        max_server_restarts: how many times the local vLLM server may be restarted when it dies
            during a compile (the interrupted stage runs again and keeps its completed work);
            one more death stops the compile with a clear error and a resumable run folder.
            API roles are retried by DSPy itself (``num_retries`` in ``lm_kwargs`` / your LMs).
    """

    rounds: int = 2
    initial_reward: str = INITIAL_REWARD
    update_reward: bool = True
    reward: str = "textual"
    rebalance: str = "none"
    train_on_all_rounds: bool = True
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    search: RewardSearchConfig = dataclasses.field(default_factory=RewardSearchConfig)
    validate_initial: bool = True
    val_num_threads: int = 16
    seed: int = 0
    progress: bool = True
    max_server_restarts: int = 2

    def __post_init__(self) -> None:
        check_ints(self, ("rounds",))
        check_ints(self, ("max_server_restarts",), minimum=0)
        check_choice("reward", self.reward, ("textual", "numeric"))
        check_choice("rebalance", self.rebalance, ("none", "balance"))
        if self.rollout.reward != self.reward:
            self.rollout = dataclasses.replace(self.rollout, reward=self.reward)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _find_prompter(program: dspy.Module) -> tuple[QueryAwarePrompter, Solver]:
    prompters = [m for _, m in program.named_sub_modules() if isinstance(m, QueryAwarePrompter)]
    solvers = [m for _, m in program.named_sub_modules() if isinstance(m, Solver)]
    if len(prompters) != 1 or len(solvers) != 1:
        raise ValueError(
            "TRPromptTeleprompter compiles a program with exactly one QueryAwarePrompter and one Solver "
            f"(e.g. TRPromptProgram); found {len(prompters)} prompters and {len(solvers)} solvers"
        )
    return prompters[0], solvers[0]


class TRPromptTeleprompter(Teleprompter):
    """Compile a program by TRPrompt's rounds of rollout, LoRA SFT and t* search.

    Example::

        server = VLLMServer(model="default").start()          # the prompter's base model
        tele = TRPromptTeleprompter(server=server, metric=gsm8k_metric, log_dir="runs/gsm8k")
        compiled = tele.compile(TRPromptProgram(), trainset=train, valset=val)
        compiled.save("out/")

    Args:
        server: a running ``VLLMServer`` on the prompter's base model (LoRA enabled); the
            adapters trained here are loaded into it. The prompter is fine-tuned from the same
            model (``server.model_path``).
        metric: a DSPy metric; default ``metrics.gsm8k_metric``.
        target_lm: LM of the solver; default: the solver's own LM if set, else the server's
            base model (the paper's setting: one model in all roles).
        critic_lm: LM of the critic; default: the server's base model.
        optimizer_lm: LM of TextGrad (feedback and proposals); default: the server's base model.
        structured: local roles get ``StructuredLM`` + ``dspy.JSONAdapter`` so even a 135M
            model's replies parse (vLLM enforces each signature's JSON schema).
        config: :class:`TRPromptConfig`.
        log_dir: the run folder; default ``runs/trprompt-<time>``. Compiling again with the same
            folder resumes it.
        lm_kwargs: settings of the LMs made from the server (``max_tokens``, ``temperature``).
    """

    def __init__(
        self,
        *,
        server: Any,
        metric: Callable[..., Any] | None = None,
        target_lm: dspy.BaseLM | None = None,
        critic_lm: dspy.BaseLM | None = None,
        optimizer_lm: dspy.BaseLM | None = None,
        structured: bool = True,
        config: TRPromptConfig | None = None,
        log_dir: str | Path | None = None,
        lm_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        from ..metrics import gsm8k_metric

        if server is None or not getattr(server, "running", False):
            raise ValueError("TRPromptTeleprompter needs a running VLLMServer for the prompter's base model")
        self.server = server
        self.metric = metric or gsm8k_metric
        self.structured = structured
        self.config = config or TRPromptConfig()
        self.log_dir = log_dir
        self.lm_kwargs = {"max_tokens": 384, "temperature": 0.0, **(lm_kwargs or {})}
        self.target_lm = target_lm
        self.critic_lm = critic_lm or self._server_lm()
        self.optimizer_lm = optimizer_lm or self._server_lm()

    def _server_lm(self, name: str | None = None) -> dspy.BaseLM:
        return self.server.lm(name, structured=self.structured, **self.lm_kwargs)

    # ------------------------------------------------------------------ compile

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: Sequence[dspy.Example],
        valset: Sequence[dspy.Example] | None = None,
        teacher: Any = None,
        log_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        """Run the rounds and return a compiled deep copy of ``student`` (never mutated).

        The copy's prompter holds t* and its adapter (``prompter.adapter``); its LM points at
        the adapter on the server. A compile with the ``log_dir`` of an earlier, interrupted one
        (same settings) resumes after its last completed stage.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        if not trainset:
            raise ValueError("trainset is empty")
        if valset is not None and not valset:
            raise ValueError("valset is empty (pass None to skip validation)")
        search = self.config.search
        if self.config.reward == "textual" and len(trainset) < search.minibatch_size + search.heldout_size:
            raise ValueError(
                f"trainset has {len(trainset)} examples; the reward search needs at least "
                f"minibatch_size + heldout_size = {search.minibatch_size + search.heldout_size}"
            )
        program = student.deepcopy()
        prompter, solver = _find_prompter(program)
        if prompter.generate.lm is None:
            prompter.set_lm(self._server_lm())
        if solver.solve.lm is None:
            solver.set_lm(self.target_lm or self._server_lm())
        elif self.target_lm is not None:
            solver.set_lm(self.target_lm)
        critic = TextualCritic(lm=self.critic_lm) if self.config.reward == "textual" else None

        run = RunFolder(
            log_dir or self.log_dir or f"runs/trprompt-{time.strftime('%Y%m%d-%H%M%S')}",
            fingerprint=self._fingerprint(trainset, valset),
        )
        atomic_write_json(run.file("config.json"), self._describe())
        atomic_write_json(run.file("versions.json"), versions())
        meter = UsageMeter()
        meter.assign_role(self.optimizer_lm, "optimizer")
        loop = _RoundLoop(self, run, meter, program, prompter, solver, critic, list(trainset), list(valset or []))
        settings: dict[str, Any] = {"callbacks": [*dspy.settings.get("callbacks", []), loop.clock]}
        if self.structured:
            settings["adapter"] = SafeJSONAdapter()
        with dspy.context(**settings), watch_sigint():
            loop.run()
        program._compiled = True
        return program

    def _fingerprint(self, trainset, valset) -> dict[str, Any]:
        return {
            "config": _fingerprinted(self.config.to_dict()),
            "base_model": self.server.model_path,
            "trainset": [example_id(ex, i) for i, ex in enumerate(trainset)],
            "valset": [example_id(ex, i) for i, ex in enumerate(valset or [])],
            "structured": self.structured,
        }

    def _describe(self) -> dict[str, Any]:
        def lm_name(lm):
            return getattr(lm, "model", None) if lm is not None else None

        return {
            "config": self.config.to_dict(),
            "base_model": self.server.model_path,
            "metric": getattr(self.metric, "__name__", type(self.metric).__name__),
            "lms": {"target": lm_name(self.target_lm) or "server base model", "critic": lm_name(self.critic_lm),
                    "optimizer": lm_name(self.optimizer_lm)},
            "structured": self.structured,
            "lm_kwargs": self.lm_kwargs,
        }


class _RoundLoop:
    """The state of one compile: which round, which reward, which adapter, and the report."""

    def __init__(self, tele, run, meter, program, prompter, solver, critic, trainset, valset):
        self.tele, self.folder, self.meter = tele, run, meter
        self.program, self.prompter, self.solver, self.critic = program, prompter, solver, critic
        self.trainset, self.valset = trainset, valset
        self.config: TRPromptConfig = tele.config
        self.clock = LMBusyClock()
        self.training_s = 0.0
        self.server_start_s = 0.0
        self.restarts = 0
        self.report: dict[str, Any] = {"rounds": [], "log_dir": str(run.path)}
        if self.config.reward == "numeric":
            self.reward = numeric_reward(1.0, self.config.rollout.reward_template)
        else:
            self.reward = self.config.initial_reward

    def run(self) -> None:
        start = time.perf_counter()
        if self.valset and self.config.validate_initial:
            self.prompter.reward = self.reward
            validation, _, _ = self._stage(0, "validation", lambda: self._validate(self.folder.round_dir(0)))
            self.report["initial_validation"] = validation
        for k in range(1, self.config.rounds + 1):
            self._round(k)
        self.report["wall_s"] = round(time.perf_counter() - start, 2)
        # time with no LM call in flight and no training: what the library itself costs
        self.report["lm_busy_s"] = round(self.clock.busy_seconds, 2)
        self.report["training_s"] = round(self.training_s, 2)
        self.report["server_start_s"] = round(self.server_start_s, 2)
        self.report["orchestration_s"] = round(
            self.report["wall_s"] - self.clock.busy_seconds - self.training_s - self.server_start_s, 2
        )
        self.report["usage"] = self.meter.to_dict()
        self.report["final_reward"] = self.reward
        self._write_report()

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
        t0, restarting_before = time.perf_counter(), self.server_start_s
        while True:
            if uses_server:
                self._ensure_server(key)
            try:
                with self.meter.stage(key):
                    result = fn()
            except Exception as exc:
                check_interrupted()
                if self.tele.server.running or not uses_server:
                    raise
                logger.warning("%s failed while the vLLM server was down (%s: %s)", key, type(exc).__name__, exc)
                continue
            check_interrupted()  # a Ctrl-C swallowed inside the stage: never mark it done
            if self.tele.server.running or not uses_server:
                break
            logger.warning("the vLLM server died during %s; its result is discarded and the stage runs again", key)
        # the time spent restarting the server is counted as server start, not as the stage
        seconds = round(time.perf_counter() - t0 - (self.server_start_s - restarting_before), 2)
        result = {**(result or {}), "seconds": seconds}
        self.folder.mark_done(key, result)
        return result, seconds, False

    def _ensure_server(self, where: str) -> None:
        """Restart the local server if it died (bounded by ``config.max_server_restarts``)."""
        server = self.tele.server
        if server.running:
            return
        if self.restarts >= self.config.max_server_restarts:
            raise ServerDiedError(
                f"the vLLM server died during {where} (log: {server.log_path}) after "
                f"{self.restarts} restart(s) (max_server_restarts={self.config.max_server_restarts}). "
                f"Completed work is kept in {self.folder.path}: start a server and compile again "
                "with the same log_dir to resume."
            )
        self.restarts += 1
        t0 = time.perf_counter()
        server.restart()
        self.server_start_s += time.perf_counter() - t0
        self.report.setdefault("server_restarts", []).append({"during": where, "seconds": round(time.perf_counter() - t0, 1)})

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
        self._serve_adapter(k, Path(finetune["adapter_dir"]))

        if self.config.reward == "numeric" or (not self.config.update_reward and k > 1):
            search = {"best_reward": self.reward, "skipped": True}
            row["reward_search"] = search
        else:
            search, _, _ = self._stage(k, "reward_search", lambda: self._search(round_dir))
            row["reward_search"] = search
        self.reward = search["best_reward"]
        self.prompter.reward = self.reward

        if self.valset:
            validation, _, _ = self._stage(k, "validation", lambda: self._validate(round_dir))
            row["validation"] = validation
        row["usage"] = {stage: self.meter.by_stage(f"round_{k}/{stage}") for stage in STAGES}
        counts = [m for roles in row["usage"].values() for models in roles.values() for m in models.values()]
        calls = sum(m["calls"] for m in counts)
        tokens = sum(m["prompt_tokens"] + m["completion_tokens"] for m in counts)
        self.report["rounds"].append(row)
        self._write_report()
        logger.warning(
            "round %d: val acc %s | rollout acc %.3f on %d records | t* %s | %d LM calls, %d tokens | %s",
            k, f"{row['validation']['accuracy']:.3f}" if "validation" in row else "n/a",
            rollout["accuracy"], rollout["records"], "updated" if not search.get("skipped") else "kept",
            calls, tokens,
            " ".join(f"{s} {row[s]['seconds']}s" for s in STAGES if s in row and "seconds" in row[s]),
        )

    def _rollout(self, k: int, round_dir: Path) -> dict[str, Any]:
        result = run_rollout(
            self.prompter, self.solver, self.critic, self.trainset, self.tele.metric,
            reward=self.reward, round_index=k, config=self.config.rollout,
            records_path=records_path_for(round_dir), progress=self.config.progress,
        )
        if not result.records:
            raise RuntimeError(f"round {k}: the rollout produced no usable record ({result.error_counts})")
        return result.summary()

    def _training_records(self, k: int) -> list[RolloutRecord]:
        rounds = range(1, k + 1) if self.config.train_on_all_rounds else [k]
        records = [r for i in rounds for r in read_records(records_path_for(self.folder.round_dir(i)))]
        # a small prompter sometimes writes an empty prompt (or the critic an empty critique):
        # nothing to learn from, so such records are left out and counted, not fatal
        usable = [r for r in records if r.prompt.strip() and r.critique.strip()]
        if len(usable) < len(records):
            logger.warning("round %d: %d of %d records have an empty prompt or critique and are not trained on",
                           k, len(records) - len(usable), len(records))
        records = usable
        if self.config.rebalance == "balance":
            records = rebalance_records(records, seed=self.config.seed + k)
        return records

    def _finetune(self, k: int, round_dir: Path) -> dict[str, Any]:
        records = self._training_records(k)
        if not records:
            raise RuntimeError(f"round {k}: no usable record to train on (all prompts or critiques were empty)")
        ft_config = self.config.finetune.replace(overwrite=True, progress=self.config.progress)
        result = finetune_prompter(
            records, round_dir / "adapter", model=self.tele.server.model_path, config=ft_config,
            prompter=self.prompter, adapter=dspy.settings.adapter,
            # the trained JSON must be what the server's grammar lets the model write
            compact_json=self.tele.server.config.compact_json,
        )
        summary = result.summary
        return {
            "adapter_dir": str(result.adapter_dir),
            "records": len(records),
            "steps": summary.get("steps"),
            "final_loss": (result.loss_curve or [None])[-1],
        }

    def _serve_adapter(self, k: int, adapter_dir: Path) -> None:
        from ..infra.adapters import adapter_fingerprint

        server = self.tele.server
        name = f"prompter-r{k}-{adapter_fingerprint(adapter_dir)[:12]}"
        previous = self.prompter.adapter
        if name not in server.adapters:
            if previous and previous["name"] in server.adapters:
                server.unload_adapter(previous["name"])
            server.load_adapter(name, adapter_dir)
        self.prompter.set_lm(self.tele._server_lm(name))
        self.prompter.adapter = {"name": name, "path": str(adapter_dir), "base_model": server.model_path}

    def _search(self, round_dir: Path) -> dict[str, Any]:
        result = search_reward(
            self.prompter, self.solver, self.trainset, self.tele.metric,
            optimizer_lm=self.tele.optimizer_lm, config=self.config.search,
            run_dir=round_dir / "reward_search", initial_reward=self.reward,
        )
        return {
            "best_reward": result.best_reward, "best_accuracy": result.best_accuracy,
            "accuracy_source": result.accuracy_source, "steps_run": result.steps_run,
            "stop_reason": result.stop_reason,
        }

    def _validate(self, round_dir: Path) -> dict[str, Any]:
        report = evaluate(
            self.program, self.valset, self.tele.metric,
            num_threads=self.config.val_num_threads, progress=self.config.progress,
        )
        atomic_write_json(round_dir / "validation.json", report.to_dict())
        return {"accuracy": report.accuracy, "n": report.n, "n_correct": report.n_correct, "n_errors": report.n_errors}

    # ------------------------------------------------------------------ report

    def _write_report(self) -> None:
        atomic_write_json(self.folder.file("report.json"), self.report)
        try:
            _plot(self.report, self.folder.file("report.png"))
        except Exception as exc:  # a plot must never cost the run
            logger.warning("could not draw the report plot: %s", exc)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    ks = [r["round"] for r in rounds]
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    val_ks = ([0] if "initial_validation" in report else []) + ks
    val = ([report["initial_validation"]["accuracy"]] if "initial_validation" in report else []) + [
        r.get("validation", {}).get("accuracy") for r in rounds
    ]
    if any(v is not None for v in val):
        ax_acc.plot(val_ks, [v if v is not None else float("nan") for v in val], marker="o", label="validation")
    ax_acc.plot(ks, [r["rollout"]["accuracy"] for r in rounds], marker="s", linestyle="--", label="rollout (training)")
    ax_acc.set(xlabel="round (0: untrained)", ylabel="accuracy", title="Accuracy per round", ylim=(0, 1), xticks=val_ks)
    ax_acc.legend()
    bottom = [0.0] * len(ks)
    for stage in STAGES:
        secs = [float(r.get(stage, {}).get("seconds", 0.0) or 0.0) for r in rounds]
        ax_time.bar(ks, secs, bottom=bottom, label=stage)
        bottom = [b + s for b, s in zip(bottom, secs)]
    ax_time.set(xlabel="round", ylabel="seconds", title="Wall time per stage", xticks=ks)
    ax_time.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
