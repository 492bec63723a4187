"""TRPrompt with the solver, critic and TextGrad optimizer on API models (through litellm).

The prompter is always a local model (it is fine-tuned with LoRA and served by vLLM); the other
roles can be any model litellm reaches. Runs only when a key is present:

    OPENAI_API_KEY=... python programs/api_models.py --data-dir ../shared/data
    TRPROMPT_API_MODEL=anthropic/claude-3-5-haiku-latest ANTHROPIC_API_KEY=... python programs/api_models.py

Costs: the report's ``usage.roles`` gives calls, tokens and USD cost per role (litellm prices).
"""

import argparse
import os
import sys

import dspy

import trprompt_dspy as t
from trprompt_dspy.data import train_val_test
from trprompt_dspy.metrics import gsm8k_metric


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default=os.environ.get("TRPROMPT_API_MODEL", "openai/gpt-4o-mini"))
    args = parser.parse_args()

    import litellm

    check = litellm.validate_environment(model=args.model)
    if not check.get("keys_in_environment"):
        print(f"api_models.py: {args.model} needs {', '.join(check.get('missing_keys') or ['an API key'])}; "
              "set it and run again (nothing was run).")
        return 0

    # API calls are retried by DSPy with exponential backoff (num_retries) on 429/5xx
    api = dspy.LM(args.model, max_tokens=512, temperature=0.0, num_retries=5)
    train, val, test = train_val_test("gsm8k", 32, 16, 50, data_dir=args.data_dir)
    with t.VLLMServer(model="default") as server:
        tele = t.TRPromptTeleprompter(
            server=server, metric=gsm8k_metric, target_lm=api, critic_lm=api, optimizer_lm=api,
            config=t.TRPromptConfig(rounds=2), log_dir="runs/api-models",
        )
        compiled = tele.compile(t.TRPromptProgram(), trainset=train, valset=val)
        compiled.save("runs/api-models/program")   # no API key is written: LMs are saved by name only
        with dspy.context(adapter=t.SafeJSONAdapter()):
            report = t.evaluate(compiled, test, gsm8k_metric)
    print(f"GSM8K test, {report.n} questions, solver {args.model}: {report.accuracy:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
