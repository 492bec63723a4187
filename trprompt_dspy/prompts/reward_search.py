"""Every prompt text and template of the optimal textual reward search, in one place.

The search (``trprompt_dspy.reward_search``) builds a small TextGrad graph::

    t* (the textual reward) --[forward: prompter -> solver -> metric on a minibatch]--> results
    results --[optional LLM evaluation]--> loss ;  loss.backward() -> gradient on t* ;  TGD -> t*'

TextGrad's own backward and optimizer prompts (``textgrad.autograd.*_prompts``,
``textgrad.optimizer.optimizer_prompts``) frame these texts; the ones here say what t* is, what
the forward pass did and what a good t* looks like. They are the defaults of
``RewardSearchConfig`` fields, so a user changes them through configuration.
"""

from __future__ import annotations

#: TextGrad's improved-variable tags: ``TextualGradientDescent``'s update prompt asks the optimizer
#: to write the new t* between them, and the proposal regex and parser look for them.
IMPROVED_VARIABLE_TAGS = ("<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>")

#: Role description of t*, the variable TextGrad optimizes. TextGrad shows it to the gradient and
#: optimizer LLMs, so it has to explain what the text is FOR: the prompter reads it as the
#: feedback its prompt should earn, it is never shown to the solver.
REWARD_ROLE_DESCRIPTION = (
    "textual reward: the reviewer feedback that a prompt-writing model (the prompter) is "
    "conditioned on. For every question the prompter writes a prompt that should deserve this "
    "feedback, and a solver answers the question with that prompt. The text describes, in the "
    "voice of a reviewer, what an ideal prompt did for the solver; it applies to all questions, "
    "so it must not mention any particular question or answer"
)

#: Purpose of the forward pass, as TextGrad's backward prompt describes the function that turned
#: t* into the minibatch results.
FORWARD_FUNCTION_PURPOSE = (
    "For each question of a minibatch, the prompter reads the question and the textual reward "
    "and writes a prompt; the solver answers the question following that prompt; the answer is "
    "checked against the reference answer. The output reports the accuracy, the questions the "
    "solver got wrong (with the prompt it was given, its answer and the reference answer) and "
    "the questions it got right."
)

#: Role description of the minibatch results (the output of the forward pass).
RESULTS_ROLE_DESCRIPTION = (
    "evaluation of the prompts written with the textual reward on a minibatch of questions: "
    "which questions the solver answered wrongly or correctly"
)

#: System prompt of the optional LLM evaluation (``RewardSearchConfig.llm_evaluation``): an LLM
#: reads the results and writes the loss text, TextGrad's ``TextLoss`` pattern.
EVALUATION_SYSTEM_PROMPT = (
    "You evaluate a prompt-writing system from its results on a set of questions. Read the "
    "failed and the correct questions, the prompts the solver was given and its answers. Say "
    "briefly which weaknesses of the prompts led to the wrong answers (missed quantities, wrong "
    "steps, vague instructions, ...) and what the prompts that worked did well. Do not solve "
    "the questions."
)

#: Layout of the results text (the forward output and the loss when ``llm_evaluation`` is off).
RESULTS_HEADER = "Accuracy: {n_correct} of {n} questions answered correctly ({accuracy:.0%})."
FAILED_HEADER = "Questions the solver got WRONG:"
SUCCEEDED_HEADER = "Questions the solver got RIGHT:"
FAILED_ITEM = (
    "[{index}] Question: {question}\n"
    "    Prompt written for it: {prompt}\n"
    "    Solver's answer: {answer} | Reference answer: {reference}"
)
SUCCEEDED_ITEM = (
    "[{index}] Question: {question}\n"
    "    Prompt written for it: {prompt}\n"
    "    Solver's answer: {answer}"
)
#: Shown in place of a prompt or answer when the LM's reply could not be parsed or the call failed.
ITEM_ERROR = "(no output: {error})"
#: Shown in place of the answer when the prompter failed, so the solver never ran.
NOT_REACHED = "(solver not run)"
#: Appended when the character budget cut the list short.
ITEMS_OMITTED = "({count} more not shown)"
NO_ITEMS = "(none)"

#: Constraints handed to TextGrad's optimizer (``TextualGradientDescent(constraints=...)``).
#: ``{max_chars}`` is filled with ``RewardSearchConfig.max_reward_chars``.
REWARD_CONSTRAINTS = (
    "The improved variable is feedback written by a reviewer about a prompt, such as "
    "'The prompt points out ... and the solver ...'. It is not a prompt and not an answer.",
    "It must apply to every question: do not mention a particular question, number or answer.",
    "Keep it under {max_chars} characters.",
)

#: Regex that vLLM's structured outputs enforce on the optimizer's reply, so that small models
#: emit the improved-variable tags. The content must start with a non-space, non-'<' character
#: (a reply of blank lines would be stripped to an empty reward), is one paragraph (no newline:
#: small models otherwise pad with blank lines, a token each, and run into the token cap before
#: the closing tag) and is bounded in length. Fields: ``start``/``end`` (the tags,
#: regex-escaped), ``preamble`` (characters allowed before the opening tag),
#: ``min_rest``/``max_rest`` (bounds of the content after its first character).
PROPOSAL_REGEX_TEMPLATE = r"[^<]{{0,{preamble}}}{start}[^<\s][^<\n]{{{min_rest},{max_rest}}}{end}"
