"""Process-wide shared servers: one :class:`VLLMServer` per configuration, started on first use.

Several roles (prompter, target, critic) that name the same local model share one server, and
roles that use a remote API start nothing.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from .config import ServerConfig
from .server import VLLMServer

_SHARED: dict[tuple, VLLMServer] = {}
_SHARED_LOCK = threading.Lock()


def shared_server(config: ServerConfig | None = None, **overrides: Any) -> VLLMServer:
    """Return a process-wide server for this configuration, starting it on first use.

    Lets several roles (prompter, target, critic) that name the same local model share one
    server, and starts nothing for roles that use a remote API. Servers are stopped at exit,
    or with :func:`stop_shared_servers`.
    """
    if config is None:
        config = ServerConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    key = tuple(
        (field.name, repr(getattr(config, field.name))) for field in dataclasses.fields(config)
    )
    with _SHARED_LOCK:
        server = _SHARED.get(key)
        if server is None or not server.running:
            server = VLLMServer(config).start()
            _SHARED[key] = server
        return server


def stop_shared_servers() -> None:
    """Stop every server started by :func:`shared_server`."""
    with _SHARED_LOCK:
        servers = list(_SHARED.values())
        _SHARED.clear()
    for server in servers:
        server.stop()
