"""Checks shared by the settings dataclasses (``__post_init__``): one message per bad value,
naming the field, before any model starts."""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def int_problem(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> str | None:
    """Why ``value`` is not an int >= ``minimum`` (or None where allowed), or None if it is.

    ``True``/``False`` are refused: ``rounds=True`` is a mistake, not one round.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        return f"{name} must be {kind}{' or None' if allow_none else ''}, got {value!r}"
    return None


def check_ints(owner: Any, names: Iterable[str], *, minimum: int = 1, allow_none: bool = False,
               prefix: str = "") -> None:
    """Raise ``ValueError`` for the first of ``owner``'s fields ``names`` that fails :func:`int_problem`."""
    for name in names:
        problem = int_problem(prefix + name, getattr(owner, name), minimum=minimum, allow_none=allow_none)
        if problem:
            raise ValueError(problem)


def check_positive(owner: Any, names: Iterable[str], *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` for the first of ``owner``'s fields ``names`` that is not a number > 0
    (or None where allowed)."""
    for name in names:
        value = getattr(owner, name)
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0{' or None' if allow_none else ''}, got {value!r}")


def choice_problem(name: str, value: Any, choices: Sequence[str]) -> str | None:
    """Why ``value`` is not one of ``choices``, or None if it is."""
    if value in choices:
        return None
    listed = " or ".join(filter(None, [", ".join(map(repr, choices[:-1])), repr(choices[-1])]))
    return f"{name} must be {listed}, got {value!r}"


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    problem = choice_problem(name, value, choices)
    if problem:
        raise ValueError(problem)
