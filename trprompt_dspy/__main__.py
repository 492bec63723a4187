"""``python -m trprompt_dspy`` runs the ``trprompt`` command."""

import sys

from .cli import main

sys.exit(main())
