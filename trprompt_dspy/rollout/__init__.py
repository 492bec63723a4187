"""One pass of the prompter over a dataset: prompts -> answers -> scores -> critiques, as records."""
