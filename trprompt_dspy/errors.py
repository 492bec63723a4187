"""The base of every exception this library raises on purpose.

Each library exception also keeps the builtin base that describes it (``ValueError`` for bad
input, ``RuntimeError`` for a failed stage...), so ``except ValueError`` in a user's code keeps
working; ``except TRPromptError`` catches all of them, which is what the command line does to
turn any of them into one ``trprompt: error:`` line.
"""


class TRPromptError(Exception):
    """Base class of the library's exceptions."""
