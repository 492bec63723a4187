"""trprompt_dspy: TRPrompt (query-aware prompt optimization from textual rewards) for DSPy.

Public building blocks: the signatures (``GeneratePrompt``, ``CritiquePrompt``,
``SolveWithPrompt``), the modules (``QueryAwarePrompter``, ``TextualCritic``, ``Solver``,
``TRPromptProgram``), datasets (``trprompt_dspy.data``), answer checking
(``trprompt_dspy.metrics``) and local serving (``VLLMServer``, ``StructuredLM``).
"""

import os

# litellm (imported by dspy) fetches its model cost map from the network on import and waits
# ~6 s where there is none; the copy bundled with litellm is enough for us. Set it to "False"
# before importing this package to keep litellm's default.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from .evaluation import EvaluationReport, evaluate  # noqa: E402
from .modules import (  # noqa: E402
    PromptGenerator,
    QueryAwarePrompter,
    Solver,
    TextualCritic,
    TRPromptProgram,
)
from .finetune import FinetuneConfig, RolloutRecord, finetune_prompter  # noqa: E402
from .reward_search import RewardSearchConfig, RewardSearchResult, search_reward  # noqa: E402
from .rollout import RolloutConfig, run_rollout  # noqa: E402
from .serving import ServerConfig, VLLMServer  # noqa: E402
from .signatures import CritiquePrompt, GeneratePrompt, SolveWithPrompt  # noqa: E402
from .structured import SafeJSONAdapter, StructuredLM  # noqa: E402
from .teleprompter import TRPromptConfig, TRPromptTeleprompter  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CritiquePrompt",
    "EvaluationReport",
    "FinetuneConfig",
    "GeneratePrompt",
    "PromptGenerator",
    "QueryAwarePrompter",
    "RewardSearchConfig",
    "RewardSearchResult",
    "RolloutConfig",
    "RolloutRecord",
    "SafeJSONAdapter",
    "ServerConfig",
    "Solver",
    "SolveWithPrompt",
    "StructuredLM",
    "TextualCritic",
    "TRPromptConfig",
    "TRPromptProgram",
    "TRPromptTeleprompter",
    "VLLMServer",
    "evaluate",
    "finetune_prompter",
    "run_rollout",
    "search_reward",
]
