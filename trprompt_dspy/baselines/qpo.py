"""QPO (Kong et al., "QPO: Query-dependent Prompt Optimization via Multi-Loop Offline
Reinforcement Learning", TMLR 2025), re-implemented on this library's stack.

What is the same as the paper: a prompt policy (the prompter) is fine-tuned on offline
(query, prompt, reward) data, conditioned on the reward; at inference it is queried with the
highest return; several loops each sample new prompts from the current policy at that return,
score them on the target model and add them to the data before training again.

How this re-implementation differs (name it "QPO (re-impl.)" in tables):

- The policy is the same prompter model TRPrompt fine-tunes (LoRA SFT with peft + trl), not
  GPT-2 with full fine-tuning.
- The return is written as text in the prompter's input (:data:`QPO_REWARD_TEMPLATE`) and learned
  by SFT; the original's return-to-go regression head and loss are not used.
- The offline data of the first loop are the base prompter's own rollouts conditioned on the
  highest return (as in the TRPrompt paper's comparison), not prompts collected from other
  methods; the reward of a prompt is the metric's score of the target's answer on that query.
- With a single score per (query, prompt) it coincides with TRPrompt's numeric-reward ablation
  (``TRPromptConfig(reward="numeric")``) up to the reward's wording; both are reported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..prompts.defaults import QPO_REWARD_TEMPLATE
from ..teleprompter import TRPromptConfig, TRPromptTeleprompter


class QPOTeleprompter(TRPromptTeleprompter):
    """QPO on this library's stack: ``compile(student, trainset=..., valset=...)`` as TRPrompt.

    Args:
        loops: QPO's loops (each: collect prompts at the highest return, score, add, retrain).
        config: a ``TRPromptConfig`` for the sizes (rollout samples, SFT, validation); its
            ``reward`` is forced to ``"numeric"`` and ``rounds`` to ``loops``.
        **kwargs: as :class:`TRPromptTeleprompter` (``server``, ``metric`` (required),
            ``log_dir``...).
    """

    def __init__(self, *, loops: int = 2, config: TRPromptConfig | None = None, **kwargs: Any):
        base = config or TRPromptConfig()
        config = dataclasses.replace(base, rounds=loops, reward="numeric", update_reward=True,
                                     train_on_all_rounds=True)
        config.rollout = dataclasses.replace(config.rollout, reward="numeric", reward_template=QPO_REWARD_TEMPLATE)
        super().__init__(config=config, **kwargs)
