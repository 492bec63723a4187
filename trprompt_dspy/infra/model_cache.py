"""The model cache: where converted models live, how a cached folder is verified (a manifest with
the sha256 of every file, written last), built once under a file lock, and how a GGUF file becomes
a safetensors folder that vLLM can serve on CPU.

The cache root is, in order: the ``cache_dir`` argument, ``$TRPROMPT_CACHE_DIR``,
``$XDG_CACHE_HOME/trprompt_dspy``, ``~/.cache/trprompt_dspy``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import TRPromptError
from .runs import atomic_write_text

logger = logging.getLogger(__name__)

_CONVERSION_VERSION = 1
MANIFEST_NAME = "trprompt_manifest.json"


class ModelNotAvailableError(TRPromptError, RuntimeError):
    """The requested model cannot be found or built (missing package, folder or file)."""


# --------------------------------------------------------------------------------------------
# cache location and manifests
# --------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache root folder (not created).

    Args:
        cache_dir: explicit folder; wins over the environment.

    Order: ``cache_dir``, ``$TRPROMPT_CACHE_DIR``, ``$XDG_CACHE_HOME/trprompt_dspy``,
    ``~/.cache/trprompt_dspy``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("TRPROMPT_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "trprompt_dspy").resolve()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, source: dict | None = None) -> Path:
    """Hash every file in ``folder`` and write ``trprompt_manifest.json`` (last, atomically).

    Args:
        folder: a finished model folder.
        source: free-form description of where the folder came from; compared by
            :func:`verify_model_dir` so that a changed source invalidates the cache.
    """
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            files[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {"format": _CONVERSION_VERSION, "source": source or {}, "files": files}
    return atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))


def verify_model_dir(folder: str | os.PathLike, source: dict | None = None, *, full: bool = True) -> bool:
    """Tell whether ``folder`` holds a complete model written by this module.

    Args:
        folder: the model folder.
        source: if given, must equal the manifest's recorded source.
        full: re-hash every file (about 0.3 s for the default model); ``False`` checks sizes only.

    Returns:
        True when the manifest exists, matches ``source`` and every listed file is intact.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != _CONVERSION_VERSION:
        return False
    if source is not None and manifest.get("source") != source:
        return False
    files = manifest.get("files") or {}
    if "config.json" not in files:
        return False
    for name, meta in files.items():
        path = folder / name
        try:
            if path.stat().st_size != meta["size"]:
                return False
        except OSError:
            return False
        if full and sha256_file(path) != meta["sha256"]:
            return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Two processes (e.g. two test sessions) may ask for the same cache entry at once; the
    # second waits and then finds the finished folder instead of converting again.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_cached(target: Path, source: dict, build) -> Path:
    """Return ``target`` if verified, else build it with ``build(tmp_dir)`` and rename it in place."""
    if verify_model_dir(target, source):
        return target
    with _file_lock(target.parent / (target.name + ".lock")):
        if verify_model_dir(target, source):  # built by another process while we waited
            return target
        if target.exists():
            logger.warning("model cache %s is incomplete or stale; rebuilding it", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            # mkdtemp makes the folder private (0700); a model cache is ordinary shared data.
            os.chmod(tmp, 0o755)
            build(tmp)
            write_manifest(tmp, source)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------------------------


def _gguf_add_bos(gguf_path: Path) -> bool | None:
    """Read ``tokenizer.ggml.add_bos_token`` from the GGUF header (None when absent)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.contents())


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bfloat16") -> Path:
    """De-quantize a GGUF model and write it as a safetensors Hugging Face folder.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: folder to write (created; should be empty).
        dtype: weight dtype to store ("bfloat16", "float16" or "float32"). SmolLM2 was trained
            in bfloat16, so bfloat16 loses nothing against the 4-bit source and halves the size.

    Returns:
        ``out_dir``.

    Raises:
        ModelNotAvailableError: the tokenizer has no chat template, or its BOS behaviour
            differs from what the GGUF declares (a silent cause of garbage output).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise ModelNotAvailableError(f"{gguf_path} carries no chat template; DSPy chat calls need one")
    expected_bos = _gguf_add_bos(gguf_path)
    ids = tokenizer("Hello world")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    if expected_bos is not None and adds_bos != expected_bos:
        raise ModelNotAvailableError(
            f"tokenizer rebuilt from {gguf_path} {'adds' if adds_bos else 'does not add'} a BOS token, "
            f"but the GGUF says add_bos_token={expected_bos}; the served model would see wrong inputs"
        )

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantizer, and vLLM would try
    # to load the folder as GGUF: rebuild a plain model from a config without the quantization.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately have no separate lm_head tensor.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelNotAvailableError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    del loaded
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
