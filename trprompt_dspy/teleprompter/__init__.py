"""``TRPromptTeleprompter``: the round loop (rollout, SFT, t* search, validation), its config and report."""

from .config import STAGES, TRPromptConfig
from .rounds import CompileError, ServerDiedError, rebalance_records
from .teleprompter import TRPromptTeleprompter

__all__ = ["STAGES", "CompileError", "ServerDiedError", "TRPromptConfig", "TRPromptTeleprompter", "rebalance_records"]
