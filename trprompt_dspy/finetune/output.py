"""The adapter folder a run writes: checked before training, staged while it trains, published
when it is finished.

Training writes into a hidden temporary sibling of ``output_dir`` and renames it into place at
the end, so an interrupted run leaves nothing at ``output_dir``, and an existing adapter is
replaced (``overwrite``) only by a finished one. What the folder holds is defined in
:mod:`trprompt_dspy.infra.adapters`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from ..infra.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .config import FinetuneConfig, FinetuneError, FinetuneInputError


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists (unless ``overwrite``), is a file, or cannot be created.

    Raises:
        FinetuneInputError: with the reason; the parent folder is created otherwise.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise FinetuneInputError(f"output folder {output_dir} exists and is not a folder")
    if output_dir.exists() and not overwrite:
        raise FinetuneInputError(f"output folder {output_dir} already exists; pick a new folder or set overwrite=True")
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FinetuneInputError(f"cannot create the output folder's parent {parent}: {error}") from error
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FinetuneInputError(f"output folder's parent {parent} is not writable")


def check_previous_adapter(config: FinetuneConfig) -> None:
    """With ``init_from="previous"``, refuse a ``previous_adapter`` that is not an adapter folder.

    Raises:
        FinetuneInputError: its adapter config or safetensors weights are missing.
    """
    if config.init_from != "previous":
        return
    folder = Path(config.previous_adapter)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FinetuneInputError(
            f"previous_adapter {folder} is not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )


def make_staging_dir(output_dir: Path) -> Path:
    """A new hidden folder beside ``output_dir`` to train into.

    Raises:
        FinetuneInputError: the parent folder cannot be written.
    """
    try:
        return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    except OSError as error:
        raise FinetuneInputError(f"cannot write into {output_dir.parent}: {error}") from error


def publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Move a finished adapter folder into place; an existing one goes only after the new one is in.

    Raises:
        FinetuneError: ``output_dir`` appeared while training and ``overwrite`` is off (the new
            adapter is left in ``staging``).
    """
    if output_dir.exists():
        if not overwrite:
            raise FinetuneError(f"{output_dir} appeared while training; the new adapter stays in {staging}")
        old = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output_dir, old)
        os.replace(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output_dir)
