"""LoRA SFT of the prompter on rollout records (peft + trl).

The files read in the order data flows: :mod:`.config` (settings, CPU profiles, errors),
:mod:`.chat_data` (records -> the chats the prompter's DSPy adapter sends), :mod:`.tokenize`
(chats -> the token ids vLLM sees, loss on the completion), :mod:`.device` (device settings),
:mod:`.output` (the staged adapter folder), :mod:`.trainer` (trl/peft training), and
:mod:`.dspy_provider` (the trainer behind DSPy's ``lm.finetune``). ``python -m
trprompt_dspy.finetune`` is the command line (:mod:`.__main__`).
"""

from .chat_data import (
    compact_json_completion,
    format_prompter_example,
    records_to_chat_data,
)
from .config import (
    CPU_PROFILES,
    CPUProfile,
    FinetuneCancelled,
    FinetuneConfig,
    FinetuneError,
    FinetuneInputError,
)
from .device import DeviceSettings, resolve_device_settings
from .tokenize import (
    TokenizedExample,
    prepare_examples,
    render_prompt,
    stop_token_strings,
    tokenize_chat_example,
)
from .trainer import FinetuneResult, finetune_prompter, train_lora, train_lora_on_tokens

__all__ = [
    "CPU_PROFILES", "CPUProfile", "DeviceSettings", "FinetuneCancelled", "FinetuneConfig", "FinetuneError",
    "FinetuneInputError", "FinetuneResult", "TokenizedExample", "compact_json_completion", "finetune_prompter",
    "format_prompter_example", "prepare_examples", "records_to_chat_data", "render_prompt",
    "resolve_device_settings", "stop_token_strings", "tokenize_chat_example", "train_lora", "train_lora_on_tokens",
]
