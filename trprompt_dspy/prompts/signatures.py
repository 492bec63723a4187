"""The three DSPy signatures of TRPrompt. Their docstrings are the instructions the LMs see.

The instructions are short, concrete and free of jargon so that a 135M model can follow them as
well as a large one; field descriptions say what goes in each field, not how to think.
"""

from __future__ import annotations

import dspy


class GeneratePrompt(dspy.Signature):
    """Write a prompt that will help a solver answer this specific question.

    The solver reads your prompt and then the question. Tailor the prompt to this question:
    say what is being asked, which quantities or ideas matter, which steps to take and which
    mistakes to avoid. Do not solve the question and do not give its answer.
    The textual reward describes the feedback a good prompt earns; write a prompt that
    deserves that feedback."""

    question: str = dspy.InputField(desc="The question the solver must answer.")
    textual_reward: str = dspy.InputField(
        desc="Feedback your prompt should earn from a reviewer who sees how the solver did."
    )
    prompt: str = dspy.OutputField(desc="Instructions for the solver, specific to this question.")


class CritiquePrompt(dspy.Signature):
    """Critique the PROMPT that was given to a solver together with a question.

    You see the question, the prompt, the solver's reasoning and answer, the reference answer,
    and whether the solver was correct. Judge the prompt, not the solver: say what in the prompt
    helped or misled the solver, what it missed, and how the prompt should change so that the
    solver answers this kind of question correctly. Be specific and brief. Do not repeat the
    reference answer."""

    question: str = dspy.InputField(desc="The question the solver had to answer.")
    prompt: str = dspy.InputField(desc="The prompt the solver was given.")
    solver_reasoning: str = dspy.InputField(desc="The solver's reasoning.")
    solver_answer: str = dspy.InputField(desc="The solver's final answer.")
    reference_answer: str = dspy.InputField(desc="The correct answer.")
    is_correct: bool = dspy.InputField(desc="Whether the solver's answer equals the reference answer.")
    critique: str = dspy.OutputField(desc="A critique of the prompt and how to improve it.")


class SolveWithPrompt(dspy.Signature):
    """Answer the question. Follow the guidance in the prompt.

    Reason step by step, then give only the final answer: a number or a math expression,
    without units or words."""

    question: str = dspy.InputField(desc="The question to answer.")
    prompt: str = dspy.InputField(desc="Guidance for answering this question.")
    reasoning: str = dspy.OutputField(desc="Step-by-step reasoning.")
    answer: str = dspy.OutputField(desc="The final answer only, e.g. 42 or \\frac{1}{2}.")
