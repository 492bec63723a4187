"""QPO (Kong et al., "QPO: Query-dependent Prompt Optimization via Multi-Loop Offline
Reinforcement Learning", TMLR 2025), re-implemented on this library's stack.

What is the same as the paper: a prompt policy (the prompter) is fine-tuned on offline
(query, prompt, reward) data, conditioned on the reward; at inference it is queried with the
highest return; several loops each sample new prompts from the current policy at that return,
score them on the target model and add them to the data before training again.

What follows the original (KongYilun/QPO, ``step1_train.py``, ``model/pgdt.py``,
``step3_collect.py``, ``step4_merge_dataset.py``):

- **The return** a (query, prompt) record is trained under is QPO's: ``10 x correct(query,
  prompt) + 10 x the mean accuracy of the prompts of its collection batch`` (here: the round's
  rollouts), in [0, 20] (``TRPromptConfig(numeric_return="qpo")``,
  :func:`~trprompt_dspy.rollout.rollout.qpo_returns`).
- **Collection at the highest return**: every loop samples its prompts conditioned on the
  highest return (20; the original's ``--expected_rtg`` at the top of its scale), and the
  compiled policy is queried with it.
- **Multi-loop training continues** the previous loop's model (``continue_training=True``: each
  loop's LoRA adapter starts from the last one) on all data so far, old and new
  (``train_on_all_rounds=True``); a loop's repeated (query, prompt) rows are kept once.

What differs (name it "QPO (re-impl.)" in tables):

- The policy is the same prompter model TRPrompt fine-tunes (LoRA SFT with peft + trl), not
  GPT-2 with full fine-tuning; the return is written as text in the prompter's input
  (:data:`QPO_REWARD_TEMPLATE`) instead of a linear return embedding, and the original's
  return-prediction head and its MSE loss are not used (in ``pgdt.py`` that head reads position 0,
  which under causal attention sees only the return token itself).
- The return leaves out the original's perplexity term (minus the target's mean negative
  log-probability of the gold answer): the target's log-probabilities are not collected through
  DSPy's calls here. Nor is the original's filter of rows below a per-task minimum return applied:
  its thresholds (``data/config.json``) are not in the public repository.
- The offline data of the first loop are the base prompter's own rollouts conditioned on the
  highest return (as in the TRPrompt paper's comparison), not prompts collected from other
  methods (APE, ChatGPT rewrites, RLPrompt...).
- Loops sample ``rollout.n_samples`` prompts for each training question, not 10 batches of 100
  queries drawn from a separate collection split; sampling is the rollout's temperature, not
  top-k 2 / top-p 0.9.

The numeric-reward ablation of TRPrompt (``TRPromptConfig(reward="numeric")``: the record's own
score, a fresh adapter each round) is a different method and is reported as its own row.
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
            ``reward`` is forced to ``"numeric"`` with QPO's return, ``rounds`` to ``loops``, and
            each loop continues the last one's adapter on all data so far.
        **kwargs: as :class:`TRPromptTeleprompter` (``server``, ``metric`` (required),
            ``log_dir``...).
    """

    def __init__(self, *, loops: int = 2, config: TRPromptConfig | None = None, **kwargs: Any):
        base = config or TRPromptConfig()
        config = dataclasses.replace(base, rounds=loops, reward="numeric", update_reward=True,
                                     train_on_all_rounds=True, continue_training=True, numeric_return="qpo")
        config.rollout = dataclasses.replace(config.rollout, reward="numeric", reward_template=QPO_REWARD_TEMPLATE)
        super().__init__(config=config, **kwargs)
