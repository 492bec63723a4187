"""dspy.GEPA and dspy.MIPROv2 on the Solver's instruction (issue 15).

Through the real stack on the tiny model: each optimizer runs end to end, sends its proposer
what it is defined by (GEPA: the Solver's outputs with the feedback naming the reference answer)
and returns a program that answers every question. A random model answers every question wrong
under any instruction, so no candidate can win there; that the optimizers return the winning
instruction, and that it changes the predictions, is shown with a scripted LM that answers right
only under an instruction holding a keyword.
"""

import json

import dspy
import pytest
from dspy.clients.engines.dummy_engine import AsyncDummyEngine, DummyEngine
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.utils.dummies import DummyLM

from helpers import FITTING_LM_KWARGS
from trprompt_dspy.baselines import ZeroShot, feedback_metric, gepa_instruction, mipro_calls, mipro_instruction, mipro_trials
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.evaluation import evaluate
from trprompt_dspy.infra.structured import SafeJSONAdapter
from trprompt_dspy.metrics import gsm8k_metric
from trprompt_dspy.modules.roles import Solver
from trprompt_dspy.prompts.signatures import SolveWithPrompt

KEYWORD = "Check every unit before answering."


# ------------------------------------------------------------------ pure logic

def test_feedback_names_the_answer_given_and_the_reference():
    gold = dspy.Example(question="2+2?", answer="4").with_inputs("question")
    fb = feedback_metric(gsm8k_metric)
    right, wrong, empty = (fb(gold, dspy.Prediction(answer=a), None, None, None) for a in ("4", "5", ""))
    assert (right.score, wrong.score, empty.score) == (1.0, 0.0, 0.0)
    assert right.feedback.startswith("Correct") and "4" in right.feedback
    assert wrong.feedback == "Incorrect: the answer given was 5; the reference answer is 4."
    assert "no answer could be read" in empty.feedback and empty.feedback.endswith("reference answer is 4.")


@pytest.mark.parametrize("budget,n_val,mb", [(96, 16, 8), (40, 4, 8), (200, 32, 8), (20, 16, 8)])
def test_mipro_trials_spend_the_most_that_fits_the_budget(budget, n_val, mb):
    trials = mipro_trials(budget, n_val, mb)
    assert trials == 1 or mipro_calls(trials, n_val, mb) <= budget < mipro_calls(trials + 1, n_val, mb)
    # the count itself: 16 validation questions, minibatches of 8, a full validation after 5 trials and at the end
    assert mipro_calls(7, 16, 8) == 16 + 7 * 8 + 2 * 16 and mipro_calls(3, 4, 8) == 4 * 4


# ------------------------------------------------------------------ a scripted LM

class _Scripted(DummyEngine):
    def _complete_messages(self, messages):
        text = self.owner.respond(messages)
        return Response(id=None, model="dummy", message=Message.assistant([TextPart(text)]), finish_reason="stop",
                        usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


class ScriptedLM(DummyLM):
    """The Solver answers right only under an instruction holding :data:`KEYWORD`; a proposer
    (GEPA's raw reflection prompt, MIPROv2's instruction signature) always proposes it."""

    def __init__(self, answers: dict[str, str]):
        super().__init__({})
        self.gold = answers
        self._engine_spec = _Scripted(self)
        self._async_engine_spec = AsyncDummyEngine(self._engine_spec)

    def copy(self, **kwargs):  # DummyLM's copy builds its own engine again
        new = super().copy(**kwargs)
        new._engine_spec = _Scripted(new)
        new._async_engine_spec = AsyncDummyEngine(new._engine_spec)
        return new

    def respond(self, messages):
        system, last = messages[0]["content"], messages[-1]["content"]
        if "question" in system and "answer" in system and "proposed_instruction" not in system:
            question = next(q for q in self.gold if q in last)
            answer = self.gold[question] if KEYWORD in system else "-1"
            return self._format_answer_fields({"reasoning": "Worked it out.", "answer": answer})
        if "proposed_instruction" in system:  # MIPROv2's instruction proposal
            return self._format_answer_fields({"proposed_instruction": f"Solve the problem. {KEYWORD}"})
        assert "new_instruction" in system, system[:300]  # GEPA's reflection, under its JSONAdapter
        return json.dumps({"new_instruction": f"Solve the problem. {KEYWORD}"})


@pytest.fixture
def gsm8k(shared_data_dir):
    return load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=8)


def _accuracy(program, questions):
    return evaluate(program, questions, gsm8k_metric, num_threads=1, progress=False).accuracy


@pytest.mark.parametrize("optimizer", ["gepa", "mipro"])
def test_the_winning_instruction_is_returned_and_changes_the_answers(gsm8k, optimizer):
    lm = ScriptedLM({ex.question: ex.answer for ex in gsm8k})
    solver = Solver(lm=lm)
    train, val = gsm8k[:5], gsm8k[5:]
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        assert _accuracy(ZeroShot(solver), gsm8k) == 0.0
        if optimizer == "gepa":
            program = gepa_instruction(train, val, gsm8k_metric, reflection_lm=lm, solver=solver, max_metric_calls=30,
                                       num_threads=1)
        else:
            program = mipro_instruction(train, val, gsm8k_metric, prompt_lm=lm, solver=solver, num_trials=3,
                                        num_candidates=2, num_threads=1, data_aware_proposer=False,
                                        program_aware_proposer=False, tip_aware_proposer=False)
        instruction = program.solver.solve.signature.instructions
        assert KEYWORD in instruction and instruction != SolveWithPrompt.instructions
        assert _accuracy(program, gsm8k) == 1.0
        # the student is left as it was
        assert solver.solve.signature.instructions == SolveWithPrompt.instructions


# ------------------------------------------------------------------ the real stack, tiny model

@pytest.fixture
def fitting_lm(clean_adapters):
    lm = clean_adapters.lm(structured=True, **FITTING_LM_KWARGS)
    with dspy.context(lm=lm, adapter=SafeJSONAdapter()):
        yield lm


def _text(output) -> str:
    return output if isinstance(output, str) else output["text"]


def _answers_every_question(program, questions):
    report = evaluate(program, questions, gsm8k_metric, num_threads=4, progress=False)
    assert report.n == len(questions) and report.n_errors == 0, report.error_counts
    assert all(isinstance(row["prediction"]["answer"], str) for row in report.rows)


def test_gepa_reflects_on_the_feedback_and_answers_every_question(clean_adapters, fitting_lm, gsm8k):
    from dspy.teleprompt.gepa.instruction_proposal import ProposeInstruction

    reflection = clean_adapters.lm(structured=True, **FITTING_LM_KWARGS)
    train, val = gsm8k[:3], gsm8k[3:5]
    program = gepa_instruction(train, val, gsm8k_metric, reflection_lm=reflection, max_metric_calls=10,
                               num_threads=4)
    # GEPA reflected on a minibatch: its prompt held the Solver's outputs and the feedback naming
    # each question's reference answer, what TRPrompt's critic is shown
    assert reflection.history, "GEPA never called its reflection LM"
    call = reflection.history[0]
    prompt = "\n".join(m["content"] for m in call["messages"])
    assert "Incorrect: the answer given was" in prompt
    assert any(f"the reference answer is {ex.answer}." in prompt for ex in train)
    # ... in the reflection LM's own wire format, and its proposal was run by the Solver
    proposal = SafeJSONAdapter().parse(ProposeInstruction, _text(call["outputs"][0]))["new_instruction"].strip()
    assert proposal and proposal != SolveWithPrompt.instructions
    assert any(proposal in h["messages"][0]["content"] for h in fitting_lm.history)
    results = program.detailed_results
    # GEPA checks its budget between steps: a step (the parent and its child on a minibatch of 3,
    # the child on the valset if it wins) may run past it
    assert results.total_metric_calls <= 10 + 2 * 3 + len(val)
    chosen = program.solver.solve.signature.instructions
    assert chosen == results.candidates[results.best_idx].solver.solve.signature.instructions
    _answers_every_question(program, gsm8k[5:8])


def test_mipro_proposes_instructions_and_answers_every_question(clean_adapters, fitting_lm, gsm8k):
    from dspy.clients.base_lm import GLOBAL_HISTORY

    proposer = clean_adapters.lm(structured=True, **FITTING_LM_KWARGS)
    train, val = gsm8k[:3], gsm8k[3:5]
    before = len(GLOBAL_HISTORY)
    program = mipro_instruction(train, val, gsm8k_metric, prompt_lm=proposer, num_trials=2, num_candidates=2,
                                num_threads=4, data_aware_proposer=False, program_aware_proposer=False)
    # the proposer was asked for the Solver's instruction (through copies of it at its own
    # temperature: DSPy's global history holds their calls); the chosen one is the Solver's own or a proposal
    asked = [h for h in GLOBAL_HISTORY[before:] if "proposed_instruction" in h["messages"][0]["content"]]
    assert asked, "MIPROv2 never asked its proposer for an instruction"
    proposals = {json.loads(_text(h["outputs"][0]), strict=False)["proposed_instruction"].strip() for h in asked}
    chosen = program.solver.solve.signature.instructions
    assert chosen in proposals | {SolveWithPrompt.instructions}
    assert program.candidate_programs and all(0.0 <= c["score"] <= 100.0 for c in program.candidate_programs)
    _answers_every_question(program, gsm8k[5:8])


def test_mipro_with_more_full_validations_than_candidates_still_returns(shared_data_dir):
    # minibatches of 4 of 12 validation questions, 12 trials: 3 full validations of 2 asked-for
    # candidates, where dspy 3.4 alone raises "No valid program found in param_score_dict"
    questions = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=16)
    lm = ScriptedLM({ex.question: ex.answer for ex in questions})
    solver = Solver(lm=lm)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        program = mipro_instruction(questions[:4], questions[4:], gsm8k_metric, prompt_lm=lm, solver=solver,
                                    num_trials=12, num_candidates=2, minibatch_size=4, num_threads=1,
                                    data_aware_proposer=False, program_aware_proposer=False, tip_aware_proposer=False)
        assert KEYWORD in program.solver.solve.signature.instructions
        assert _accuracy(program, questions[4:]) == 1.0
