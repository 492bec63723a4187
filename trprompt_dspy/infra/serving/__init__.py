"""Local vLLM servers: one per base model, LoRA adapters hot-swapped, DSPy LMs pointed at them.

Files, in the order a server comes to life: ``errors`` (what can fail), ``config``
(:class:`ServerConfig` and the vLLM arguments and environment made from it), ``launcher`` (runs
in the server process before vLLM), ``process`` (the process group, stopped as a whole),
``admin`` (HTTP calls: health, models, LoRA load/unload), ``server`` (:class:`VLLMServer`, the
state between them and the ``dspy.LM`` factory), ``registry`` (servers shared process-wide).
"""

from .config import DEFAULT_REQUEST_TIMEOUT_S, VLLM_LORA_RANKS, ServerConfig
from .errors import AdapterError, ServerError, ServerStartError
from .process import free_port
from .registry import shared_server, stop_shared_servers
from .server import VLLMServer

__all__ = [
    "AdapterError", "DEFAULT_REQUEST_TIMEOUT_S", "ServerConfig", "ServerError", "ServerStartError",
    "VLLM_LORA_RANKS", "VLLMServer", "free_port", "shared_server", "stop_shared_servers",
]
