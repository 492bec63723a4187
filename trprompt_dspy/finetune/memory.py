"""A memory check before SFT: estimate what training will hold, and fit it to what is free.

Seen: a compile of the 135M model was OOM-killed at 18.7 GB of RSS in SFT (8 sequences x 1024
tokens in one forward pass, a 49k vocabulary). :func:`sft_memory_bytes` estimates the peak from
the model's shape (``config.json``, no weights loaded), the micro-batch and the longest training
sequence; :func:`fit_memory` runs before training and, when the estimate does not fit in the
memory available now (``MemAvailable``, and the cgroup's limit when there is one), takes a
smaller micro-batch (the optimizer still sees ``per_device_batch_size`` sequences per step, by
gradient accumulation) and then gradient checkpointing where the config leaves it automatic; if
nothing fits it stops with one line saying what to set.

The estimate (bytes):

* weights: every parameter at its training dtype (4 bytes, 2 with ``load_bf16``), plus the LoRA
  parameters' gradients and two Adam moments in fp32;
* activations per layer, after Korthikanti et al. 2022 (``s*b*h*(34 + 5*a*s/h)`` at 2 bytes,
  scaled to the compute dtype); with gradient checkpointing, each layer's input plus one layer;
* the logits and what the loss and trl's token metrics build from them: 4 fp32 copies of
  ``b*s*vocab``;
* a fixed ``OVERHEAD`` for the framework.

It is an estimate for a decision, not a measurement: :data:`HEADROOM` of the available memory is
what it may use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import FinetuneConfig, FinetuneInputError

GiB = 1024**3
#: the share of the available memory an estimate may take
HEADROOM = 0.85
#: framework, tokenizer, allocator slack
OVERHEAD = 1 * GiB
#: fp32 copies of the logits during loss and metrics
LOGIT_COPIES = 4


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model's ``config.json``."""

    hidden: int
    layers: int
    heads: int
    vocab: int
    params: float

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape | None:
        """The shape of the model in ``model_dir`` (None when its config does not say)."""
        from .device import _count_params_from_config

        try:
            config = json.loads((Path(model_dir) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        config = config.get("text_config", config)
        try:
            shape = cls(hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
                        heads=int(config.get("num_attention_heads", 1)), vocab=int(config["vocab_size"]),
                        params=_count_params_from_config(str(model_dir)))
        except (KeyError, TypeError, ValueError):
            return None
        return shape if math.isfinite(shape.params) else None


def lora_param_count(model_dir: str | Path, rank: int) -> float:
    """About how many parameters a rank-``rank`` LoRA on every linear layer adds (0 if unknown)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        config = config.get("text_config", config)
        h, layers = config["hidden_size"], config["num_hidden_layers"]
        inter = config.get("intermediate_size", 4 * h)
    except (OSError, ValueError, KeyError):
        return 0.0
    # q, k, v, o (h -> h, at most) and gate, up, down (h <-> intermediate): rank x (in + out) each
    return float(layers * rank * (4 * 2 * h + 3 * (h + inter)))


def sft_memory_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, weight_bytes: int = 4,
                     compute_bytes: int = 4, gradient_checkpointing: bool = False, lora_params: float = 0.0) -> int:
    """Estimated peak bytes of one SFT step (see the module doc)."""
    b, s, h = micro_batch, seq_len, shape.hidden
    weights = shape.params * weight_bytes + lora_params * 4 * 4  # + fp32 grads and two Adam moments
    per_layer = s * b * h * (34 + 5 * shape.heads * s / h) * compute_bytes / 2
    if gradient_checkpointing:
        activations = shape.layers * s * b * h * compute_bytes + per_layer
    else:
        activations = shape.layers * per_layer
    logits = LOGIT_COPIES * b * s * shape.vocab * 4
    return int(weights + activations + logits + OVERHEAD)


def available_memory_bytes() -> int | None:
    """Memory this process may still take: ``MemAvailable``, capped by the cgroup limit (None:
    unknown, then nothing is checked)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: what is left under this group's limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _divisors_down(n: int, start: int) -> list[int]:
    return [d for d in range(min(start, n), 0, -1) if n % d == 0]


def fit_memory(config: FinetuneConfig, model_dir: str, *, micro_batch: int, seq_len: int, weight_bytes: int,
               compute_bytes: int, gradient_checkpointing: bool, lora_params: float = 0.0,
               available: int | None = None) -> tuple[int, bool, dict]:
    """``(micro_batch, gradient_checkpointing, report)`` that fit in the available memory,
    starting from the resolved settings; raises ``FinetuneInputError`` when nothing does.

    Only lowers the micro-batch (to a divisor of ``per_device_batch_size``: the optimizer step is
    unchanged), then turns on gradient checkpointing where ``config.gradient_checkpointing`` is
    None (automatic). An explicit ``micro_batch_size`` is kept as given and only checked.
    """
    shape = ModelShape.from_dir(model_dir)
    available = available_memory_bytes() if available is None else available
    report = {"available_gib": None if available is None else round(available / GiB, 2), "changed": None,
              "seq_len": seq_len, "micro_batch": micro_batch}
    if shape is None or available is None:
        report["estimate_gib"] = None
        return micro_batch, gradient_checkpointing, report

    def need(b: int, ckpt: bool) -> int:
        return sft_memory_bytes(shape, micro_batch=b, seq_len=seq_len, weight_bytes=weight_bytes,
                                compute_bytes=compute_bytes, gradient_checkpointing=ckpt, lora_params=lora_params)

    budget = HEADROOM * available
    first = need(micro_batch, gradient_checkpointing)
    report["estimate_gib"] = round(first / GiB, 2)
    if first <= budget:
        return micro_batch, gradient_checkpointing, report
    sizes = [micro_batch] if config.micro_batch_size else _divisors_down(config.per_device_batch_size, micro_batch)
    options = [(b, gradient_checkpointing) for b in sizes]
    if config.gradient_checkpointing is None and not gradient_checkpointing:
        options += [(b, True) for b in sizes]
    for b, ckpt in options:
        needed = need(b, ckpt)
        if needed <= budget:
            report.update(estimate_gib=round(needed / GiB, 2), micro_batch=b, changed=(
                f"micro_batch {micro_batch} -> {b}" + (", gradient checkpointing on" if ckpt != gradient_checkpointing else "")))
            return b, ckpt, report
    least, smallest = min((need(b, c), b) for b, c in options)
    raise FinetuneInputError(
        f"SFT would need about {least / GiB:.1f} GiB (micro-batch {smallest}, sequences up to {seq_len} tokens, a "
        f"{shape.vocab}-token vocabulary) and {available / GiB:.1f} GiB is available: lower max_length "
        f"(now {config.max_length}), set gradient_checkpointing=True, or free memory (a local vLLM server holds "
        "some of it)")
