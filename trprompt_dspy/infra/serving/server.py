"""A local vLLM server (CPU or GPU) with hot-swapped LoRA adapters, exposed as ``dspy.LM``s.

:class:`VLLMServer` runs vLLM's OpenAI-compatible server as a child process on 127.0.0.1::

    with VLLMServer(ServerConfig(model="default")) as server:
        dspy.configure(lm=server.lm(max_tokens=256))
        server.load_adapter("prompter-r1", "runs/x/adapters/r1")
        prompter_lm = server.lm("prompter-r1")

What vLLM is started with comes from :mod:`.config`; the process and its clean-up (also when the
caller is killed) from :mod:`.process`; the HTTP calls from :mod:`.admin`. This class keeps the
state between them: the port, the loaded adapters and their LoRA slots, restarts. The server is
stopped on :meth:`VLLMServer.stop`, on leaving the ``with`` block (also on exceptions and
Ctrl-C), and at interpreter exit. Roles that use a remote API never need this module: any
``dspy.LM`` works for them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..device import resolve_device
from ..models import output_format_for, resolve_model
from . import admin
from .config import (
    DEFAULT_REQUEST_TIMEOUT_S,
    ServerConfig,
    default_served_name,
    vllm_args,
    vllm_env,
)
from .errors import AdapterError, ServerError, ServerStartError
from .process import ServerProcess, default_log_path, free_port, group_pids, log_tail

logger = logging.getLogger(__name__)


class VLLMServer:
    """vLLM's OpenAI-compatible server in a child process, with runtime LoRA adapters.

    Use as a context manager or call :meth:`start` / :meth:`stop`. Thread-safe for
    :meth:`load_adapter`, :meth:`unload_adapter` and :meth:`lm`.

    Args:
        config: a :class:`ServerConfig`; or pass its fields as keyword arguments.
        **overrides: :class:`ServerConfig` fields (applied over ``config``).
    """

    def __init__(self, config: ServerConfig | None = None, **overrides: Any):
        if config is None:
            config = ServerConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.device: str | None = None
        self.port: int | None = None
        self.model_path: str | None = None
        #: the wire format of the library's roles on this model (``ServerConfig.output_format``)
        self.output_format: str | None = None
        self.served_model_name: str | None = None
        self.log_path: Path | None = None
        self.ready_seconds: float | None = None
        self._proc: ServerProcess | None = None
        self._pgid: int | None = None  # kept after stop(): pids() still reports stragglers
        self._adapters: dict[str, str] = {}
        self._pickle_allowed: set[str] = set()  # adapters the caller loaded with allow_pickle=True
        self._restart_port: int | None = None
        self.restarts = 0
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        self._require_running()
        return f"http://{self.config.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """OpenAI-compatible API root (``.../v1``), as ``dspy.LM(api_base=...)`` takes it."""
        return self.base_url + "/v1"

    @property
    def pid(self) -> int | None:
        """Pid of the server process (the process-group leader), or None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def pids(self) -> list[int]:
        """Pids of every live process of the server (its process group)."""
        return group_pids(self._pgid) if self._pgid is not None else []

    def start(self, *, wait: bool = True) -> VLLMServer:
        """Start the server and, unless ``wait=False``, block until ``/health`` answers.

        Returns:
            self.

        Raises:
            ServerStartError: the process exited, or was not healthy within
                ``config.startup_timeout_s``; the message holds the tail of the server log. The
                server is stopped before the error is raised.
            DeviceError: ``device="cuda"`` and torch sees no GPU.
            ModelNotAvailableError: the model cannot be resolved.
        """
        with self._lock:
            if self._proc is not None:
                raise ServerError("server already started; stop() it first")
            cfg = self.config
            self.device = resolve_device(cfg.device)
            self.model_path = resolve_model(cfg.model)
            self.output_format = (output_format_for(cfg.model, self.model_path) if cfg.output_format == "auto"
                                  else cfg.output_format)
            self.served_model_name = cfg.served_model_name or default_served_name(self.model_path)
            # A fixed port cannot be retried on a clash; a picked one can (another process may
            # take it between our probe and vLLM's bind).
            port = cfg.port or self._restart_port
            attempts = 1 if port is not None else 3
            for attempt in range(attempts):
                self.port = port or free_port(cfg.host)
                self._spawn()
                if not wait:
                    return self
                try:
                    self.wait_ready(cfg.startup_timeout_s)
                    return self
                except ServerStartError as error:
                    if attempt + 1 < attempts and "address already in use" in str(error).lower():
                        logger.warning("port %s was taken; retrying on another port", self.port)
                        continue
                    raise
                except BaseException:
                    # Ctrl-C while waiting: a `with` block never reaches __exit__ when __enter__
                    # fails, so stop here rather than leave the server to the exit handlers.
                    self.stop(grace_s=2)
                    raise
            raise AssertionError("unreachable")

    def restart(self) -> float:
        """Start the server again after it died (or stop and start it), on the same port.

        LMs made by :meth:`lm` keep working (same address), and the adapters that were loaded
        are loaded again under their names.

        Returns:
            seconds until the new server was ready.

        Raises:
            ServerStartError: the new server did not start (the message holds its log).
        """
        with self._lock:
            self._require_started()
            adapters, pickle_allowed, port = dict(self._adapters), set(self._pickle_allowed), self.port
            code = self._proc.poll()
            logger.warning(
                "restarting the vLLM server on port %s (%s; log %s)", port,
                "it exited with status %s" % code if code is not None else "it was running", self.log_path,
            )
            self.stop(grace_s=2)
            self._restart_port = port
            try:
                self.start()
            finally:
                self._restart_port = None
            for name, path in adapters.items():
                self.load_adapter(name, path, allow_pickle=name in pickle_allowed)
            self.restarts += 1
            return self.ready_seconds or 0.0

    def _spawn(self) -> None:
        cfg = self.config
        if cfg.log_path is not None:
            self.log_path = Path(cfg.log_path)
        else:
            self.log_path = default_log_path(self.served_model_name, self.port)
        args = vllm_args(cfg, model_path=self.model_path, served_model_name=self.served_model_name,
                         port=self.port, device=self.device)
        logger.info("starting vLLM on %s:%s for %s (log: %s)", cfg.host, self.port, self.model_path, self.log_path)
        self._proc = ServerProcess.launch(cfg.python, args, env=vllm_env(cfg, device=self.device),
                                          log_path=self.log_path, grace_s=cfg.stop_grace_s)
        self._pgid = self._proc.pgid

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until ``/health`` answers 200; return the seconds since the process started.

        Raises:
            ServerStartError: the process died or the timeout passed (the server is stopped).
        """
        self._require_started()
        timeout_s = self.config.startup_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        url = f"http://{self.config.host}:{self.port}"
        while True:
            code = self._proc.poll()
            if code is not None:
                self._fail(f"vLLM server exited with status {code} before it was ready", code)
            if admin.is_healthy(url):
                break
            if time.monotonic() - start > timeout_s:
                self._fail(f"vLLM server was not ready within {timeout_s:.0f} s", None)
            time.sleep(0.25)
        self.ready_seconds = time.monotonic() - start
        logger.info("vLLM ready on port %s after %.1f s", self.port, self.ready_seconds)
        return self.ready_seconds

    def _fail(self, reason: str, code: int | None) -> None:
        self.stop()
        raise ServerStartError(
            f"{reason} (model {self.model_path}, log {self.log_path}). Last lines of the log:\n"
            f"{log_tail(self.log_path)}",
            log_path=self.log_path,
            returncode=code,
        )

    def stop(self, grace_s: float | None = None) -> None:
        """Stop the server and all its processes: SIGTERM, then SIGKILL after ``grace_s``.

        Idempotent; returns once no process of the server's group is left (or after a short
        extra wait if the kernel is slow to reap them).
        """
        with self._lock:
            process = self._proc
            if process is None:
                return
            process.stop(self.config.stop_grace_s if grace_s is None else grace_s)
            self._proc = None
            self._adapters.clear()
            self._pickle_allowed.clear()
            logger.info("vLLM server %s stopped", process.pid)

    def __enter__(self) -> VLLMServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __del__(self):
        # Last resort for a server dropped without stop(); atexit and the watchdog cover the rest.
        # At interpreter exit module globals (contextlib, logger...) may already be None: only
        # builtins here, and whatever stop() trips over is swallowed.
        try:
            if self._proc is not None:
                self.stop(grace_s=2)
        except Exception:
            pass

    def _require_started(self) -> None:
        if self._proc is None:
            raise ServerError("server not started; call start() or use it as a context manager")

    def _require_running(self) -> None:
        self._require_started()
        if self._proc.poll() is not None:
            raise ServerError(
                f"vLLM server exited with status {self._proc.returncode}; log {self.log_path}:\n{log_tail(self.log_path)}"
            )

    # ---------------------------------------------------------------- adapters

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded adapters, name -> path."""
        with self._lock:
            return dict(self._adapters)

    @property
    def adapter_capacity(self) -> int:
        """How many adapters may be loaded at once (``max_loras - 1``, see :class:`ServerConfig`)."""
        return self.config.max_loras - 1

    def load_adapter(self, name: str, path: str | os.PathLike, *, allow_pickle: bool = False) -> str:
        """Load a peft LoRA adapter into the running server under ``name``.

        Args:
            name: model name to address the adapter by (``server.lm(name)``). Must be new: unload
                an adapter before reusing its name. DSPy's response cache is keyed by name, so a
                retrained adapter should get a new name (see :func:`~trprompt_dspy.infra.adapters.adapter_fingerprint`).
            path: folder written by ``peft`` (``adapter_config.json`` + weights).
            allow_pickle: load pickled weights (``adapter_model.bin``...), which can run code;
                refused by default (safetensors only).

        Returns:
            ``name``.

        Raises:
            AdapterError: LoRA disabled, name taken, rank above ``max_lora_rank``, no free slot
                (at most ``max_loras - 1`` adapters), or the server refused the adapter.
        """
        if not self.config.enable_lora:
            raise AdapterError("this server was started with enable_lora=False")
        folder = admin.check_adapter(name, path, max_lora_rank=self.config.max_lora_rank, allow_pickle=allow_pickle)
        with self._lock:
            self._require_running()
            if name == self.served_model_name or name in self._adapters:
                raise AdapterError(f"model name {name!r} is already served; unload it first or pick another name")
            if len(self._adapters) >= self.adapter_capacity:
                raise AdapterError(
                    f"cannot load {name!r}: {len(self._adapters)} adapters loaded and max_loras="
                    f"{self.config.max_loras}. One LoRA slot must stay free, or vLLM may answer base-model "
                    "requests with adapter output in mixed batches. Unload an adapter "
                    f"({', '.join(self._adapters)}) or start the server with a larger max_loras."
                )
            admin.load_lora(self.base_url, name, folder)
            self._adapters[name] = str(folder)
            if allow_pickle:
                self._pickle_allowed.add(name)
        logger.info("loaded adapter %s from %s", name, folder)
        return name

    def unload_adapter(self, name: str) -> None:
        """Remove a loaded adapter from the server.

        Raises:
            AdapterError: no adapter of that name was loaded by this object, or the server refused.
        """
        with self._lock:
            self._require_running()
            if name not in self._adapters:
                raise AdapterError(f"no adapter {name!r} is loaded (loaded: {sorted(self._adapters) or 'none'})")
            admin.unload_lora(self.base_url, name)
            del self._adapters[name]
            self._pickle_allowed.discard(name)
        logger.info("unloaded adapter %s", name)

    def served_models(self) -> list[str]:
        """Model names the server answers to right now (base and adapters), from ``/v1/models``."""
        return admin.served_models(self.api_base)

    # ---------------------------------------------------------------- DSPy

    def lm(self, name: str | None = None, *, structured: bool = False, **kwargs: Any):
        """Return a ``dspy.LM`` for the base model (``name=None``) or a loaded adapter.

        The model is addressed as ``hosted_vllm/<name>`` so that ``max_tokens`` is honoured
        (the ``openai/`` prefix sends ``max_completion_tokens``, which vLLM ignores).

        Args:
            name: adapter name, or None / the served model name for the base model.
            structured: return a :class:`trprompt_dspy.infra.structured.StructuredLM` in this
                model's wire format (:attr:`output_format`): the library's modules pick the
                matching adapter by themselves (JSON schema enforced by vLLM, or prose).
            **kwargs: passed to ``dspy.LM`` (``max_tokens``, ``temperature``, ``cache``,
                ``timeout`` -- default :data:`DEFAULT_REQUEST_TIMEOUT_S` ...); with
                ``structured=True`` also ``max_string_length``.

        Raises:
            AdapterError: ``name`` is neither the base model nor a loaded adapter.
        """
        # dspy (and litellm under it) cost seconds to import: only a caller that wants an LM pays.
        import dspy

        self._require_running()
        target = name or self.served_model_name
        if target != self.served_model_name and target not in self.adapters:
            raise AdapterError(
                f"{target!r} is not served: base model is {self.served_model_name!r}, adapters: "
                f"{sorted(self.adapters) or 'none'}"
            )
        kwargs.setdefault("api_base", self.api_base)
        kwargs.setdefault("api_key", "local")
        # litellm's own default waits 6000 s for a reply; a stuck request should fail sooner
        kwargs.setdefault("timeout", DEFAULT_REQUEST_TIMEOUT_S)
        if structured:
            from ..structured import StructuredLM

            kwargs.setdefault("output_format", self.output_format)
            return StructuredLM(f"hosted_vllm/{target}", **kwargs)
        return dspy.LM(f"hosted_vllm/{target}", **kwargs)
