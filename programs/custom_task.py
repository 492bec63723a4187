"""Your own task: a JSONL dataset, your own metric, and a task with no numeric answer.

Two parts:
1. ``--file my.jsonl`` with ``question`` and ``answer`` fields and a numeric metric (any
   function ``metric(example, prediction) -> bool``), as for math.
2. Without ``--file``: a non-math task (rewrite a blunt message politely, keeping its facts),
   scored by an LLM judge -- the paper's open question 2 (tasks without a numeric reward). The
   judge is a DSPy module on the local model; with a small model it is a weak judge, which is a
   fact of this set-up, not hidden: read the critiques in ``runs/custom-task/round_1/records.jsonl``.

    python programs/custom_task.py                       # the judged task, embedded model, small sizes
    python programs/custom_task.py --file my.jsonl       # your JSONL, numeric answers
"""

import argparse
import json
import tempfile
from pathlib import Path

import dspy

import trprompt_dspy as t
from trprompt_dspy.structured import SafeJSONAdapter
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


judge = dspy.Predict(Judge)


def judged_metric(example, prediction, trace=None) -> bool:
    """LLM judge plus a check no judge can talk its way around: the key fact is still there."""
    text = str(getattr(prediction, "answer", ""))
    if example.answer.lower() not in text.lower():
        return False
    return bool(judge(original=example.question, key_fact=example.answer, rewritten=text).acceptable)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", default=None, help="JSONL with question and answer (numeric answers)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    if args.file:
        examples, metric, program = load_file(args.file), gsm8k_metric, t.TRPromptProgram()
    else:
        path = Path(tempfile.mkdtemp()) / "polite.jsonl"
        path.write_text("".join(json.dumps({"id": f"p{i}", "question": q, "answer": a}) + "\n"
                                for i, (q, a) in enumerate(BLUNT)))
        examples, metric = load_file(path), judged_metric
        program = t.TRPromptProgram(solver=t.Solver(signature=Rewrite))
    train, val = split_examples(examples, [len(examples) - 4, 4], seed=0)
    config = t.TRPromptConfig(rounds=args.rounds, rollout=t.RolloutConfig(n_samples=2),
                              search=t.RewardSearchConfig(steps=1, num_candidates=2, minibatch_size=4))
    with t.VLLMServer(model="default") as server:
        lm = server.lm(structured=True, max_tokens=384)
        judge.set_lm(lm)  # the judge runs on the local model too
        tele = t.TRPromptTeleprompter(server=server, metric=metric, config=config, log_dir="runs/custom-task")
        compiled = tele.compile(program, trainset=train, valset=val)
        with dspy.context(lm=lm, adapter=SafeJSONAdapter()):
            for ex in val[:2]:
                out = compiled(question=ex.question)
                print(f"{ex.question!r}\n  prompt: {out.prompt!r}\n  rewrite: {out.answer!r}")
    print("report: runs/custom-task/report.json")


if __name__ == "__main__":
    main()
