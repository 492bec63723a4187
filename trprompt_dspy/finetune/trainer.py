"""LoRA SFT of the prompter (peft + trl) on rollout records, trained on exactly the text the
prompter sees at inference.

TRPrompt trains the prompt model by hindsight relabelling with text: every prompt the prompter
wrote is paired with the critique it earned, and the prompter learns to write that prompt when
conditioned on that critique. :func:`finetune_prompter` turns :class:`RolloutRecord`\\ s into that
training data and trains a LoRA adapter that
:meth:`trprompt_dspy.infra.serving.VLLMServer.load_adapter` serves::

    result = finetune_prompter(records, "runs/x/adapters/r1", model="default", prompter=prompter)
    server.load_adapter("prompter-r1", result.adapter_dir)
    prompter.set_lm(server.lm("prompter-r1"))

What makes training equal inference: the messages are the prompter's own DSPy adapter's
(:mod:`.chat_data`), the tokens are vLLM's rendering of them with loss on the completion only
(:mod:`.tokenize`). Device settings come from :mod:`.device`; the output folder is staged and
published by :mod:`.output`; the callbacks, bars and per-process turn around the trl run are in
:mod:`.run_hooks`.

Multi-GPU: the same trainer runs under Accelerate (DDP), one process per GPU (``accelerate
launch -m trprompt_dspy.finetune``, see :mod:`trprompt_dspy.finetune.__main__`). Every process
trains on its shard of each batch (``per_device_batch_size`` is per GPU); only the main process
writes the adapter.

Output
------
``output_dir`` receives ``adapter_config.json``, ``adapter_model.safetensors`` and
``training_summary.json`` (never pickles, no tokenizer: the adapter adds no tokens). Training
writes into a hidden temporary sibling folder and renames it into place when finished, so an
interrupted run leaves nothing at ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..infra.adapters import ADAPTER_FILES, SUMMARY_FILE
from ..infra.model_cache import ModelNotAvailableError
from ..infra.models import resolve_model
from ..infra.runs import disk_full_as_error, versions
from ..rollout.records import RolloutRecord
from .chat_data import (
    check_chat_data,
    prompter_predictor,
    records_to_chat_data,
    resolve_adapter,
)
from .config import FinetuneCancelled, FinetuneConfig, FinetuneInputError
from .memory import fit_memory, lora_param_count
from .device import (
    DeviceSettings,
    micro_batch_size,
    resolve_device_settings,
    torch_threads,
)
from .run_hooks import CountingCollator, library_bars, make_callbacks, one_training_at_a_time, quiet_logs
from .output import check_output_dir, check_previous_adapter, make_staging_dir, publish
from .tokenize import (
    PreparedData,
    TokenizedExample,
    prepare_examples,
    stop_token_strings,
    token_stats,
)

logger = logging.getLogger(__name__)

_SUMMARY_FORMAT = 1
#: the packages whose versions the training summary records
SUMMARY_PACKAGES = ("torch", "transformers", "peft", "trl", "dspy-ai")


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


def write_untrained_adapter(model_dir: str | os.PathLike, output_dir: str | os.PathLike,
                            config: FinetuneConfig | None = None) -> Path:
    """Save an untrained LoRA adapter of ``config``'s shape (rank, targets) for ``model_dir``.

    peft initialises its B matrices to zero: served, the adapter changes nothing the model writes
    but costs what a trained adapter of that shape costs (what the dry run's probe times). The
    model is loaded in bfloat16 on the CPU to build it (only its shapes matter).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = (config or FinetuneConfig()).replace(init_from="base", previous_adapter=None)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    _wrap_lora(model, config).save_pretrained(str(output_dir), safe_serialization=True)
    return Path(output_dir)


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
    check_chat_data(chat_data)
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
    prepared = PreparedData(list(examples), {"input_examples": len(examples), **token_stats(examples)})
    stops = stop_token_strings(tokenizer, model_dir)
    return _run(prepared, tokenizer, model_dir, output_dir, config, cancel_event, callbacks, metadata, stops, started)


def _check_run(output_dir: str | os.PathLike, model: str | os.PathLike, config: FinetuneConfig) -> tuple[Path, str]:
    """The absolute output folder and the local model folder, after the checks that need no model.

    Raises:
        FinetuneInputError: unusable output folder, previous adapter or model.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    check_output_dir(output_dir, config.overwrite)
    check_previous_adapter(config)
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
    staging = make_staging_dir(output_dir)
    try:
        shown = config.progress and not any(getattr(c, "replaces_progress", False) for c in callbacks)
        with one_training_at_a_time(), torch_threads(settings.cpu_threads), library_bars(shown):
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
                "versions": versions(SUMMARY_PACKAGES),
                "metadata": dict(metadata or {}),
            }
        )
        if not _is_main_process():
            # Under `accelerate launch` only the main process writes the adapter.
            shutil.rmtree(staging, ignore_errors=True)
            return FinetuneResult(output_dir, summary)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    except BaseException:
        # An interrupted or failed run leaves nothing behind, least of all at output_dir.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # outside the clean-up above: a finished adapter that cannot be moved into place (output_dir
    # appeared meanwhile) stays in staging, as publish's error says, rather than being thrown away
    publish(staging, output_dir, config.overwrite)
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
    micro, memory = micro_batch_size(config, settings.device), None
    if settings.device == "cpu":  # before the model is loaded: a batch that cannot fit is chosen smaller
        micro, checkpointing, memory = fit_memory(
            config, model_dir, micro_batch=micro, seq_len=max(ex.length for ex in prepared.examples),
            weight_bytes=2 if settings.load_bf16 else 4, compute_bytes=2 if settings.bf16 else 4,
            gradient_checkpointing=settings.gradient_checkpointing,
            lora_params=lora_param_count(model_dir, config.lora_r))
        if memory["changed"]:
            logger.warning("SFT: %s to fit in %.1f GiB of free memory (estimated %.1f GiB)",
                           memory["changed"], memory["available_gib"], memory["estimate_gib"])
        settings = dataclasses.replace(settings, gradient_checkpointing=checkpointing)
    model = _wrap_lora(_load_model(model_dir, settings), config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list(
        [
            {"input_ids": ex.prompt_ids + ex.completion_ids, "completion_mask": [0] * len(ex.prompt_ids) + [1] * len(ex.completion_ids)}
            for ex in prepared.examples
        ]
    )
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
    collator = CountingCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    callbacks, state = make_callbacks(cancel_event, extra_callbacks)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
    )
    quiet_logs(trainer, extra_callbacks, progress=config.progress)
    train_started = time.monotonic()
    output = trainer.train()
    train_seconds = time.monotonic() - train_started
    if state["cancelled"]:
        raise FinetuneCancelled(f"training cancelled after {trainer.state.global_step} steps; no adapter written")

    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        weights = lambda: sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # noqa: E731
        with disk_full_as_error(staging.parent, "saving the adapter", weights):
            model.save_pretrained(str(staging), safe_serialization=True)
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
        "micro_batch_size": micro,
        "gradient_checkpointing": settings.gradient_checkpointing,
        # the memory check before training (memory.py): estimate, available, what it changed
        "memory": memory,
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
    import dspy

    chat_data = records_to_chat_data(records, prompter=prompter, adapter=adapter, compact_json=compact_json)
    resolved = resolve_adapter(adapter)
    adapter_name = type(resolved).__name__
    predictor = prompter_predictor(prompter)
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
