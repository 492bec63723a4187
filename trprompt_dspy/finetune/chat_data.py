"""Chat data: what the prompter sends for a record, and what it must answer.

Each rollout record becomes the chat the prompter's own DSPy adapter builds for a
``GeneratePrompt`` call (``question`` = the record's question, ``textual_reward`` = its critique;
the predictor's signature and demos), plus the assistant message the adapter expects back.
``ChatAdapter`` gives ``[[ ## prompt ## ]] ... [[ ## completed ## ]]``; ``JSONAdapter`` (used with
vLLM structured outputs) gives the JSON object the model must emit -- compact,
``{"prompt":"..."}``, when the server's grammar allows no whitespace (``compact_json``).

The result is DSPy's fine-tuning data format (``TrainDataFormat.CHAT``): ``[{"messages": [...]}]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..rollout.records import RolloutRecord
from .config import FinetuneInputError

# dspy (and the prompter's module, which imports it) load inside the functions below: importing
# the finetune package -- e.g. for FinetuneConfig when the CLI reads a config file -- does not
# pay for dspy/litellm until chats are built.


def prompter_predictor(prompter: Any) -> Any:
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


def resolve_adapter(adapter: Any) -> Any:
    """The DSPy adapter a prompter runs under: ``adapter``, else ``dspy.settings.adapter``, else
    ``ChatAdapter``."""
    import dspy

    # The same choice dspy.Predict makes at call time.
    return adapter if adapter is not None else (dspy.settings.adapter or dspy.ChatAdapter())


def compact_json_completion(signature: Any, outputs: Mapping[str, Any]) -> str:
    """The JSON object a schema-constrained server emits for ``outputs``: fields in signature
    order, no whitespace between tokens (vLLM's ``disable_any_whitespace``, the default of
    :class:`trprompt_dspy.infra.serving.ServerConfig`), non-ASCII characters as they are."""
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

    predictor = prompter_predictor(prompter)
    adapter = resolve_adapter(adapter)
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


def check_chat_data(chat_data: Sequence[Mapping[str, Any]]) -> None:
    """Refuse data that is not ``[{"messages": [..., non-empty assistant message]}, ...]``."""
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
