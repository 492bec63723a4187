"""``TRPromptConfig``: the settings of a TRPrompt compile, and the names of a round's stages.

Fields declared with :func:`~trprompt_dspy.infra.settings.speed_only` change how fast a compile
goes, not what it computes: they are left out of the run folder's fingerprint, so a run may be
resumed with other values (see ``infra/settings.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..finetune import FinetuneConfig
from ..infra.budget import Budget
from ..infra.checks import check_choice, check_ints, check_positive
from ..infra.settings import speed_only
from ..infra.tracking import TRACKERS
from ..prompts.defaults import INITIAL_REWARD
from ..reward_search import RewardSearchConfig
from ..rollout.rollout import RolloutConfig

#: the stages of one round, in the order they run (the report and the plot use this order)
STAGES = ("rollout", "finetune", "reward_search", "validation")


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
        continue_training: each round's SFT continues the previous round's adapter (QPO's
            multi-loop training) instead of a fresh adapter on the base model (False, STaR's
            choice; see ``FinetuneConfig.init_from``). Round 1 starts from the base model.
        numeric_return: with ``reward="numeric"``, the number a record is trained on:
            ``"score"`` (the metric's score of that answer, the paper's numeric ablation) or
            ``"qpo"`` (QPO's return: 10 x the answer's score + 10 x the mean score of the
            round's rollouts, in [0, 20]; prompts are then collected and used at the highest
            return, 20; repeated (question, prompt) records of a round are trained on once).
        rollout: :class:`RolloutConfig` (samples per question, temperature, threads).
        finetune: :class:`FinetuneConfig` (LoRA rank, steps, learning rate...).
        search: :class:`RewardSearchConfig` (steps, candidates, minibatch...).
        validate_initial: also validate the untrained prompter with the initial reward
            ("round 0"), the baseline each round is compared with.
        select_round: which round ``compile`` returns: ``"best"`` (the highest validation
            accuracy; on a tie the later round; round 0, the untrained prompter, only when it is
            strictly best) or ``"last"``. Without a valset the last round. Every round is
            recorded in the report either way.
        search_heldout: where the questions that every t* candidate is also scored on come
            from, kept out of rollouts and SFT so that a t* that only recalls the prompts the
            adapter was just trained on does not win (candidates are ranked on them first, then
            on the minibatch, and must not do worse on either): ``"valset"`` (the first
            ``search_heldout_size`` validation questions; without a valset the search falls
            back to ``"none"`` with a warning), ``"trainset"`` (``search_heldout_size`` training
            questions drawn with ``seed`` and never rolled out), or ``"none"`` (the paper: t* is
            chosen on training questions only; ``search.heldout_size`` then applies).
        answer_leaks: ``"drop"`` leaves out of SFT every record whose prompt writes the gold
            answer (a number not in the question: ``metrics.answer_in_text``), so that the
            prompter is not taught to solve inside the prompt; ``"keep"`` trains on them. The
            rate is in each round's rollout summary (``answer_in_prompt_rate``) either way.
        reward_chars_from_critiques: cap t* proposals (``search.max_reward_chars``) at the
            longest critique the round's adapter was trained on, so that t* stays within what
            the prompter saw as a reward; False keeps the search's own cap.
        search_heldout_size: how many held-out questions (``"valset"``: 0 means all of them).
        val_num_threads: threads of the validation pass (speed only).
        seed: the compile's seed: rebalancing, the rollout's samples (``rollout.seed``) and the
            search's minibatches and proposals (``search.seed``) follow it unless those are set
            to a non-zero seed of their own.
        progress: progress bars (speed only).
        max_server_restarts: how many times the local vLLM server may be restarted when it dies
            during a compile (the interrupted stage runs again and keeps its completed work);
            one more death stops the compile with a clear error and a resumable run folder.
            API roles are retried by DSPy itself (``num_retries`` in ``lm_kwargs`` / your LMs).
            Speed only: a resumed run may allow more or fewer restarts.
        max_lm_calls: stop the compile once this many LM calls (every role; cache hits are
            not calls) were made; None: no cap.
        max_cost_usd: stop once the priced (API) calls cost this many dollars (litellm's price
            map; local models are unpriced and never count); None: no cap.
        max_wall_s: stop once the compile has run this many seconds; None: no cap.
            At a cap (``infra/budget.py``) no new LM call starts, calls in flight finish and are
            kept (so ``max_lm_calls`` may be passed by up to one item per thread), the compile
            returns the best round completed so far and the report's ``stopped_by`` names the
            cap. Caps count from the start of one ``compile`` call; compiling again with the
            same ``log_dir`` and a larger (or no) cap goes on where it stopped. Speed only.
        track: ``"mlflow"`` logs the compile to MLflow (``infra/tracking.py``: settings, per-round
            metrics, t*, the report and the compiled program; needs the ``track`` extra); None:
            no tracking. Speed only.
        track_uri: the MLflow tracking URI; None: ``MLFLOW_TRACKING_URI`` if set, else a SQLite
            store in the run folder (``sqlite:///<log_dir>/mlflow.db``). Speed only.
    """

    rounds: int = 2
    initial_reward: str = INITIAL_REWARD
    update_reward: bool = True
    reward: str = "textual"
    rebalance: str = "none"
    train_on_all_rounds: bool = True
    continue_training: bool = False
    numeric_return: str = "score"
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    search: RewardSearchConfig = dataclasses.field(default_factory=RewardSearchConfig)
    validate_initial: bool = True
    select_round: str = "best"
    answer_leaks: str = "drop"
    reward_chars_from_critiques: bool = True
    search_heldout: str = "valset"
    search_heldout_size: int = 16
    val_num_threads: int = speed_only(default=16)
    seed: int = 0
    progress: bool = speed_only(default=True)
    max_server_restarts: int = speed_only(default=2)
    max_lm_calls: int | None = speed_only(default=None)
    max_cost_usd: float | None = speed_only(default=None)
    max_wall_s: float | None = speed_only(default=None)
    track: str | None = speed_only(default=None)
    track_uri: str | None = speed_only(default=None)

    def __post_init__(self) -> None:
        check_ints(self, ("rounds",))
        check_ints(self, ("max_server_restarts", "search_heldout_size"), minimum=0)
        check_ints(self, ("max_lm_calls",), allow_none=True)
        check_positive(self, ("max_cost_usd", "max_wall_s"), allow_none=True)
        check_choice("reward", self.reward, ("textual", "numeric"))
        check_choice("rebalance", self.rebalance, ("none", "balance"))
        check_choice("numeric_return", self.numeric_return, ("score", "qpo"))
        check_choice("select_round", self.select_round, ("best", "last"))
        check_choice("answer_leaks", self.answer_leaks, ("drop", "keep"))
        if self.track is not None:
            check_choice("track", self.track, TRACKERS)
        check_choice("search_heldout", self.search_heldout, ("valset", "trainset", "none"))
        if self.search_heldout == "trainset" and not self.search_heldout_size:
            raise ValueError("search_heldout='trainset' needs search_heldout_size >= 1")
        if self.rollout.reward != self.reward:
            self.rollout = dataclasses.replace(self.rollout, reward=self.reward)
        if self.seed and not self.rollout.seed:
            self.rollout = dataclasses.replace(self.rollout, seed=self.seed)
        if self.seed and not self.search.seed:
            self.search = dataclasses.replace(self.search, seed=self.seed)

    def budget(self, meter: Any) -> Budget:
        """The compile's :class:`~trprompt_dspy.infra.budget.Budget` over ``meter``, starting now."""
        return Budget(meter, max_lm_calls=self.max_lm_calls, max_cost_usd=self.max_cost_usd, max_wall_s=self.max_wall_s)

    def to_dict(self) -> dict[str, Any]:
        """Every setting (speed-only ones too) as plain data, as written to ``config.json``."""
        return dataclasses.asdict(self)

