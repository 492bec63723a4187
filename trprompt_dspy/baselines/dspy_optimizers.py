"""The optimizers a DSPy user would run instead of TRPrompt, on the same Solver, as DSPy ships them.

- :func:`gepa_instruction` -- ``dspy.GEPA`` (Agrawal et al. 2025, "GEPA: Reflective Prompt
  Evolution Can Outperform Reinforcement Learning"): a reflection LM reads the Solver's
  inputs, outputs and textual feedback on a minibatch and rewrites its instruction; candidates
  are kept on a Pareto front of validation scores.
- :func:`mipro_instruction` -- ``dspy.MIPROv2`` (Opsahl-Ong et al. 2024): a proposer LM drafts
  instruction candidates, and optuna's Bayesian search picks among them on validation minibatches.
  Instructions only by default (zero demos), so that it is compared as a prompt optimizer;
  ``demos > 0`` adds bootstrapped and labeled demos as its second variant.

Both optimize ONE task-level instruction (the Solver's signature instructions; its ``prompt`` input
stays empty, as in :class:`~trprompt_dspy.baselines.simple.ZeroShot`), in contrast with
TRPrompt's query-specific prompts. GEPA's feedback (:func:`feedback_metric`) is built from what
TRPrompt's critic reads: whether the answer is right, the answer given and the reference answer;
the question, prompt and reasoning reach GEPA's reflection LM through its own trace of the Solver.

GEPA's ``log_dir`` checkpoints are pickles, so none is written: like the COPRO baseline, a cell
that is resumed before its test is complete trains again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import dspy

from ..infra.structured import adapter_for
from ..metrics import _gold_answer, _predicted_answer
from ..modules.roles import Solver
from .simple import ZeroShot


def feedback_metric(metric: Callable[..., Any]) -> Callable[..., dspy.Prediction]:
    """GEPA's five-argument feedback metric over a right/wrong DSPy ``metric``.

    Returns ``dspy.Prediction(score, feedback)``: the metric's score, and a sentence holding what
    TRPrompt's critic is shown (correctness, the answer given, the reference answer).
    """

    def gepa_metric(gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None):
        score = float(metric(gold, pred))
        given, reference = _predicted_answer(pred), _gold_answer(gold)
        if given is None or not str(given).strip():
            feedback = f"Incorrect: no answer could be read from the reply. The reference answer is {reference}."
        elif score >= 1.0:
            feedback = f"Correct: the answer {given} matches the reference answer {reference}."
        else:
            feedback = f"Incorrect: the answer given was {given}; the reference answer is {reference}."
        return dspy.Prediction(score=score, feedback=feedback)

    gepa_metric.__name__ = f"feedback_{getattr(metric, '__name__', 'metric')}"
    return gepa_metric


def gepa_instruction(
    trainset: Sequence[dspy.Example],
    valset: Sequence[dspy.Example] | None,
    metric: Callable[..., Any],
    *,
    reflection_lm: Any,
    max_metric_calls: int,
    solver: Solver | None = None,
    reflection_minibatch_size: int = 3,
    num_threads: int = 16,
    seed: int = 0,
    **gepa_kwargs: Any,
) -> dspy.Module:
    """``dspy.GEPA`` on the Solver's instruction. Returns the optimized ``ZeroShot`` program.

    Args:
        trainset: questions GEPA reflects on (minibatches of ``reflection_minibatch_size``).
        valset: questions of its Pareto scores (None: the trainset, as GEPA does).
        metric: a right/wrong DSPy metric; GEPA gets :func:`feedback_metric` of it.
        reflection_lm: the LM that rewrites the instruction (TRPrompt's critic role); a
            :class:`~trprompt_dspy.infra.structured.StructuredLM` is asked in its own wire format.
        max_metric_calls: GEPA's budget: Solver runs scored, over every candidate.
        **gepa_kwargs: passed to ``dspy.GEPA`` (``use_merge``, ``candidate_selection_strategy``...).

    The returned program's ``detailed_results`` (a ``DspyGEPAResult``) holds every candidate and
    its validation scores.
    """
    if max_metric_calls < 1:
        raise ValueError(f"max_metric_calls must be >= 1, got {max_metric_calls}")
    # one instruction is optimized: merging two candidates' components has nothing to combine
    gepa_kwargs.setdefault("use_merge", False)
    if "instruction_proposer" not in gepa_kwargs and adapter_for(reflection_lm) is not None:
        # a local model served by this library answers in its own wire format (prose for the real
        # models); GEPA's proposer would otherwise ask it for JSON
        from dspy.teleprompt.gepa import InstructionProposer

        gepa_kwargs["instruction_proposer"] = InstructionProposer(adapter=adapter_for(reflection_lm))
    optimizer = dspy.GEPA(metric=feedback_metric(metric), max_metric_calls=max_metric_calls,
                          reflection_lm=reflection_lm, reflection_minibatch_size=reflection_minibatch_size,
                          num_threads=num_threads, seed=seed, track_stats=True, **gepa_kwargs)
    return optimizer.compile(ZeroShot(solver), trainset=list(trainset), valset=list(valset) if valset else None)


def _full_evals(trials: int, full_eval_steps: int) -> int:
    """Full validations MIPROv2 (dspy 3.4) makes with minibatches: every ``full_eval_steps`` trials and at the end."""
    return trials // full_eval_steps + (1 if trials % full_eval_steps else 0)


def mipro_calls(trials: int, n_val: int, minibatch_size: int, full_eval_steps: int = 5) -> int:
    """Solver runs of MIPROv2 (dspy 3.4) with ``trials`` trials: the default program on the whole
    valset, then per trial a minibatch, and a full validation every ``full_eval_steps`` trials and
    at the end (with ``minibatch_size >= n_val`` every trial is one full validation)."""
    if minibatch_size >= n_val:
        return n_val * (1 + trials)
    return n_val + trials * minibatch_size + _full_evals(trials, full_eval_steps) * n_val


def mipro_trials(budget: int, n_val: int, minibatch_size: int, full_eval_steps: int = 5) -> int:
    """The most MIPROv2 trials whose Solver runs (:func:`mipro_calls`) fit ``budget``; at least 1."""
    trials = 1
    while mipro_calls(trials + 1, n_val, minibatch_size, full_eval_steps) <= budget:
        trials += 1
    return trials


def mipro_instruction(
    trainset: Sequence[dspy.Example],
    valset: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    prompt_lm: Any,
    num_trials: int,
    solver: Solver | None = None,
    num_candidates: int = 4,
    demos: int = 0,
    minibatch_size: int = 8,
    full_eval_steps: int = 5,
    num_threads: int = 16,
    seed: int = 0,
    **compile_kwargs: Any,
) -> dspy.Module:
    """``dspy.MIPROv2`` on the Solver's instruction. Returns the optimized ``ZeroShot`` program.

    Args:
        prompt_lm: the LM that proposes instructions (TRPrompt's optimizer role).
        num_trials: optuna trials (:func:`mipro_trials` turns a budget of Solver runs into trials).
        num_candidates: instruction candidates proposed (raised to one more than the full
            validations the trials make: dspy 3.4 fails when every candidate was fully validated).
        demos: bootstrapped and labeled demos (0: instructions only).
        minibatch_size: validation questions per trial (the whole valset when it is smaller).
        **compile_kwargs: passed to ``MIPROv2.compile`` (``data_aware_proposer``...).

    With a :class:`~trprompt_dspy.infra.structured.StructuredLM` proposer whose wire format the
    Solver's LM shares, the run uses that format's adapter (unless one is configured already).
    Needs optuna (``pip install 'trprompt-dspy[baselines]'``).
    """
    try:
        import optuna  # noqa: F401  (MIPROv2 imports it lazily, deep inside compile)
    except ImportError:
        raise ImportError("MIPROv2 needs optuna: pip install 'trprompt-dspy[baselines]'") from None
    from dspy.teleprompt import MIPROv2

    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    valset = list(valset)
    minibatch = len(valset) > minibatch_size
    # each full validation takes a candidate not fully validated yet; dspy 3.4 raises "No valid
    # program found in param_score_dict" once none is left (seen on the 0.5B model: 4 candidates,
    # 25 trials, 6 full validations), so there are at least as many candidates as full validations
    if minibatch:
        num_candidates = max(num_candidates, _full_evals(num_trials, full_eval_steps) + 1)
    # MIPROv2's proposer is a plain dspy.Predict: under DSPy's default ChatAdapter a local model
    # served in its own wire format rarely writes a reply that parses. Its adapter is configured
    # for the whole run when the Solver's LM speaks the same format (else the Solver keeps its own).
    adapter = adapter_for(prompt_lm) if dspy.settings.adapter is None else None
    solver_lm = (solver.solve.lm if solver is not None else None) or dspy.settings.lm
    if adapter is not None and type(adapter_for(solver_lm)) is not type(adapter):
        adapter = None
    optimizer = MIPROv2(metric=metric, prompt_model=prompt_lm, task_model=solver_lm, auto=None, num_candidates=num_candidates,
                        max_bootstrapped_demos=demos, max_labeled_demos=demos, num_threads=num_threads,
                        seed=seed, verbose=False, track_stats=True)
    with dspy.context(adapter=adapter) if adapter is not None else contextlib.nullcontext():
        return optimizer.compile(ZeroShot(solver), trainset=list(trainset), valset=valset, num_trials=num_trials,
                                 minibatch=minibatch, minibatch_size=min(minibatch_size, len(valset)),
                                 minibatch_full_eval_steps=full_eval_steps, **compile_kwargs)
