"""Your own task: a JSONL dataset, your own metric, and a task with no numeric answer.

Two parts:
1. ``--file my.jsonl`` with ``question`` and ``answer`` fields and a numeric metric (any
   function ``metric(example, prediction) -> bool``), as for math.
2. Without ``--file``: a non-math task (rewrite a blunt message politely, keeping its facts),
   scored by an LLM judge -- the paper's open question 2 (tasks without a numeric reward). The
   judge is a DSPy module on the local model; with a small model it is a weak judge, which is a
   fact of this set-up, not hidden: read the critiques in ``runs/custom-task/round_1/records.jsonl``.

   ``polite_task`` and ``compile_task`` are importable (``tests/test_programs.py`` runs them on
   the tiny test model).

    python programs/custom_task.py                       # the judged task, embedded model, small sizes
    python programs/custom_task.py --file my.jsonl       # your JSONL, numeric answers
"""

import argparse
import json
import tempfile
from pathlib import Path

import dspy

import trprompt_dspy as t
from trprompt_dspy.data import load_file, split_examples
from trprompt_dspy.metrics import gsm8k_metric

# written for this example (not taken from any dataset)
BLUNT = [
    ("Send me the report now.", "the report"), ("Your code broke the build again.", "the build"),
    ("The meeting moved to 3pm, don't be late.", "3pm"), ("You forgot to pay the invoice.", "the invoice"),
    ("Fix the login page today.", "the login page"), ("Your slides have typos.", "the slides"),
    ("I need the keys back by Friday.", "Friday"), ("Stop parking in my spot.", "parking spot"),
    ("The printer is out of paper, refill it.", "paper"), ("Answer my email.", "the email"),
    ("Your dog barks all night.", "the dog"), ("Return the book you borrowed.", "the book"),
]


class Rewrite(dspy.Signature):
    """Rewrite the message so it is polite and friendly, keeping every fact in it.
    Follow the guidance in the prompt."""

    question: str = dspy.InputField(desc="The blunt message.")
    prompt: str = dspy.InputField(desc="Guidance for this message.")
    reasoning: str = dspy.OutputField(desc="What to change and what to keep.")
    answer: str = dspy.OutputField(desc="The polite message.")


class Judge(dspy.Signature):
    """Is the rewritten message polite, and does it keep the key fact?"""

    original: str = dspy.InputField()
    key_fact: str = dspy.InputField()
    rewritten: str = dspy.InputField()
    acceptable: bool = dspy.OutputField()


judge = t.StructuredPredict(Judge)  # dspy.Predict that sends its JSON schema to a local StructuredLM


def judged_metric(example, prediction, trace=None) -> bool:
    """LLM judge plus a check no judge can talk its way around: the key fact is still there."""
    text = str(getattr(prediction, "answer", ""))
    if example.answer.lower() not in text.lower():
        return False
    return bool(judge(original=example.question, key_fact=example.answer, rewritten=text).acceptable)


def polite_task() -> tuple[list[dspy.Example], object, t.TRPromptProgram]:
    """The judged task: (examples, metric, program whose solver rewrites instead of solving)."""
    path = Path(tempfile.mkdtemp()) / "polite.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": q, "answer": a}) + "\n"
                            for i, (q, a) in enumerate(BLUNT)))
    return load_file(path), judged_metric, t.TRPromptProgram(solver=t.Solver(signature=Rewrite))


def compile_task(server, examples, metric, program, *, log_dir, rounds=1, config=None, lm_kwargs=None):
    """Compile on all but 4 examples, validate on those 4; returns (compiled, validation examples).
    ``config`` replaces the small default sizes (and ``rounds``) as a whole."""
    train, val = split_examples(examples, [len(examples) - 4, 4], seed=0)
    config = config or t.TRPromptConfig(rounds=rounds, rollout=t.RolloutConfig(n_samples=2),
                                        search=t.RewardSearchConfig(steps=1, num_candidates=2, minibatch_size=4))
    judge.set_lm(server.lm(structured=True, **(lm_kwargs or {"max_tokens": 384})))  # the judge is local too
    tele = t.TRPromptTeleprompter(server=server, metric=metric, config=config, log_dir=log_dir, lm_kwargs=lm_kwargs)
    return tele.compile(program, trainset=train, valset=val), val


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", default=None, help="JSONL with question and answer (numeric answers)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default="default", help="'default' (embedded), a model folder or a hub id")
    parser.add_argument("--log-dir", default="runs/custom-task")
    args = parser.parse_args()

    if args.file:
        examples, metric, program = load_file(args.file), gsm8k_metric, t.TRPromptProgram()
    else:
        examples, metric, program = polite_task()
    with t.VLLMServer(model=args.model) as server:
        compiled, val = compile_task(server, examples, metric, program, log_dir=args.log_dir, rounds=args.rounds)
        for ex in val[:2]:  # the compiled roles pick their JSON adapter by themselves
            out = compiled(question=ex.question)
            print(f"{ex.question!r}\n  prompt: {out.prompt!r}\n  rewrite: {out.answer!r}")
    print(f"report: {args.log_dir}/report.json")


if __name__ == "__main__":
    main()
