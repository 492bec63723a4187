"""LoRA SFT of the prompter (peft + trl) on rollout records, trained on exactly the text the
prompter sees at inference.

TRPrompt trains the prompt model by hindsight relabelling with text: every prompt the prompter
wrote is paired with the critique it earned, and the prompter learns to write that prompt when
conditioned on that critique. This module turns :class:`RolloutRecord`\\ s into that training
data and trains a LoRA adapter that :meth:`trprompt_dspy.infra.serving.server.VLLMServer.load_adapter` serves::

    result = finetune_prompter(records, "runs/x/adapters/r1", model="default", prompter=prompter)
    server.load_adapter("prompter-r1", result.adapter_dir)
    prompter.set_lm(server.lm("prompter-r1"))

What makes training equal inference
-----------------------------------
* **Messages.** Each record becomes the chat the prompter's own DSPy adapter builds for a
  ``GeneratePrompt`` call (``question`` = the record's question, ``textual_reward`` = its
  critique; the predictor's signature and demos), plus the assistant message the adapter expects
  back. ``ChatAdapter`` gives ``[[ ## prompt ## ]] ... [[ ## completed ## ]]``; ``JSONAdapter``
  (used with vLLM structured outputs) gives the JSON object the model must emit -- compact,
  ``{"prompt":"..."}``, when the server's grammar allows no whitespace (``compact_json``).
* **Tokens.** The prompt part is the chat template rendered with ``add_generation_prompt=True``
  and tokenized without special tokens -- what vLLM's ``/v1/chat/completions`` does. The
  completion is the assistant turn as the model's own chat template writes it, cut right after
  the first stop token (vLLM stops there, so the template's trailing newline is never generated).
  Loss falls on the completion tokens only.

Device handling
---------------
On a GPU the base model is loaded in bf16 (where supported) and trained without gradient
checkpointing unless asked. On CPU the settings come from :data:`CPU_PROFILES`, measured on the
project's 2-core AVX512-bf16 machine (``benchmarks/finetune_speed.py``,
``benchmarks/results/finetune_speed.json``); every one can be overridden in
:class:`FinetuneConfig`.

Multi-GPU: the same trainer runs under Accelerate (DDP), one process per GPU::

    accelerate launch --num_processes 4 -m trprompt_dspy.finetune \\
        --records runs/x/rollouts/r1.jsonl --output runs/x/adapters/r1 --model /path/to/model

Every process trains on its shard of each batch (``per_device_batch_size`` is per GPU); only the
main process writes the adapter.

Output
------
``output_dir`` receives ``adapter_config.json``, ``adapter_model.safetensors`` and
``training_summary.json`` (never pickles, no tokenizer: the adapter adds no tokens). Training
writes into a hidden temporary sibling folder and renames it into place when finished, so an
interrupted run leaves nothing at ``output_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ..infra.adapters import ADAPTER_FILES, SUMMARY_FILE
from ..infra.checks import choice_problem, int_problem
from ..infra.device import DeviceError, cpu_has_native_bf16, idle_cores, resolve_device
from ..rollout.records import RolloutRecord, read_records

logger = logging.getLogger(__name__)

_SUMMARY_FORMAT = 1


class FinetuneError(RuntimeError):
    """Fine-tuning failed or was cancelled; nothing was written at the output folder."""


class FinetuneInputError(ValueError):
    """The records, the configuration or the output folder are unusable; raised before training."""


class FinetuneCancelled(FinetuneError):
    """Training was stopped on request (``cancel_event`` or :meth:`TrainingJob.cancel`)."""


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


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
            on a 24 GB machine. On a GPU None keeps the whole batch in one pass.
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
        device: ``"auto"`` (CUDA when torch sees a GPU), ``"cpu"`` or ``"cuda"``.
        bf16: bf16 mixed precision; None: on where the hardware has native bf16 (and, on CPU,
            where the measured profile says it pays).
        gradient_checkpointing: None: off (faster; turn on when activations do not fit).
        cpu_threads: torch threads on CPU; None: the measured profile's choice, capped at the
            cores idle when training starts (the machine may be shared).
        load_bf16: keep the frozen base weights in bf16; None: on GPU with bf16, else the
            CPU profile's choice.

    Output:
        overwrite: replace an existing adapter folder (only once the new one is complete).
        progress: show trl/transformers' progress bar.
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
    micro_batch_size: int | None = None
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    cpu_threads: int | None = None
    load_bf16: bool | None = None
    overwrite: bool = False
    progress: bool = True

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


# --------------------------------------------------------------------------------------------
# chat data: what the prompter sends and what it must answer
# --------------------------------------------------------------------------------------------


def _prompter_predictor(prompter: Any) -> Any:
    """The ``dspy.Predict`` that writes prompts: from a QueryAwarePrompter, or the predictor itself."""
    import dspy

    if prompter is None:
        from ..modules.predictor import PromptGenerator

        return PromptGenerator()
    if isinstance(prompter, dspy.Predict):
        return prompter
    generate = getattr(prompter, "generate", None)
    if isinstance(generate, dspy.Predict):
        return generate
    raise TypeError(
        f"prompter must be a QueryAwarePrompter or a dspy.Predict over GeneratePrompt, got {type(prompter).__name__}"
    )


def _resolve_adapter(adapter: Any) -> Any:
    import dspy

    # The same choice dspy.Predict makes at call time.
    return adapter if adapter is not None else (dspy.settings.adapter or dspy.ChatAdapter())


def compact_json_completion(signature: Any, outputs: Mapping[str, Any]) -> str:
    """The JSON object a schema-constrained server emits for ``outputs``: fields in signature
    order, no whitespace between tokens (vLLM's ``disable_any_whitespace``, the default of
    :class:`trprompt_dspy.infra.serving.server.ServerConfig`), non-ASCII characters as they are."""
    from dspy.adapters.utils import serialize_for_json

    ordered = {name: serialize_for_json(outputs[name]) for name in signature.output_fields if name in outputs}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def format_prompter_example(
    record: RolloutRecord,
    *,
    prompter: Any = None,
    adapter: Any = None,
    compact_json: bool = True,
) -> dict[str, list[dict[str, str]]]:
    """The chat messages of one training example, in DSPy's fine-tuning data format.

    The system and user messages are what ``prompter`` sends when called with the record's
    question and its critique as the textual reward (same signature, same demos, same adapter);
    the final assistant message is what the model must answer for the adapter to parse
    ``prompt=record.prompt``.

    Args:
        record: the rollout record.
        prompter: a ``QueryAwarePrompter`` or its predictor (default: a fresh ``PromptGenerator``).
        adapter: the DSPy adapter the prompter runs with; default: ``dspy.settings.adapter`` or
            ``ChatAdapter``, as ``dspy.Predict`` picks it. ``JSONAdapter`` is supported too.
        compact_json: with a ``JSONAdapter``, write the answer as the server's JSON grammar
            forces it: ``{"prompt":"..."}`` without whitespace when the server runs with
            ``compact_json=True`` (its default), else the adapter's own indented form, which is
            what a model writes when nothing constrains it. Ignored for other adapters.

    Returns:
        ``{"messages": [system, user, ..., assistant]}`` (``TrainDataFormat.CHAT``).
    """
    import dspy

    predictor = _prompter_predictor(prompter)
    adapter = _resolve_adapter(adapter)
    signature = predictor.signature
    demos = list(predictor.demos)
    inputs = {"question": record.question, "textual_reward": record.critique}
    outputs = {"prompt": record.prompt}
    if isinstance(adapter, dspy.JSONAdapter):
        # dspy 3.4's JSONAdapter has no format_finetune_data; this is ChatAdapter's recipe.
        messages = adapter.format(signature=signature, demos=demos, inputs=inputs)
        if compact_json:
            content = compact_json_completion(signature, outputs)
        else:
            content = adapter.format_assistant_message_content(signature=signature, outputs=outputs)
        return {"messages": [*messages, {"role": "assistant", "content": content}]}
    try:
        return adapter.format_finetune_data(signature=signature, demos=demos, inputs=inputs, outputs=outputs)
    except NotImplementedError:
        messages = adapter.format(signature=signature, demos=demos, inputs=inputs)
        content = adapter.format_assistant_message_content(signature=signature, outputs=outputs)
        return {"messages": [*messages, {"role": "assistant", "content": content}]}


def records_to_chat_data(
    records: Sequence[RolloutRecord],
    *,
    prompter: Any = None,
    adapter: Any = None,
    compact_json: bool = True,
) -> list[dict[str, list[dict[str, str]]]]:
    """:func:`format_prompter_example` over records, after checking them.

    Raises:
        FinetuneInputError: no records, or a record with an empty question, prompt or critique.
    """
    records = list(records)
    if not records:
        raise FinetuneInputError("no rollout records to train on")
    for index, record in enumerate(records):
        if not isinstance(record, RolloutRecord):
            raise FinetuneInputError(f"record {index} is a {type(record).__name__}, not a RolloutRecord")
        for name in ("question", "prompt", "critique"):
            value = getattr(record, name)
            if not isinstance(value, str) or not value.strip():
                raise FinetuneInputError(f"record {index} has an empty or non-string {name}: {value!r}")
    return [
        format_prompter_example(record, prompter=prompter, adapter=adapter, compact_json=compact_json)
        for record in records
    ]


def _check_chat_data(chat_data: Sequence[Mapping[str, Any]]) -> None:
    if not chat_data:
        raise FinetuneInputError("no training examples")
    for index, example in enumerate(chat_data):
        messages = example.get("messages") if isinstance(example, Mapping) else None
        if not isinstance(messages, list) or len(messages) < 2:
            raise FinetuneInputError(f"example {index} must be {{'messages': [..., assistant]}} with at least 2 messages")
        for message in messages:
            if not isinstance(message, Mapping) or not isinstance(message.get("content"), str) or "role" not in message:
                raise FinetuneInputError(f"example {index}: every message needs a role and string content")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise FinetuneInputError(f"example {index}: the last message must be a non-empty assistant message")


# --------------------------------------------------------------------------------------------
# tokenization: the ids vLLM sees, then the ids the model must produce
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenizedExample:
    """Token ids of one example: ``prompt_ids`` (no loss) then ``completion_ids`` (loss)."""

    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def stop_token_strings(tokenizer: Any, model_dir: str | os.PathLike | None = None) -> list[str]:
    """Text of every token that ends generation: the tokenizer's EOS and the model's
    ``generation_config.json`` ``eos_token_id`` (vLLM stops on all of them)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_dir is not None:
        config_file = Path(model_dir) / "generation_config.json"
        with contextlib.suppress(OSError, ValueError):
            eos = json.loads(config_file.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return [tokenizer.convert_ids_to_tokens(int(token_id)) for token_id in sorted(ids)]


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text vLLM builds for a chat request: the chat template with the generation prompt."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def tokenize_chat_example(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    stop_strings: Sequence[str],
) -> TokenizedExample:
    """Split one chat (ending with the assistant message) into prompt and completion ids.

    The prompt is rendered and tokenized as vLLM renders a chat request (template with
    ``add_generation_prompt=True``, then no extra special tokens). The completion is the rest of
    the conversation as the template renders it, cut right after the first stop token: what the
    model must generate for vLLM to return exactly the assistant content.

    Raises:
        FinetuneInputError: the template renders the prompt differently inside the full chat, so
            no completion boundary exists.
    """
    prompt_messages, last = list(messages[:-1]), messages[-1]
    prompt_text = render_prompt(tokenizer, prompt_messages)
    full_text = tokenizer.apply_chat_template([*prompt_messages, dict(last)], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise FinetuneInputError(
            "the chat template renders the prompt differently when the assistant reply follows, so the "
            "completion boundary is undefined; use a model whose template appends the assistant turn"
        )
    completion_text = full_text[len(prompt_text):]
    cut = min((completion_text.find(stop) + len(stop) for stop in stop_strings if stop in completion_text), default=-1)
    if cut >= 0:
        completion_text = completion_text[:cut]
    elif stop_strings:
        # The template writes no stop token after the reply; the model must still learn to stop.
        completion_text += stop_strings[0]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return TokenizedExample(list(prompt_ids), list(completion_ids))


@dataclasses.dataclass
class PreparedData:
    """Training sequences plus what happened to the examples on the way (for the summary)."""

    examples: list[TokenizedExample]
    stats: dict[str, int]


def prepare_examples(
    chat_data: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    config: FinetuneConfig,
    *,
    stop_strings: Sequence[str],
) -> PreparedData:
    """Deduplicate, tokenize and apply the over-length policy.

    Raises:
        FinetuneInputError: no examples; more than one example but all identical; over-length
            examples with ``overlength="error"``; nothing left to train on.
    """
    _check_chat_data(chat_data)
    seen, unique = set(), []
    for example in chat_data:
        key = json.dumps(example["messages"], sort_keys=True, ensure_ascii=False)
        if key in seen and config.deduplicate:
            continue
        seen.add(key)
        unique.append(example)
    if len(chat_data) > 1 and len(seen) == 1:
        raise FinetuneInputError(
            f"all {len(chat_data)} examples are identical (same question, critique and prompt); "
            "nothing to learn from -- check the rollout stage"
        )
    tokenized = [tokenize_chat_example(tokenizer, example["messages"], stop_strings) for example in unique]
    over = [i for i, example in enumerate(tokenized) if example.length > config.max_length]
    if over and config.overlength == "error":
        longest = max(tokenized[i].length for i in over)
        raise FinetuneInputError(
            f"{len(over)} of {len(tokenized)} examples are longer than max_length={config.max_length} tokens "
            f"(longest {longest}); raise max_length or set overlength='truncate' or 'drop'"
        )
    kept, truncated, dropped = [], 0, 0
    for example in tokenized:
        if example.length <= config.max_length:
            kept.append(example)
        elif config.overlength == "drop" or len(example.prompt_ids) >= config.max_length:
            dropped += 1  # nothing of the completion would be left to learn from
        else:
            room = config.max_length - len(example.prompt_ids)
            kept.append(TokenizedExample(example.prompt_ids, example.completion_ids[:room]))
            truncated += 1
    if truncated or dropped:
        logger.warning(
            "%d example(s) longer than max_length=%d: %d truncated, %d dropped",
            truncated + dropped, config.max_length, truncated, dropped,
        )
    if not kept:
        raise FinetuneInputError(
            f"every example is longer than max_length={config.max_length} tokens in its prompt alone; raise max_length"
        )
    lengths = [example.length for example in kept]
    stats = {
        "input_examples": len(chat_data),
        "duplicates_removed": len(chat_data) - len(unique),
        "unique_examples": len(unique),
        "overlength": len(over),
        "truncated": truncated,
        "dropped_overlength": dropped,
        "train_examples": len(kept),
        "prompt_tokens": sum(len(example.prompt_ids) for example in kept),
        "completion_tokens": sum(len(example.completion_ids) for example in kept),
        "max_sequence_tokens": max(lengths),
        "mean_sequence_tokens": round(sum(lengths) / len(lengths), 1),
    }
    return PreparedData(kept, stats)


# --------------------------------------------------------------------------------------------
# device settings
# --------------------------------------------------------------------------------------------


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
        return dataclasses.asdict(self)


def resolve_device_settings(config: FinetuneConfig, model_dir: str) -> DeviceSettings:
    """Resolve the automatic device settings of ``config`` for a model.

    Raises:
        FinetuneInputError: ``device="cuda"`` without a GPU, or bf16 asked for on hardware
            without it.
    """
    import torch

    try:
        device = resolve_device(config.device)
    except DeviceError as error:
        raise FinetuneInputError(str(error)) from error
    if device == "cuda":
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
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# output folder
# --------------------------------------------------------------------------------------------


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FinetuneInputError(f"output folder {output_dir} exists and is not a folder")
    if output_dir.exists() and not overwrite:
        raise FinetuneInputError(f"output folder {output_dir} already exists; pick a new folder or set overwrite=True")
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FinetuneInputError(f"cannot create the output folder's parent {parent}: {error}") from error
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FinetuneInputError(f"output folder's parent {parent} is not writable")


def _make_staging_dir(output_dir: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    except OSError as error:
        raise FinetuneInputError(f"cannot write into {output_dir.parent}: {error}") from error


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Move a finished adapter folder into place; an existing one goes only after the new one is in."""
    if output_dir.exists():
        if not overwrite:
            raise FinetuneError(f"{output_dir} appeared while training; the new adapter stays in {staging}")
        old = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output_dir, old)
        os.replace(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output_dir)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneResult:
    """A finished run: the adapter folder and its training summary.

    Attributes:
        adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``; pass
            it to ``VLLMServer.load_adapter``.
        summary: the training summary (also in ``adapter_dir / "training_summary.json"``).
    """

    adapter_dir: Path
    summary: dict[str, Any]

    @property
    def summary_path(self) -> Path:
        return self.adapter_dir / SUMMARY_FILE

    @property
    def loss_curve(self) -> list[float]:
        """Training loss at every logged step."""
        return [entry["loss"] for entry in self.summary["loss_curve"]]


def _make_callbacks(cancel_event: threading.Event | None, extra: Sequence[Any]) -> tuple[list[Any], dict]:
    from transformers import TrainerCallback

    state: dict[str, Any] = {"log": [], "cancelled": False, "step_seconds": [], "step_started": None}

    class _Recorder(TrainerCallback):
        def on_step_begin(self, args, trainer_state, control, **kwargs):
            state["step_started"] = time.perf_counter()

        # Keeps the loss curve for the summary; trl/transformers print it too.
        def on_log(self, args, trainer_state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                entry = {"step": trainer_state.global_step, "loss": float(logs["loss"])}
                for key in ("learning_rate", "grad_norm"):
                    if key in logs:
                        entry[key] = float(logs[key])
                state["log"].append(entry)

        def on_step_end(self, args, trainer_state, control, **kwargs):
            if state["step_started"] is not None:
                state["step_seconds"].append(round(time.perf_counter() - state["step_started"], 4))
            if cancel_event is not None and cancel_event.is_set():
                state["cancelled"] = True
                control.should_training_stop = True

    return [_Recorder(), *extra], state


class _CountingCollator:
    """Wraps trl's collator to count the tokens every step really processed (for tokens/s)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.tokens = 0
        self.loss_tokens = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.tokens += int(batch["attention_mask"].sum())
        self.loss_tokens += int((batch["labels"] != -100).sum())
        return batch


def _load_model(model_dir: str, settings: DeviceSettings) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if settings.load_bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model


def _wrap_lora(model: Any, config: FinetuneConfig) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.init_from == "previous":
        previous = Path(config.previous_adapter)
        return PeftModel.from_pretrained(model, str(previous), is_trainable=True)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _check_previous_adapter(config: FinetuneConfig) -> None:
    if config.init_from != "previous":
        return
    folder = Path(config.previous_adapter)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise FinetuneInputError(
            f"previous_adapter {folder} is not an adapter folder (needs adapter_config.json and adapter_model.safetensors)"
        )


def train_lora(
    chat_data: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    *,
    model: str | os.PathLike = "default",
    config: FinetuneConfig | None = None,
    cancel_event: threading.Event | None = None,
    callbacks: Sequence[Any] = (),
    metadata: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Train a LoRA adapter on chat examples in DSPy's fine-tuning format (completion-only loss).

    This is the engine under :func:`finetune_prompter` and the DSPy provider; it takes any
    ``[{"messages": [..., {"role": "assistant", ...}]}]`` data, e.g. what
    ``adapter.format_finetune_data`` returns.

    Args:
        chat_data: examples; the last message of each is the target.
        output_dir: adapter folder to create (must not exist unless ``config.overwrite``).
        model: base model: ``"default"``, a model folder, a ``.gguf`` file (see
            :func:`trprompt_dspy.infra.models.resolve_model`).
        config: training settings (default :class:`FinetuneConfig`).
        cancel_event: set it to stop after the current step; then :class:`FinetuneCancelled`.
        callbacks: extra ``transformers.TrainerCallback``\\ s.
        metadata: extra JSON-ready fields stored in the summary under ``"metadata"``.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        FinetuneInputError: bad data, configuration or output folder -- before any training.
        FinetuneCancelled: ``cancel_event`` was set; nothing is written at ``output_dir``.
    """
    config = config or FinetuneConfig()
    started = time.monotonic()
    # Everything that can be checked cheaply is checked before the model is loaded.
    _check_chat_data(chat_data)
    output_dir, model_dir = _check_run(output_dir, model, config)
    tokenizer = _load_tokenizer(model_dir)
    stops = stop_token_strings(tokenizer, model_dir)
    prepared = prepare_examples(chat_data, tokenizer, config, stop_strings=stops)
    return _run(prepared, tokenizer, model_dir, output_dir, config, cancel_event, callbacks, metadata, stops, started)


def train_lora_on_tokens(
    examples: Sequence[TokenizedExample],
    output_dir: str | os.PathLike,
    *,
    model: str | os.PathLike = "default",
    config: FinetuneConfig | None = None,
    cancel_event: threading.Event | None = None,
    callbacks: Sequence[Any] = (),
    metadata: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Train on already tokenized examples (loss on ``completion_ids``); used by benchmarks
    that need sequences of an exact length. Same output and errors as :func:`train_lora`;
    the examples are used as given (no deduplication, no over-length policy)."""
    config = config or FinetuneConfig()
    started = time.monotonic()
    if not examples:
        raise FinetuneInputError("no training examples")
    if any(not example.completion_ids for example in examples):
        raise FinetuneInputError("every example needs at least one completion token")
    output_dir, model_dir = _check_run(output_dir, model, config)
    tokenizer = _load_tokenizer(model_dir)
    lengths = [example.length for example in examples]
    stats = {
        "input_examples": len(examples),
        "train_examples": len(examples),
        "prompt_tokens": sum(len(example.prompt_ids) for example in examples),
        "completion_tokens": sum(len(example.completion_ids) for example in examples),
        "max_sequence_tokens": max(lengths),
        "mean_sequence_tokens": round(sum(lengths) / len(lengths), 1),
    }
    prepared = PreparedData(list(examples), stats)
    stops = stop_token_strings(tokenizer, model_dir)
    return _run(prepared, tokenizer, model_dir, output_dir, config, cancel_event, callbacks, metadata, stops, started)


def _check_run(output_dir: str | os.PathLike, model: str | os.PathLike, config: FinetuneConfig) -> tuple[Path, str]:
    from ..infra.models import ModelNotAvailableError, resolve_model

    output_dir = Path(output_dir).expanduser().absolute()
    _check_output_dir(output_dir, config.overwrite)
    _check_previous_adapter(config)
    try:
        model_dir = resolve_model(model)
    except ModelNotAvailableError as error:
        raise FinetuneInputError(str(error)) from error
    if not Path(model_dir).is_dir():
        raise FinetuneInputError(f"training needs a local model folder; {model_dir!r} is not one")
    return output_dir, model_dir


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise FinetuneInputError(f"the tokenizer of {model_dir} has no chat template; the prompter's chats need one")
    return tokenizer


def _run(
    prepared: PreparedData,
    tokenizer: Any,
    model_dir: str,
    output_dir: Path,
    config: FinetuneConfig,
    cancel_event: threading.Event | None,
    callbacks: Sequence[Any],
    metadata: Mapping[str, Any] | None,
    stops: list[str],
    started: float,
) -> FinetuneResult:
    settings = resolve_device_settings(config, model_dir)
    staging = _make_staging_dir(output_dir)
    try:
        with _torch_threads(settings.cpu_threads):
            summary = _train(prepared, tokenizer, model_dir, config, settings, staging, cancel_event, callbacks)
        summary.update(
            {
                "format": _SUMMARY_FORMAT,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "base_model": model_dir,
                "adapter_dir": str(output_dir),
                "stop_tokens": stops,
                "examples": prepared.stats,
                "wall_seconds": round(time.monotonic() - started, 2),
                "config": config.to_dict(),
                "device": settings.to_dict(),
                "versions": _versions(),
                "metadata": dict(metadata or {}),
            }
        )
        if not _is_main_process():
            # Under `accelerate launch` only the main process writes the adapter.
            shutil.rmtree(staging, ignore_errors=True)
            return FinetuneResult(output_dir, summary)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        _publish(staging, output_dir, config.overwrite)
    except BaseException:
        # An interrupted or failed run leaves nothing behind, least of all at output_dir.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "adapter written to %s: %d steps, loss %s -> %s, %.1f s",
        output_dir, summary["steps"], summary["first_loss"], summary["final_loss"], summary["wall_seconds"],
    )
    return FinetuneResult(output_dir, summary)


def _train(
    prepared: PreparedData,
    tokenizer: Any,
    model_dir: str,
    config: FinetuneConfig,
    settings: DeviceSettings,
    staging: Path,
    cancel_event: threading.Event | None,
    extra_callbacks: Sequence[Any],
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    set_seed(config.seed)
    model = _wrap_lora(_load_model(model_dir, settings), config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list(
        [
            {"input_ids": ex.prompt_ids + ex.completion_ids, "completion_mask": [0] * len(ex.prompt_ids) + [1] * len(ex.completion_ids)}
            for ex in prepared.examples
        ]
    )
    micro = micro_batch_size(config, settings.device)
    args = SFTConfig(
        output_dir=str(staging / "trainer"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=config.gradient_accumulation_steps * (config.per_device_batch_size // micro),
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=settings.device == "cpu",
        bf16=settings.bf16,
        gradient_checkpointing=settings.gradient_checkpointing,
        # The examples are already tokenized and cut to max_length by prepare_examples.
        max_length=None,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
    )
    collator = _CountingCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    callbacks, state = _make_callbacks(cancel_event, extra_callbacks)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
    )
    train_started = time.monotonic()
    output = trainer.train()
    train_seconds = time.monotonic() - train_started
    if state["cancelled"]:
        raise FinetuneCancelled(f"training cancelled after {trainer.state.global_step} steps; no adapter written")

    if trainer.is_world_process_zero():
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(staging), safe_serialization=True)
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    for path in staging.iterdir():
        # peft also writes a README model card; the folder keeps weights and JSON only.
        if path.name not in ADAPTER_FILES:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    losses = state["log"]
    steps = trainer.state.global_step
    trainable, total = _count_parameters(trainer.model)
    return {
        "steps": steps,
        "epochs": round(float(trainer.state.epoch or 0.0), 3),
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "mean_train_loss": float(output.training_loss),
        "loss_curve": losses,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / steps, 4) if steps else None,
        # The first step carries one-off costs (kernel selection, allocator warm-up).
        "steady_seconds_per_step": _steady(state["step_seconds"]),
        "step_seconds": state["step_seconds"],
        "tokens_processed": collator.tokens,
        "loss_tokens_processed": collator.loss_tokens,
        "tokens_per_second": round(collator.tokens / train_seconds, 1) if train_seconds > 0 else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def _steady(step_seconds: list[float]) -> float | None:
    """Median step time without the first step (None with fewer than 2 steps)."""
    times = sorted(step_seconds[1:])
    if not times:
        return None
    middle = len(times) // 2
    return round(times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2, 4)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "dspy-ai"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def finetune_prompter(
    records: Sequence[RolloutRecord],
    output_dir: str | os.PathLike,
    *,
    model: str | os.PathLike = "default",
    config: FinetuneConfig | None = None,
    prompter: Any = None,
    adapter: Any = None,
    compact_json: bool = True,
    cancel_event: threading.Event | None = None,
    callbacks: Sequence[Any] = (),
) -> FinetuneResult:
    """Train the prompter's LoRA adapter on rollout records (TRPrompt's SFT step).

    Each record teaches: given ``question`` and ``critique`` (as the textual reward), write
    ``prompt``. The chats are formatted by the prompter's own DSPy adapter
    (:func:`format_prompter_example`), so serving the adapter behind the same prompter reproduces
    the trained behaviour.

    Args:
        records: rollout records (see :class:`RolloutRecord`, :func:`read_records`).
        output_dir: adapter folder to create.
        model: base model of the prompter (what the vLLM server serves).
        config: :class:`FinetuneConfig`.
        prompter: the ``QueryAwarePrompter`` (or its predictor) that will use the adapter; its
            signature and demos shape the messages. Default: a fresh one.
        adapter: the DSPy adapter the prompter runs under (default: ``dspy.settings.adapter`` or
            ``ChatAdapter``). Pass ``dspy.JSONAdapter()`` when it runs with structured outputs.
        compact_json: with ``JSONAdapter``: the serving ``ServerConfig.compact_json`` (see
            :func:`format_prompter_example`).
        cancel_event: set to stop training (raises :class:`FinetuneCancelled`).
        callbacks: extra ``transformers.TrainerCallback``\\ s.

    Returns:
        A :class:`FinetuneResult` (``adapter_dir``, ``summary``).

    Raises:
        FinetuneInputError: empty or all-identical records, an empty field, records whose
            prompt alone exceeds ``max_length`` (or any over-length with ``overlength="error"``),
            an existing or unwritable output folder -- all before training starts.
    """
    chat_data = records_to_chat_data(records, prompter=prompter, adapter=adapter, compact_json=compact_json)
    resolved = _resolve_adapter(adapter)
    adapter_name = type(resolved).__name__
    predictor = _prompter_predictor(prompter)
    import dspy

    metadata = {
        "source": "rollout_records",
        "dspy_adapter": adapter_name,
        "compact_json": bool(compact_json) if isinstance(resolved, dspy.JSONAdapter) else None,
        "signature": predictor.signature.__name__,
        "demos": len(predictor.demos),
        "records": len(records),
        "correct_records": sum(1 for record in records if record.correct),
    }
    return train_lora(
        chat_data, output_dir, model=model, config=config, cancel_event=cancel_event,
        callbacks=callbacks, metadata=metadata,
    )


# --------------------------------------------------------------------------------------------
# command line (also the entry point for `accelerate launch -m trprompt_dspy.finetune`)
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m trprompt_dspy.finetune``."""
    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(
        prog="python -m trprompt_dspy.finetune",
        description="LoRA SFT of the TRPrompt prompter on rollout records (JSON lines).",
    )
    parser.add_argument("--records", required=True, help="rollout records, one JSON object per line")
    parser.add_argument("--output", required=True, help="adapter folder to create")
    parser.add_argument("--model", default="default", help="base model: 'default', a folder or a .gguf file")
    parser.add_argument("--adapter", choices=("chat", "json"), default="chat",
                        help="DSPy adapter the prompter runs with (json: JSONAdapter with structured outputs)")
    parser.add_argument("--json-style", choices=("compact", "indented"), default="compact",
                        help="with --adapter json: the server's JSON grammar (compact: ServerConfig.compact_json)")
    for field in dataclasses.fields(FinetuneConfig):
        if field.name in ("target_modules", "previous_adapter", "progress", "overwrite"):
            continue
        value = getattr(defaults, field.name)
        kind = {bool: _parse_bool, int: int, float: float}.get(type(value), str)
        if field.name in ("bf16", "gradient_checkpointing", "load_bf16"):
            kind = _parse_bool
        elif field.name in ("max_steps", "cpu_threads"):
            kind = int
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None, help=f"default: {value}")
    parser.add_argument("--target-modules", default=None, help="comma-separated module names, or all-linear")
    parser.add_argument("--previous-adapter", default=None, help="adapter to continue (with --init-from previous)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the summary path. Exit status 2 on bad input."""
    import dspy

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    changes = {}
    for field in dataclasses.fields(FinetuneConfig):
        value = getattr(args, field.name, None)
        if value is not None and field.name not in ("target_modules", "progress", "overwrite"):
            changes[field.name] = value
    if args.target_modules:
        changes["target_modules"] = (
            "all-linear" if args.target_modules == "all-linear" else [n.strip() for n in args.target_modules.split(",")]
        )
    changes["overwrite"] = args.overwrite
    changes["progress"] = not args.no_progress
    try:
        config = FinetuneConfig(**changes)
        records = read_records(args.records)
        adapter = dspy.JSONAdapter() if args.adapter == "json" else dspy.ChatAdapter()
        result = finetune_prompter(records, args.output, model=args.model, config=config, adapter=adapter,
                                   compact_json=args.json_style == "compact")
    except FinetuneInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
