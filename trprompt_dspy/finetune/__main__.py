"""``python -m trprompt_dspy.finetune``: LoRA SFT of a prompter on a records file."""

import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
