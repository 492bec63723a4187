"""DSPy modules of TRPrompt: the prompter's predictor, the three roles, the default program and
the on-disk format of a compiled program."""
