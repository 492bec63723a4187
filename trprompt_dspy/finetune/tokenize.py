"""Tokenization: the ids vLLM sees for a chat, then the ids the model must produce.

The prompt part is the chat template rendered with ``add_generation_prompt=True`` and tokenized
without special tokens -- what vLLM's ``/v1/chat/completions`` does. The completion is the
assistant turn as the model's own chat template writes it, cut right after the first stop token
(vLLM stops there, so the template's trailing newline is never generated). Loss falls on the
completion tokens only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .chat_data import check_chat_data
from .config import FinetuneConfig, FinetuneInputError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizedExample:
    """Token ids of one example: ``prompt_ids`` (no loss) then ``completion_ids`` (loss)."""

    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def length(self) -> int:
        """Tokens in the whole sequence (prompt + completion)."""
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
    check_chat_data(chat_data)
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
    stats = {
        "input_examples": len(chat_data),
        "duplicates_removed": len(chat_data) - len(unique),
        "unique_examples": len(unique),
        "overlength": len(over),
        "truncated": truncated,
        "dropped_overlength": dropped,
        **token_stats(kept),
    }
    return PreparedData(kept, stats)


def token_stats(examples: Sequence[TokenizedExample]) -> dict[str, Any]:
    """Example count and token counts of training sequences (the summary's ``examples`` tail)."""
    lengths = [example.length for example in examples]
    return {
        "train_examples": len(examples),
        "prompt_tokens": sum(len(example.prompt_ids) for example in examples),
        "completion_tokens": sum(len(example.completion_ids) for example in examples),
        "max_sequence_tokens": max(lengths),
        "mean_sequence_tokens": round(sum(lengths) / len(lengths), 1),
    }
