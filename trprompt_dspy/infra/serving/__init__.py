"""Local vLLM servers: one per base model, LoRA adapters hot-swapped, DSPy LMs pointed at them."""

from .server import (
    AdapterError,
    ServerConfig,
    ServerError,
    ServerStartError,
    VLLMServer,
    free_port,
    shared_server,
    stop_shared_servers,
)

__all__ = [
    "AdapterError", "ServerConfig", "ServerError", "ServerStartError", "VLLMServer", "free_port",
    "shared_server", "stop_shared_servers",
]
