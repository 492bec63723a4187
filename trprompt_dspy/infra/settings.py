"""Which settings change what a run computes, said where each field is declared.

A field declared with :func:`speed_only` (threads, progress bars, device, timeouts...) changes
how fast a run goes, not its results: a run may be resumed with another value. Everything else
is part of a run's fingerprint (:func:`result_settings`), and resuming a run folder with a
different value is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: field metadata key; False marks a setting that does not change results
AFFECTS_RESULTS = "affects_results"


def speed_only(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field that does not change a run's results (left out of its fingerprint)."""
    metadata = {**kwargs.pop("metadata", {}), AFFECTS_RESULTS: False}
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def result_settings(config: Any) -> Any:
    """A config dataclass (nested ones too) as a dict without its :func:`speed_only` fields;
    anything else is returned as it is."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {
            f.name: result_settings(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if f.metadata.get(AFFECTS_RESULTS, True)
        }
    if isinstance(config, (list, tuple)):
        return [result_settings(v) for v in config]
    if isinstance(config, dict):
        return {k: result_settings(v) for k, v in config.items()}
    return config
