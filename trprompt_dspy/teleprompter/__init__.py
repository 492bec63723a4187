"""``TRPromptTeleprompter``: the round loop (rollout, SFT, t* search, validation), its config and report."""

from .teleprompter import ServerDiedError, TRPromptConfig, TRPromptTeleprompter

__all__ = ["ServerDiedError", "TRPromptConfig", "TRPromptTeleprompter"]
