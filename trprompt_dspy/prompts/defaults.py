"""Every prompt text of the library that is not a signature docstring, in one place.

Signature instructions live in ``signatures.py`` (DSPy renders them); the texts here are the
defaults of config fields, so users change them through configuration, not by editing code.
"""

#: The textual reward the prompter is conditioned on before any training (round 0 of TRPrompt,
#: and the untrained-prompter baseline). It states what an ideal prompt achieves, in the voice
#: of the critic, so that it reads like the critiques the prompter is later trained on.
INITIAL_REWARD = (
    "The prompt is clear and specific to the question: it points out exactly what is asked and "
    "the quantities that matter, and lists the steps to compute the answer carefully. "
    "Following it, the solver reasoned step by step and reached the correct final answer."
)

#: The prompt of the zero-shot chain-of-thought baseline (Kojima et al. 2022).
ZERO_SHOT_COT_PROMPT = "Let's think step by step."

#: The reward text of the numeric-reward ablation (and of QPO-style return conditioning): the
#: prompter is conditioned on a score instead of a critique.
NUMERIC_REWARD_TEMPLATE = "Score of the solver's answer with this prompt: {score:.2f} out of 1.00."

#: How QPO's return is shown to its prompter (a return-to-go token in the original QPO); the
#: ``reward_template`` of the QPO baseline's rollouts (``baselines.QPOTeleprompter``).
QPO_REWARD_TEMPLATE = "Return-to-go (reward the prompt earns): {score:.2f}"
