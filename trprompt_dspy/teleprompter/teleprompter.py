"""``TRPromptTeleprompter``: compile a DSPy program by TRPrompt's rounds.

This file checks the arguments, makes the LMs and the run folder, and hands the rounds to
``rounds._RoundLoop``; ``config.py`` holds the settings and ``report.py`` the report.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from ..infra.budget import BUDGET_SETTING
from ..infra.progress import DISPLAY_SETTING, CompileDisplay
from ..infra.checks import check_choice
from ..infra.models import OUTPUT_FORMATS
from ..infra.parallel import watch_sigint
from ..infra.runs import RunFolder, atomic_write_json, disk_full_as_error, versions
from ..infra.scoring import example_id
from ..infra.settings import result_settings
from ..infra.structured import adapter_for
from ..infra.tracking import make_tracker
from ..infra.usage import UsageMeter
from ..modules.roles import MODULE_ROLES, QueryAwarePrompter, Solver, TextualCritic
from .config import TRPromptConfig
from .estimate import CompileEstimate, count_calls, lm_seconds, optimizer_per_call, probe_rollout, serves_adapter
from .rounds import _RoundLoop, initial_reward


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
        metric: a DSPy metric, ``metric(example, prediction, trace=None)`` -> bool or score;
            required, as in DSPy's optimizers (``trprompt_dspy.metrics.metric_for(dataset)``
            gives the one of a bundled dataset).
        target_lm: LM of the solver; default: the solver's own LM if set, else the server's
            base model (the paper's setting: one model in all roles).
        critic_lm: LM of the critic; default: the server's base model.
        optimizer_lm: LM of TextGrad (feedback and proposals); default: the server's base model.
            Each of the three may also be a running ``VLLMServer`` on another local base model
            (e.g. target = Qwen 0.5B base, critic and optimizer = Qwen 1.5B): the role then
            gets that server's LM in its own wire format, and the compile restarts that server
            too when it dies. One server per distinct base model; roles may share one.
        structured: local roles get a ``StructuredLM`` in the server's wire format, and every role
            the matching adapter: ``json`` (vLLM enforces each signature's JSON schema, so even a
            135M model's replies parse) or ``prose`` (real models; see ``ServerConfig.output_format``).
        output_format: ``"json"`` or ``"prose"`` for the local roles; None: the server's.
        config: :class:`TRPromptConfig`.
        log_dir: the run folder; default ``runs/trprompt-<time>``. Compiling again with the same
            folder resumes it.
        lm_kwargs: settings of the LMs made from the server (``max_tokens``, ``temperature``).
    """

    def __init__(
        self,
        *,
        server: Any,
        metric: Callable[..., Any] | None = None,  # required: None only to get the message below
        target_lm: Any = None,
        critic_lm: Any = None,
        optimizer_lm: Any = None,
        structured: bool = True,
        output_format: str | None = None,
        config: TRPromptConfig | None = None,
        log_dir: str | Path | None = None,
        lm_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        if server is None or not getattr(server, "running", False):
            raise ValueError(f"{name} needs a running VLLMServer for the prompter's base model")
        if not callable(metric):
            got = "none" if metric is None else f"a {type(metric).__name__}"
            raise TypeError(
                f"{name} needs a metric, metric=<callable(example, prediction, trace=None)>, got {got}; "
                "for a bundled dataset pass trprompt_dspy.metrics.metric_for(<dataset>)"
            )
        self.server = server
        self.metric = metric
        self.structured = structured
        #: the local model's wire format: json or prose (default: the server's, chosen per model)
        self.output_format = output_format or getattr(server, "output_format", None) or "json"
        check_choice("output_format", self.output_format, OUTPUT_FORMATS)
        self.config = config or TRPromptConfig()
        self.log_dir = log_dir
        self.lm_kwargs = {"max_tokens": 384, "temperature": 0.0, **(lm_kwargs or {})}
        #: the local servers of roles on another base model than the prompter's, by role
        self.role_servers: dict[str, Any] = {}
        self.stopped_by: dict[str, Any] | None = None
        self.target_lm = self._role_lm("target", target_lm)
        self.critic_lm = self._role_lm("critic", critic_lm) or self._server_lm()
        self.optimizer_lm = self._role_lm("optimizer", optimizer_lm) or self._server_lm()

    @property
    def servers(self) -> list[Any]:
        """Every local server the compile uses: the prompter's first, then the roles' own."""
        unique = {id(self.server): self.server}
        unique.update((id(s), s) for s in self.role_servers.values())
        return list(unique.values())

    def _role_lm(self, role: str, given: Any) -> Any:
        """A role's LM: None (the default), an LM as given, or the LM of a running server."""
        if given is None or isinstance(given, dspy.BaseLM):
            return given
        if not callable(getattr(given, "lm", None)) or not hasattr(given, "running"):
            raise TypeError(f"{role}_lm must be a dspy.BaseLM or a running VLLMServer, got a {type(given).__name__}")
        if not given.running:
            raise ValueError(f"{role}_lm: the server of {getattr(given, 'model_path', '?')} is not running")
        if given is not self.server:
            self.role_servers[role] = given
        if self.structured:
            return given.lm(structured=True, **self.lm_kwargs)  # in that model's own wire format
        return given.lm(**self.lm_kwargs)

    def _server_lm(self, name: str | None = None) -> dspy.BaseLM:
        if self.structured:
            return self.server.lm(name, structured=True, output_format=self.output_format, **self.lm_kwargs)
        return self.server.lm(name, **self.lm_kwargs)

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
        (same settings) resumes after its last completed stage. When a cap of the config
        (``max_lm_calls``, ``max_cost_usd``, ``max_wall_s``) stops it, the copy holds the best
        round completed so far and ``self.stopped_by`` names the cap (None otherwise).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        if not trainset:
            raise ValueError("trainset is empty")
        if valset is not None and not valset:
            raise ValueError("valset is empty (pass None to skip validation)")
        search, cfg = self.config.search, self.config
        if cfg.reward == "textual":
            if cfg.search_heldout == "none" or (cfg.search_heldout == "valset" and not valset):
                need, what = search.minibatch_size + search.heldout_size, "minibatch_size + heldout_size"
            elif cfg.search_heldout == "trainset":
                need, what = search.minibatch_size + cfg.search_heldout_size, "minibatch_size + search_heldout_size"
            else:
                need, what = search.minibatch_size, "minibatch_size"
            if len(trainset) < need:
                raise ValueError(f"trainset has {len(trainset)} examples; the reward search needs at least "
                                 f"{what} = {need}")
        program, prompter, solver, critic = self._prepare(student)

        run = RunFolder(
            log_dir or self.log_dir or f"runs/trprompt-{time.strftime('%Y%m%d-%H%M%S')}",
            fingerprint=self._fingerprint(trainset, valset),
        )
        with disk_full_as_error(run.path, "the run's settings"):
            atomic_write_json(run.file("config.json"), self._describe())
            atomic_write_json(run.file("versions.json"), versions())
        meter = UsageMeter(MODULE_ROLES)
        meter.assign_role(self.optimizer_lm, "optimizer")
        # before any LM call: a tracker asked for and not installed stops here, in one line
        tracker = make_tracker(self.config.track, run.path, self.config.track_uri)
        if tracker is not None:
            tracker.log_config(self._describe())
        loop = _RoundLoop(self, run, meter, program, prompter, solver, critic, list(trainset), list(valset or []))
        loop.tracker = tracker
        settings: dict[str, Any] = {"callbacks": [*dspy.settings.get("callbacks", []), loop.clock]}
        if loop.budget.capped:  # read by every batch of LM calls, in its worker threads too
            settings[BUDGET_SETTING] = loop.budget
        if self.config.progress:  # one display instead of a bar per batch and trl's logs
            loop.display = settings[DISPLAY_SETTING] = CompileDisplay(self.config.rounds, meter)
        if self.structured and not self.role_servers:
            # every role, API ones too, in the wire format of the local model (json or prose);
            # with roles on several local models each StructuredLM picks its own format and an
            # API role gets DSPy's default adapter
            settings["adapter"] = adapter_for(self.output_format)
        try:
            with dspy.context(**settings), watch_sigint(), loop.display or contextlib.nullcontext():
                loop.run()
        except BaseException:
            if tracker is not None:
                tracker.fail()
            raise
        #: the cap that stopped this compile (``{"cap", "message", "rounds_completed"}``), or None
        self.stopped_by = loop.report.get("stopped_by")
        program._compiled = True
        program.role_models = self._role_models(solver.solve.lm)
        if tracker is not None:
            tracker.finish(loop.report, program)
        return program

    def _prepare(self, student: dspy.Module) -> tuple[dspy.Module, QueryAwarePrompter, Solver, TextualCritic | None]:
        """A deep copy of ``student`` with its prompter and solver on the compile's LMs, and the critic."""
        program = student.deepcopy()
        prompter, solver = _find_prompter(program)
        if prompter.generate.lm is None:
            prompter.set_lm(self._server_lm())
        if solver.solve.lm is None:
            solver.set_lm(self.target_lm or self._server_lm())
        elif self.target_lm is not None:
            solver.set_lm(self.target_lm)
        critic = TextualCritic(lm=self.critic_lm) if self.config.reward == "textual" else None
        return program, prompter, solver, critic

    def estimate(
        self,
        student: dspy.Module,
        *,
        trainset: Sequence[dspy.Example],
        valset: Sequence[dspy.Example] | None = None,
        probe: int = 8,
    ) -> CompileEstimate:
        """What ``compile(student, trainset=..., valset=...)`` would take, before running it: LM
        calls per stage and role (exact, the t* search an upper bound), and from a probe of
        ``probe`` training questions through the rollout path (about 3 LM calls each; 0: none)
        tokens, dollars of priced models and LM minutes. See ``teleprompter/estimate.py``.

        Example::

            print(tele.estimate(TRPromptProgram(), trainset=train, valset=val).table())
        """
        if not trainset:
            raise ValueError("trainset is empty")
        if probe < 0:
            raise ValueError(f"probe must be >= 0, got {probe}")
        stages = count_calls(self.config, len(trainset), len(valset or []), cached=self.lm_kwargs.get("cache", True))
        per_call: dict[str, dict[str, Any]] = {}
        summary: dict[str, Any] = {"questions": 0}
        if probe:
            _, prompter, solver, critic = self._prepare(student)
            settings: dict[str, Any] = {}
            if self.structured and not self.role_servers:
                settings["adapter"] = adapter_for(self.output_format)
            with dspy.context(**settings):
                per_call, summary = probe_rollout(
                    prompter, solver, critic, list(trainset)[:probe], self.metric, config=self.config,
                    reward=initial_reward(self.config))
                if any(serves_adapter(s.stage) for s in stages):
                    # the same questions, as many at once: a server's throughput grows with concurrency
                    summary["adapter"] = self._probe_with_adapter(prompter, solver, critic, list(trainset)[:probe])
        if any("optimizer" in s.calls for s in stages):
            per_call["optimizer"] = optimizer_per_call(self.config, getattr(self.optimizer_lm, "model", None))
        return CompileEstimate(stages=stages, per_call=per_call, probe=summary,
                               wall_s=lm_seconds(stages, per_call, summary))

    def _probe_with_adapter(self, prompter: QueryAwarePrompter, solver: Solver, critic: TextualCritic | None,
                            examples: list[dspy.Example]) -> dict[str, Any]:
        """The probe again with an untrained adapter of the compile's LoRA shape served to the
        prompter, as every stage after round 1's SFT runs (see ``teleprompter/estimate.py``)."""
        import tempfile
        import uuid

        from ..finetune.trainer import write_untrained_adapter

        name = f"estimate-probe-{uuid.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory(prefix="trprompt-probe-") as folder:
            path = write_untrained_adapter(self.server.model_path, Path(folder) / "adapter", self.config.finetune)
            self.server.load_adapter(name, path)
            try:
                prompter.set_lm(self._server_lm(name))
                _, summary = probe_rollout(prompter, solver, critic, examples, self.metric, config=self.config,
                                           reward=initial_reward(self.config))
            finally:
                self.server.unload_adapter(name)
        return summary

    def _role_models(self, target_lm: Any) -> dict[str, dict[str, Any]]:
        """Where each role ran, for the saved program's manifest: a local base model (named as
        it was served, e.g. an embedded name) or an API model (its litellm name)."""
        # the prompter's base model too: a compile that returns round 0 has no adapter naming it
        roles: dict[str, dict[str, Any]] = {"prompter": {
            "local": True, "model": str(self.server.config.model), "output_format": self.output_format,
            "shares_prompter": True}}
        for role, lm in (("target", target_lm), ("critic", self.critic_lm), ("optimizer", self.optimizer_lm)):
            api_base = getattr(lm, "kwargs", {}).get("api_base")
            server = next((s for s in self.servers if s.api_base == api_base), None)
            if server is not None:
                roles[role] = {"local": True, "model": str(server.config.model), "output_format": server.output_format,
                               "shares_prompter": server is self.server}
            else:
                roles[role] = {"local": False, "model": getattr(lm, "model", None)}
        return roles

    def _fingerprint(self, trainset, valset) -> dict[str, Any]:
        return {
            "config": result_settings(self.config),  # without its speed-only fields
            "base_model": self.server.model_path,
            "trainset": [example_id(ex, i) for i, ex in enumerate(trainset)],
            "valset": [example_id(ex, i) for i, ex in enumerate(valset or [])],
            "structured": self.structured,
            "output_format": self.output_format,
            # a role moved to another local model changes what is computed (absent when none
            # is, so that run folders of one-model compiles stay resumable)
            **({"role_models": {r: s.model_path for r, s in sorted(self.role_servers.items())}} if self.role_servers else {}),
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
            "output_format": self.output_format,
            "role_servers": {r: {"model": s.model_path, "output_format": s.output_format} for r, s in self.role_servers.items()},
            # an api_key/api_base given for the roles' LMs never lands in the run folder
            "lm_kwargs": {k: v for k, v in self.lm_kwargs.items() if not k.startswith("api_")},
        }
