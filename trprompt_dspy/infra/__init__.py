"""What the method runs on and knows nothing of the method: serving, structured outputs, adapter
folders, embedded models, evaluation, scoring, parallel work, usage, run folders, checks."""
