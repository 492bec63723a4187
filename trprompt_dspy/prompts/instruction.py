"""Texts of the task-level instruction baseline (``baselines.textgrad_instruction``): the reward
search's role texts rewritten to describe ONE instruction for every question instead of a
textual reward (compare ``prompts/reward_search.py``)."""

INSTRUCTION_ROLE_DESCRIPTION = (
    "instruction given to a solver together with every question of a task (the same instruction "
    "for all questions); the solver follows it to answer. It must help on every question, so it "
    "must not mention any particular question or answer"
)
INSTRUCTION_FUNCTION_PURPOSE = (
    "For each question of a minibatch, the solver answers the question following the instruction; "
    "the answer is checked against the reference answer. The output reports the accuracy, the "
    "questions the solver got wrong (with the instruction, its answer and the reference answer) "
    "and the questions it got right."
)
INSTRUCTION_CONSTRAINTS = (
    "The improved variable is an instruction to a solver, such as 'Read the question carefully, ...'. "
    "It is not an answer.",
    "It must apply to every question: do not mention a particular question, number or answer.",
    "Keep it under {max_chars} characters.",
)
