"""``python -m trprompt_dspy`` runs the ``trprompt`` command."""

import sys

from .app.cli import main

sys.exit(main())
