"""The one definition of a LoRA adapter folder: which files it holds, which are refused, how it
is copied and how it is fingerprinted.

The trainer keeps :data:`ADAPTER_FILES` in the folders it writes; a saved program copies only
files with :data:`SAFE_SUFFIXES`; weights with :data:`PICKLE_SUFFIXES` (``torch.load``) can run
code when loaded and are refused unless the caller allows them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from ..errors import TRPromptError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the trainer's summary of how an adapter was made (written beside the weights)
SUMMARY_FILE = "training_summary.json"
#: what the trainer keeps in an adapter folder (peft also writes a README model card)
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SUMMARY_FILE)
#: what travels with a saved program: weights and JSON, tokenizer files; nothing executable
SAFE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja")
#: weight files that are pickles (torch.load): never loaded unless the user allows it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnsafeAdapterError(TRPromptError, RuntimeError):
    """An adapter folder holds pickled weights and the caller did not allow pickles."""


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder with a LoRA adapter config."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter_files(path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Refuse an adapter whose weights are pickles (a pickle can run code when loaded).

    Raises:
        UnsafeAdapterError: pickled files and ``allow_pickle`` is False.
        FileNotFoundError: no pickles and no safetensors weights either.
    """
    path = Path(path)
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES))
    if pickles and not allow_pickle:
        raise UnsafeAdapterError(
            f"adapter {path} holds pickled files ({', '.join(pickles)}): loading them can run code. "
            "Convert the adapter to safetensors, or pass allow_pickle=True if you trust its source."
        )
    if not pickles and not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"adapter {path} has no {ADAPTER_WEIGHTS}")


def copy_adapter(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the safe files of an adapter folder (:data:`SAFE_SUFFIXES`) to ``dst``, replacing
    it as a whole: a crash leaves the old copy or the new one, never a mix."""
    src, dst = Path(src), Path(dst)
    if not is_adapter_dir(src):
        raise FileNotFoundError(f"{src} is not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file() and path.name.endswith(SAFE_SUFFIXES):
            shutil.copy2(path, tmp / path.name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def adapter_fingerprint(path: str | os.PathLike) -> str:
    """A short sha256 of an adapter folder's weights and config.

    DSPy caches responses by model name; naming adapters ``f"{role}-{fingerprint}"`` makes a
    retrained adapter a new name, so cached answers of an older adapter are never reused.
    """
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        weights = file.suffix == ".safetensors" or file.name.lower().endswith(PICKLE_SUFFIXES)
        if file.is_file() and (weights or file.name == ADAPTER_CONFIG):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]
