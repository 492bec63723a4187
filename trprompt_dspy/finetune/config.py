"""Settings of one LoRA SFT run of the prompter, the measured CPU profiles behind its automatic
device settings, and the errors fine-tuning raises.

Fields declared with :func:`~trprompt_dspy.infra.settings.speed_only` (device, threads,
micro-batching, gradient checkpointing, progress bar, overwrite) change how fast a run goes or
where it may write, not the adapter it trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Literal

from ..errors import TRPromptError
from ..infra.checks import choice_problem, int_problem
from ..infra.settings import speed_only


class FinetuneError(TRPromptError, RuntimeError):
    """Fine-tuning failed or was cancelled; nothing was written at the output folder."""


class FinetuneInputError(TRPromptError, ValueError):
    """The records, the configuration or the output folder are unusable; raised before training."""


class FinetuneCancelled(FinetuneError):
    """Training was stopped on request (``cancel_event`` or :meth:`TrainingJob.cancel`)."""


@dataclasses.dataclass(frozen=True)
class CPUProfile:
    """Training settings measured fastest on CPU for models up to ``max_params`` parameters.

    Attributes:
        max_params: largest model (total parameters) the profile applies to.
        threads: torch intra-op threads; 0 means all cores.
        bf16: bf16 autocast (only where the CPU has native bf16: AVX512-bf16 or AMX).
        gradient_checkpointing: recompute activations in the backward pass.
        load_bf16: keep the frozen base weights in bf16 (the LoRA weights stay fp32).
    """

    max_params: float
    threads: int
    bf16: bool
    gradient_checkpointing: bool
    load_bf16: bool


#: Measured CPU profiles, smallest models first (see ``benchmarks/results/finetune_speed.json``).
#: Tiny test models are dominated by per-op overhead, which extra threads only add to; models
#: of 100M+ parameters run fastest on every core with bf16 weights and no checkpointing.
CPU_PROFILES: tuple[CPUProfile, ...] = (
    CPUProfile(max_params=20e6, threads=1, bf16=False, gradient_checkpointing=False, load_bf16=False),
    CPUProfile(max_params=math.inf, threads=0, bf16=True, gradient_checkpointing=False, load_bf16=True),
)


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of one LoRA SFT run of the prompter. Every field has a documented default.

    LoRA:
        lora_r: adapter rank (must not exceed the server's ``max_lora_rank``, 16 by default).
        lora_alpha: LoRA scaling numerator (``alpha / r`` scales the update); 2 x rank.
        lora_dropout: dropout on the adapter input.
        target_modules: ``"all-linear"`` (every linear layer but the LM head: all that vLLM's
            LoRA serves for Llama-like models) or a list of module names.

    Optimisation:
        learning_rate: peak AdamW learning rate (2e-4, the usual LoRA rate; trl's 2e-5 is meant
            for full fine-tuning).
        num_epochs: passes over the records (ignored when ``max_steps`` is set).
        max_steps: optimizer steps to run; None trains ``num_epochs`` epochs.
        per_device_batch_size: sequences per forward pass (per GPU under Accelerate).
        gradient_accumulation_steps: forward passes per optimizer step.
        micro_batch_size: sequences per forward pass on CPU (None: 2). An optimizer step still
            sees ``per_device_batch_size x gradient_accumulation_steps`` sequences; a larger batch
            runs as accumulated micro-batches (the largest divisor of ``per_device_batch_size``
            not above this). Why: the logits of a 49k-token vocabulary dominate memory -- SFT of
            the 135M default model at batch 8 x 1024 tokens in one pass was OOM-killed at 18.7 GB
            on a 24 GB machine. On a GPU None keeps the whole batch in one pass. Speed only.
        lr_scheduler: transformers scheduler name.
        warmup_ratio: share of steps spent warming up.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping.
        seed: seeds LoRA initialisation, dropout and data order; same seed, same adapter.

    Data:
        max_length: longest training sequence in tokens (prompt + completion).
        overlength: what to do with a longer record: ``"truncate"`` (keep the start: the whole
            prompt and the head of the completion, like trl; a record whose prompt alone fills
            ``max_length`` is dropped), ``"drop"`` it, or raise (``"error"``). Counts go to the
            summary either way.
        deduplicate: train once on identical (messages, completion) pairs (several samples of
            one question often repeat a prompt and its critique).

    Rounds:
        init_from: ``"base"`` -- a fresh adapter on the base model each round (default), or
            ``"previous"`` -- continue training ``previous_adapter``. The paper does not say. The
            default follows STaR (Zelikman et al., 2022), which restarts from the base model
            every iteration to avoid compounding over-fitting to the model's own samples; it
            also makes each round's adapter reproducible from its records alone. Pass the
            records of earlier rounds too to keep what they taught.
        previous_adapter: the adapter folder to continue from (``init_from="previous"``). Its
            own LoRA settings (rank, targets) are kept.

    Device:
        device: ``"auto"`` (CUDA when torch sees a GPU), ``"cpu"`` or ``"cuda"``. Speed only.
        bf16: bf16 mixed precision; None: on where the hardware has native bf16 (and, on CPU,
            where the measured profile says it pays).
        gradient_checkpointing: None: off (faster; turn on when activations do not fit). Speed
            only.
        cpu_threads: torch threads on CPU; None: the measured profile's choice, capped at the
            cores idle when training starts (the machine may be shared). Speed only.
        load_bf16: keep the frozen base weights in bf16; None: on GPU with bf16, else the
            CPU profile's choice.

    Output:
        overwrite: replace an existing adapter folder (only once the new one is complete).
        progress: show trl/transformers' progress bar.
        Neither changes the adapter a run trains (both speed only, left out of run fingerprints).
    """

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = 2e-4
    num_epochs: float = 1.0
    max_steps: int | None = None
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    micro_batch_size: int | None = speed_only(default=None)
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_length: int = 1024
    overlength: Literal["truncate", "drop", "error"] = "truncate"
    deduplicate: bool = True
    init_from: Literal["base", "previous"] = "base"
    previous_adapter: str | os.PathLike | None = None
    device: Literal["auto", "cpu", "cuda"] = speed_only(default="auto")
    bf16: bool | None = None
    gradient_checkpointing: bool | None = speed_only(default=None)
    cpu_threads: int | None = speed_only(default=None)
    load_bf16: bool | None = None
    overwrite: bool = speed_only(default=False)
    progress: bool = speed_only(default=True)

    def __post_init__(self) -> None:
        problems = []
        problems += filter(None, [
            int_problem("lora_r", self.lora_r),
            int_problem("max_steps", self.max_steps, allow_none=True),
            int_problem("micro_batch_size", self.micro_batch_size, allow_none=True),
            int_problem("per_device_batch_size", self.per_device_batch_size),
            int_problem("gradient_accumulation_steps", self.gradient_accumulation_steps),
            int_problem("max_length", self.max_length, minimum=8),
            int_problem("cpu_threads", self.cpu_threads, allow_none=True),
            choice_problem("overlength", self.overlength, ("truncate", "drop", "error")),
            choice_problem("init_from", self.init_from, ("base", "previous")),
            choice_problem("device", self.device, ("auto", "cpu", "cuda")),
        ])
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not (self.target_modules == "all-linear" or (
            isinstance(self.target_modules, (list, tuple)) and self.target_modules
            and all(isinstance(name, str) for name in self.target_modules)
        )):
            problems.append(f"target_modules must be 'all-linear' or a list of names, got {self.target_modules!r}")
        if self.learning_rate <= 0:
            problems.append("learning_rate must be > 0")
        if self.max_steps is None and self.num_epochs <= 0:
            problems.append("num_epochs must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            problems.append("warmup_ratio must be in [0, 1)")
        if self.init_from == "previous" and self.previous_adapter is None:
            problems.append("init_from='previous' needs previous_adapter (the last round's adapter folder)")
        if problems:
            raise FinetuneInputError("invalid FinetuneConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with some fields changed (validated again).

        Raises:
            FinetuneInputError: an unknown field name or an invalid value.
        """
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise FinetuneInputError(f"unknown FinetuneConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        data = dataclasses.asdict(self)
        if data["previous_adapter"] is not None:
            data["previous_adapter"] = str(data["previous_adapter"])
        return data
