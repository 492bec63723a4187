"""Use a compiled TRPrompt prompter inside a DIFFERENT DSPy program.

The compiled prompter writes a prompt for each question; here it feeds a ``dspy.ChainOfThought``
solver followed by a self-verification step that retries once when the check fails.

    trprompt demo                                              # writes runs/demo-<time>/program
    python programs/drop_in_pipeline.py runs/demo-<time>/program "Tom has 3 apples and buys 2 more. How many?"
"""

import sys

import dspy

import trprompt_dspy as t


class SolveAndVerify(dspy.Module):
    def __init__(self, prompter: t.QueryAwarePrompter):
        super().__init__()
        self.prompter = prompter  # the compiled one: its reward t* and adapter travel with it
        self.solve = dspy.ChainOfThought("question, prompt -> answer")
        self.verify = dspy.Predict("question, answer -> answer_is_correct: bool")

    def forward(self, question: str) -> dspy.Prediction:
        prompt = self.prompter(question=question).prompt
        answer = self.solve(question=question, prompt=prompt).answer
        ok = self.verify(question=question, answer=answer).answer_is_correct
        if not ok:  # one retry with the same query-specific prompt, sampled
            answer = self.solve(question=question, prompt=prompt, config={"temperature": 0.7, "rollout_id": 1}).answer
        return dspy.Prediction(prompt=prompt, answer=answer, verified=ok)


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    folder, question = sys.argv[1], sys.argv[2]
    compiled = t.TRPromptProgram()
    compiled.load(folder)                          # JSON + safetensors, never a pickle
    pipeline = SolveAndVerify(compiled.prompter)
    server = t.serve_prompters(pipeline)             # starts vLLM on the adapter's base model, loads the adapter
    with server, dspy.context(lm=server.lm(structured=True, max_tokens=384), adapter=t.SafeJSONAdapter()):
        out = pipeline(question=question)
    print(f"prompt:   {out.prompt}\nanswer:   {out.answer}\nverified: {out.verified}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
