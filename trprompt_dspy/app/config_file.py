"""A :class:`TRPromptConfig` from a TOML or YAML file (or a dict), checked before any model starts.

The file's top-level keys are ``TRPromptConfig`` fields; the tables ``[rollout]``, ``[finetune]``
and ``[search]`` set the fields of ``RolloutConfig``, ``FinetuneConfig`` and
``RewardSearchConfig``::

    rounds = 2
    rebalance = "balance"

    [rollout]
    n_samples = 4

    [finetune]
    lora_r = 16
    max_steps = 20

    [search]
    steps = 3
    minibatch_size = 16

Unknown keys, values of the wrong type and out-of-range values each raise one
:class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from ..errors import TRPromptError
from ..finetune import FinetuneConfig
from ..reward_search import RewardSearchConfig
from ..rollout.rollout import RolloutConfig
from ..teleprompter import TRPromptConfig

_SECTIONS: dict[str, type] = {"rollout": RolloutConfig, "finetune": FinetuneConfig, "search": RewardSearchConfig}


class ConfigError(TRPromptError, ValueError):
    """A config file or dict that cannot become a ``TRPromptConfig``."""


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}  # safe_load: a config file never builds objects
        elif suffix == ".json":
            import json

            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # each parser has its own error type; the message names the line
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of settings, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike, **overrides: Any) -> TRPromptConfig:
    """Read a config file; ``overrides`` (top-level fields, e.g. ``rounds=1``) win over it."""
    data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(data, where=str(path))


def config_from_dict(data: Mapping[str, Any], *, where: str = "config") -> TRPromptConfig:
    """Build a ``TRPromptConfig`` from plain data, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: [{key}] must be a table of settings, got {type(value).__name__}")
            top[key] = _build(_SECTIONS[key], value, f"{where} [{key}]")
        else:
            top[key] = value
    return _build(TRPromptConfig, top, where, nested=_SECTIONS)


def _build(cls: type, data: Mapping[str, Any], where: str, nested: Mapping[str, type] = {}) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key in nested:
            values[key] = value  # already built
            continue
        values[key] = _check_type(value, hints[key], f"{where}: {key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it fits ``hint`` (ints are accepted for floats, lists for tuples), else ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        for option in options:
            try:
                return _check_type(value, option, where)
            except ConfigError:
                pass
        names = sorted({_type_name(o) for o in options})
        raise ConfigError(f"{where}: expected {' or '.join(names)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected nothing (null), got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [_check_type(v, args[0], where) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(hint, type) and hint.__name__ == "PathLike" or hint is os.PathLike:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "a path" if getattr(hint, "__name__", "") == "PathLike" else getattr(hint, "__name__", str(hint))
    )
