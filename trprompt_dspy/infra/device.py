"""What hardware a run has: the device to use (CUDA or CPU), bf16 support on the CPU, and how many
cores other processes leave idle. Serving and fine-tuning both decide from here."""

from __future__ import annotations

import os
import time

from ..errors import TRPromptError

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(TRPromptError, ValueError):
    """A device was asked for that this machine does not have (or is not a device name)."""


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU; a broken CUDA install counts as none (a CPU run goes on)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_device(device: str = "auto") -> str:
    """``"cuda"`` or ``"cpu"`` for a device setting (``"auto"``: CUDA when torch sees a GPU).

    Raises:
        DeviceError: not one of :data:`DEVICES`, or ``"cuda"`` without a GPU.
    """
    if device not in DEVICES:
        raise DeviceError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return "cpu"
    has_cuda = cuda_available()
    if device == "cuda" and not has_cuda:
        raise DeviceError("device='cuda' but torch sees no CUDA GPU (is the GPU build of torch/vllm installed?)")
    return "cuda" if has_cuda else "cpu"


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-bf16 or AMX), so bf16 autocast pays."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def idle_cores(sample_s: float = 0.5) -> float | None:
    """Cores left idle by every process on the machine, sampled over ``sample_s`` (Linux).

    Returns None where ``/proc/stat`` cannot be read.
    """

    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait, total

    first = read()
    time.sleep(sample_s)
    second = read()
    if first is None or second is None or second[1] <= first[1]:
        return None
    return (os.cpu_count() or 1) * (second[0] - first[0]) / (second[1] - first[1])
