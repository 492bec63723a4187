"""trprompt_dspy: TRPrompt (query-aware prompt optimization from textual rewards) for DSPy.

Public building blocks: the signatures (``GeneratePrompt``, ``CritiquePrompt``,
``SolveWithPrompt``), the modules (``QueryAwarePrompter``, ``TextualCritic``, ``Solver``,
``TRPromptProgram``), datasets (``trprompt_dspy.data``), answer checking
(``trprompt_dspy.metrics``) and local serving (``VLLMServer``, ``StructuredLM``).
"""

import importlib
import importlib.util
import os

# litellm (imported by dspy) fetches its model cost map from the network on import and waits
# ~6 s where there is none; the copy bundled with litellm is enough for us. Set it to "False"
# before importing this package to keep litellm's default.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Public names load on first use (PEP 562): importing the package, or the `trprompt` command
# for --help or an argument error, does not pay for torch, trl, peft and textgrad (~6 s).
_EXPORTS = {
    "EvaluationReport": ".infra.evaluation",
    "evaluate": ".infra.evaluation",
    "PromptGenerator": ".modules.predictor",
    "QueryAwarePrompter": ".modules.roles",
    "Solver": ".modules.roles",
    "TextualCritic": ".modules.roles",
    "TRPromptProgram": ".modules.program",
    "FinetuneConfig": ".finetune.config",
    "RolloutRecord": ".rollout.records",
    "finetune_prompter": ".finetune.trainer",
    "RewardSearchConfig": ".reward_search",
    "RewardSearchResult": ".reward_search",
    "search_reward": ".reward_search",
    "RolloutConfig": ".rollout.rollout",
    "run_rollout": ".rollout.rollout",
    "ServerConfig": ".infra.serving",
    "VLLMServer": ".infra.serving",
    "CritiquePrompt": ".prompts.signatures",
    "GeneratePrompt": ".prompts.signatures",
    "SolveWithPrompt": ".prompts.signatures",
    "SafeJSONAdapter": ".infra.structured",
    "StructuredLM": ".infra.structured",
    "StructuredPredict": ".infra.structured",
    "TRPromptConfig": ".teleprompter.config",
    "TRPromptTeleprompter": ".teleprompter.teleprompter",
    "TRPromptError": ".errors",
    "load_compiled": ".modules.compiled",
    "save_compiled": ".modules.compiled",
    "serve_prompters": ".modules.compiled",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value
    # submodules too, as when everything was imported eagerly: ``trprompt_dspy.data.load_dataset``
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)
