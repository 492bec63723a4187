"""LoRA SFT of the prompter on rollout records (peft + trl)."""

from .trainer import (
    FinetuneCancelled,
    FinetuneConfig,
    FinetuneError,
    FinetuneInputError,
    FinetuneResult,
    finetune_prompter,
    format_prompter_example,
    records_to_chat_data,
    train_lora,
)

__all__ = [
    "FinetuneCancelled", "FinetuneConfig", "FinetuneError", "FinetuneInputError", "FinetuneResult",
    "finetune_prompter", "format_prompter_example", "records_to_chat_data", "train_lora",
]
