"""The device settings a training run actually uses, resolved from :class:`FinetuneConfig` and
the hardware.

On a GPU the base model is loaded in bf16 (where supported) and trained without gradient
checkpointing unless asked. On CPU the settings come from :data:`~.config.CPU_PROFILES`,
measured on the project's 2-core AVX512-bf16 machine (``benchmarks/finetune_speed.py``,
``benchmarks/results/finetune_speed.json``); every one can be overridden in
:class:`FinetuneConfig`. Which device, whether the CPU has bf16 and how many cores are idle come
from :mod:`trprompt_dspy.infra.device`, the one place serving and training decide them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..infra.device import DeviceError, cpu_has_native_bf16, idle_cores, resolve_device
from .config import CPU_PROFILES, CPUProfile, FinetuneConfig, FinetuneInputError


def micro_batch_size(config: FinetuneConfig, device: str) -> int:
    """Sequences per forward pass: a divisor of ``per_device_batch_size`` (see ``FinetuneConfig``)."""
    wanted = config.micro_batch_size or (2 if device == "cpu" else config.per_device_batch_size)
    wanted = max(1, min(wanted, config.per_device_batch_size))
    return max(d for d in range(1, wanted + 1) if config.per_device_batch_size % d == 0)


def cpu_profile(n_params: float) -> CPUProfile:
    """The measured CPU profile for a model of ``n_params`` parameters (see :data:`CPU_PROFILES`)."""
    for profile in CPU_PROFILES:
        if n_params <= profile.max_params:
            return profile
    return CPU_PROFILES[-1]


def _count_params_from_config(model_dir: str) -> float:
    """Parameter count from ``config.json`` without loading weights (Llama-like estimate)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return math.inf
    config = config.get("text_config", config)
    try:
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        vocab, inter = config["vocab_size"], config.get("intermediate_size", 4 * config["hidden_size"])
    except KeyError:
        return math.inf
    heads = config.get("num_attention_heads", 1)
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return float(layers * (attention + 3 * hidden * inter) + embeddings)


@dataclasses.dataclass
class DeviceSettings:
    """What a run actually uses, resolved from :class:`FinetuneConfig` and the hardware."""

    device: str
    bf16: bool
    gradient_checkpointing: bool
    load_bf16: bool
    cpu_threads: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the summary's ``device``)."""
        return dataclasses.asdict(self)


def resolve_device_settings(config: FinetuneConfig, model_dir: str) -> DeviceSettings:
    """Resolve the automatic device settings of ``config`` for a model.

    Raises:
        FinetuneInputError: ``device="cuda"`` without a GPU, or bf16 asked for on hardware
            without it.
    """
    try:
        device = resolve_device(config.device)
    except DeviceError as error:
        raise FinetuneInputError(str(error)) from error
    if device == "cuda":
        import torch

        native_bf16 = torch.cuda.is_bf16_supported()
        bf16 = native_bf16 if config.bf16 is None else config.bf16
        if bf16 and not native_bf16:
            raise FinetuneInputError("bf16=True but this GPU has no bf16 support")
        load_bf16 = bf16 if config.load_bf16 is None else config.load_bf16
        checkpointing = bool(config.gradient_checkpointing)
        return DeviceSettings("cuda", bf16, checkpointing, load_bf16, None)
    profile = cpu_profile(_count_params_from_config(model_dir))
    native_bf16 = cpu_has_native_bf16()
    bf16 = (profile.bf16 and native_bf16) if config.bf16 is None else config.bf16
    load_bf16 = (profile.load_bf16 and bf16) if config.load_bf16 is None else config.load_bf16
    checkpointing = profile.gradient_checkpointing if config.gradient_checkpointing is None else config.gradient_checkpointing
    cores = os.cpu_count() or 1
    threads = config.cpu_threads
    if threads is None:
        threads = profile.threads or cores
        # A thread on a core another process keeps busy stalls every parallel region of its
        # siblings: measured on 2 cores with a vLLM engine busy on one, SmolLM2 took 43 s/step
        # on 2 threads and 11.5 s/step on 1. So take only the cores that are idle now.
        free = idle_cores()
        if free is not None:
            threads = max(1, min(threads, int(free + 0.5)))
    return DeviceSettings("cpu", bf16, checkpointing, load_bf16, min(threads, cores))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` torch intra-op threads (None: leave torch's setting alone),
    then restore the previous count."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
