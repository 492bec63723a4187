"""Compile the default TRPrompt program on GSM8K and evaluate it, in a dozen library calls.

    python programs/gsm8k.py --data-dir ../shared/data        # small sizes: about an hour on 2 CPU cores

On a GPU box pass --model with a bigger instruct model (e.g. Qwen/Qwen2.5-7B-Instruct) and raise the sizes.
"""

import argparse

import trprompt_dspy as t
from trprompt_dspy.data import train_val_test
from trprompt_dspy.metrics import gsm8k_metric

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", default=None)
parser.add_argument("--model", default="default")
parser.add_argument("--train", type=int, default=32)
parser.add_argument("--test", type=int, default=50)
args = parser.parse_args()

train, val, test = train_val_test("gsm8k", args.train, 16, args.test, data_dir=args.data_dir)
with t.VLLMServer(model=args.model) as server:
    tele = t.TRPromptTeleprompter(server=server, metric=gsm8k_metric, log_dir="runs/gsm8k",
                                  config=t.TRPromptConfig(rounds=2))
    compiled = tele.compile(t.TRPromptProgram(), trainset=train, valset=val)   # resumable: same log_dir
    compiled.save("runs/gsm8k/program")
    report = t.evaluate(compiled, test, gsm8k_metric)   # local roles pick the JSON adapter by themselves
print(f"GSM8K test, first {report.n} questions: {report.accuracy:.1%} ({report.n_correct}/{report.n}), 1 run")
print("t*:", compiled.prompter.reward)
