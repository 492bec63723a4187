"""``TRPromptTeleprompter``: the round loop (rollout, SFT, t* search, validation), its config and report."""
