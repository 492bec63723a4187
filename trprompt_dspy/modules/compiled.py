"""A compiled program on disk, and back in service in a fresh process.

``save_compiled(program, folder)`` writes::

    folder/program.json        DSPy JSON state (each prompter's t* and adapter entry; no API keys)
    folder/adapters/<name>/    each prompter's LoRA adapter (safetensors + JSON only)
    folder/manifest.json       base model, adapter names, t*, where each role ran, versions

``load_compiled(program, folder)`` restores the state and points the adapter entries at the
copies in ``folder``; ``serve_prompters(program)`` loads the adapters into a vLLM server on their
base model (starting one, or using the one given) and points each prompter's LM at its adapter,
so a loaded prompter drops into any DSPy pipeline.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import dspy

from ..infra.adapters import ADAPTER_CONFIG, check_adapter_files, copy_adapter
from ..infra.runs import atomic_write_json, read_json, versions
from .predictor import PromptGenerator

logger = logging.getLogger(__name__)

#: File name of a program's state inside a saved program folder.
PROGRAM_STATE_FILE = "program.json"
MANIFEST_FILE = "manifest.json"
ADAPTERS_DIR = "adapters"


def prompt_generators(program: dspy.Module) -> list[tuple[str, PromptGenerator]]:
    """The prompter predictors of a program, by their DSPy parameter name."""
    return [(name, p) for name, p in program.named_predictors() if isinstance(p, PromptGenerator)]


def save_compiled(program: dspy.Module, folder: str | os.PathLike) -> Path:
    """Save a program and its prompters' adapters into ``folder`` (see the module doc)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    originals = []
    manifest: dict[str, Any] = {"format": 1, "prompters": {}, "versions": versions()}
    # where the target, critic and optimizer ran in the compile ({"local": bool, "model": name}),
    # so that `trprompt evaluate`/`serve` start the same local models; names only, never keys
    manifest["roles"] = {role: {k: v for k, v in entry.items() if k in ("local", "model", "output_format", "shares_prompter")}
                         for role, entry in (getattr(program, "role_models", None) or {}).items()}
    try:
        for name, predictor in prompt_generators(program):
            entry: dict[str, Any] = {"reward": predictor.reward, "adapter": None}
            if predictor.adapter:
                adapter = dict(predictor.adapter)
                relative = Path(ADAPTERS_DIR) / adapter["name"]
                src = Path(adapter["path"])
                if not src.is_absolute():
                    src = folder / src
                if src.resolve() != (folder / relative).resolve():
                    copy_adapter(src, folder / relative)
                originals.append((predictor, predictor.adapter))
                # the saved state names the copy, relative to the folder, so the folder can move
                predictor.adapter = {**adapter, "path": str(relative)}
                entry["adapter"] = {"name": adapter["name"], "path": str(relative), "base_model": adapter["base_model"]}
            manifest["prompters"][name] = entry
        dspy.Module.save(program, folder / PROGRAM_STATE_FILE)
    finally:
        for predictor, adapter in originals:
            predictor.adapter = adapter
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return folder


def _take_structured_lms(state: dict, allow_unsafe_lm_state: bool) -> dict[str, Any]:
    """Remove this library's own ``StructuredLM`` states from a program state and rebuild them.

    DSPy refuses to import any LM class named in a file unless told the file is trusted. The
    class named here is not taken from the file: only the exact path of our own class is
    recognised, and it is this library's code, so these LMs load without that flag (with the
    same removal of endpoint keys that DSPy applies to untrusted files).
    """
    from dspy.clients.base_lm import LM_CLASS_STATE_KEY
    from dspy.predict.predict import _sanitize_lm_state

    from ..infra.structured import StructuredLM

    ours = f"{StructuredLM.__module__}.{StructuredLM.__qualname__}"
    rebuilt = {}
    for name, entry in state.items():
        lm_state = entry.get("lm") if isinstance(entry, dict) else None
        if isinstance(lm_state, dict) and lm_state.get(LM_CLASS_STATE_KEY) == ours:
            clean = {k: v for k, v in _sanitize_lm_state(lm_state, allow_unsafe_lm_state).items() if k != LM_CLASS_STATE_KEY}
            rebuilt[name] = StructuredLM(**clean)
            entry["lm"] = None
    return rebuilt


def load_compiled(
    program: dspy.Module,
    folder: str | os.PathLike,
    *,
    allow_unsafe_lm_state: bool = False,
    allow_pickle: bool = False,
) -> dspy.Module:
    """Load ``folder`` (written by ``save_compiled``) into ``program``; adapter paths become
    absolute paths inside ``folder``. Never unpickles anything: the state is JSON, and an adapter
    with pickled weights (``.bin``, ``.pt``...) is refused unless ``allow_pickle=True``.

    Raises:
        FileNotFoundError: not a saved program, or an adapter is missing.
        UnsafeAdapterError: an adapter holds pickles and ``allow_pickle`` is False.
    """
    import orjson

    folder = Path(folder)
    state_file = folder / PROGRAM_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} holds no {PROGRAM_STATE_FILE}; is it a saved TRPrompt program?")
    state = orjson.loads(state_file.read_bytes())
    state.pop("metadata", None)
    manifest = read_json(folder / MANIFEST_FILE) or {}
    program.role_models = manifest.get("roles") or {}
    structured_lms = _take_structured_lms(state, allow_unsafe_lm_state)
    program.load_state(state, allow_unsafe_lm_state=allow_unsafe_lm_state)
    predictors = dict(program.named_predictors())
    for name, lm in structured_lms.items():
        if name in predictors:
            predictors[name].lm = lm
    for _, predictor in prompt_generators(program):
        if predictor.adapter:
            path = Path(predictor.adapter["path"])
            path = path if path.is_absolute() else folder / path
            if not (path / ADAPTER_CONFIG).is_file():
                raise FileNotFoundError(f"the adapter {predictor.adapter['name']!r} is missing from {path}")
            check_adapter_files(path, allow_pickle=allow_pickle)
            predictor.adapter = {**predictor.adapter, "path": str(path.resolve())}
    return program


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved program (base model, adapters, t*, versions)."""
    manifest = read_json(Path(folder) / MANIFEST_FILE)
    if manifest is None:
        raise FileNotFoundError(f"{folder} holds no {MANIFEST_FILE}")
    return manifest


def serve_prompters(
    program: dspy.Module,
    server: Any = None,
    *,
    structured: bool = True,
    **lm_kwargs: Any,
) -> Any:
    """Serve each prompter's adapter and point the prompter at it.

    Args:
        program: a loaded compiled program (or any program with compiled prompters).
        server: a running ``VLLMServer`` on the adapters' base model; None starts (or reuses)
            a shared one for that base model. A prompter without an adapter (a compile that
            returned the untrained round 0) gets the given server's base model.
        structured: give the prompters a ``StructuredLM`` (use with ``dspy.JSONAdapter``, as in
            training); False gives a plain ``dspy.LM``.
        **lm_kwargs: for the LM (``max_tokens``, ``temperature``...).

    Returns:
        The server (None when no prompter has an adapter).
    """
    from ..infra.serving import ServerConfig, shared_server

    untrained = []
    for _, predictor in prompt_generators(program):
        adapter = predictor.adapter
        if not adapter:
            untrained.append(predictor)  # the compile returned round 0: the base model prompts
            continue
        if server is None:
            server = shared_server(ServerConfig(model=adapter["base_model"]))
        if adapter["name"] not in server.adapters:
            server.load_adapter(adapter["name"], adapter["path"])
        predictor.lm = server.lm(adapter["name"], structured=structured, **lm_kwargs)
    if server is not None:
        for predictor in untrained:
            predictor.lm = server.lm(structured=structured, **lm_kwargs)
    return server
