"""Every prompt text of the library: the signatures (their docstrings are the instructions), the
defaults (initial reward, CoT, numeric templates) and the TextGrad templates of the t* search."""
