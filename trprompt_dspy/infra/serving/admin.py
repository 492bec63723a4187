"""The HTTP admin calls a running vLLM server answers: health, the served models, and runtime
LoRA adapters (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), with the checks an
adapter folder must pass before it is sent."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from ..adapters import ADAPTER_CONFIG, UnsafeAdapterError, check_adapter_files
from .errors import AdapterError

#: seconds a load/unload request may take (vLLM reads the adapter's weights before it answers)
ADMIN_TIMEOUT_S = 120
# The name becomes part of a litellm model string ("hosted_vllm/<name>"): keep it plain.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_healthy(base_url: str, timeout_s: float = 2) -> bool:
    """True when ``GET <base_url>/health`` answers 200 (False while the server cannot be reached)."""
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def served_models(api_base: str) -> list[str]:
    """Model names the server answers to (base and adapters), from ``<api_base>/models``."""
    with urllib.request.urlopen(api_base + "/models", timeout=30) as response:
        return [entry["id"] for entry in json.load(response)["data"]]


def check_adapter(name: str, path: str | os.PathLike, *, max_lora_rank: int, allow_pickle: bool = False) -> Path:
    """Check an adapter name and folder before loading; return the folder as an absolute path.

    Raises:
        AdapterError: the name is not plain (letters, digits, ``. _ -``), the folder has no
            ``adapter_config.json``, holds pickles that ``allow_pickle`` does not allow (or no
            weights), or its rank is above ``max_lora_rank``.
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise AdapterError(f"invalid adapter name {name!r}: use letters, digits and . _ - (no spaces, / or :)")
    folder = Path(path).expanduser().resolve()
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{folder} is not a peft adapter folder (no {ADAPTER_CONFIG})")
    try:
        check_adapter_files(folder, allow_pickle=allow_pickle)
    except (UnsafeAdapterError, FileNotFoundError) as error:
        raise AdapterError(str(error)) from None
    try:
        rank = int(json.loads(config_file.read_text()).get("r", 0))
    except (ValueError, TypeError) as error:
        raise AdapterError(f"cannot read {config_file}: {error}") from error
    if rank > max_lora_rank:
        raise AdapterError(
            f"adapter {name!r} has rank {rank} > max_lora_rank={max_lora_rank}; "
            "restart the server with a larger max_lora_rank"
        )
    return folder


def load_lora(base_url: str, name: str, folder: Path) -> str:
    """Ask the server to load the adapter in ``folder`` under ``name``; return its reply.

    Raises:
        AdapterError: the server refused (HTTP error) or could not be reached.
    """
    return _post(base_url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})


def unload_lora(base_url: str, name: str) -> str:
    """Ask the server to unload the adapter ``name``; return its reply.

    Raises:
        AdapterError: the server refused (HTTP error) or could not be reached.
    """
    return _post(base_url, "/v1/unload_lora_adapter", {"lora_name": name})


def _post(base_url: str, route: str, payload: dict) -> str:
    request = urllib.request.Request(
        base_url + route,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S) as response:
            return response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace")
        raise AdapterError(f"{route} failed with HTTP {error.code}: {body}") from error
    except urllib.error.URLError as error:
        raise AdapterError(f"{route} failed: {error.reason}") from error
