"""A DSPy adapter in which a real model writes as it does in plain chat.

Measured on Qwen2.5-Coder-0.5B-Instruct (first 50 GSM8K test questions, greedy): plain chat
("<question> Reason step by step, then write the final answer after ####.") 13/50; the same
model through the library's Solver with a JSON schema 2/50, with DSPy's ChatAdapter 2/50. Inside
a JSON string the model does not reason (it restates the question), and DSPy's
``[[ ## field ## ]]`` markers are not what it was tuned on. :class:`ProseAdapter` keeps the
signature (instructions, fields, types) and changes only the wire format:

* the system message is the signature's instructions; the user message gives each input
  field as ``Field name: value`` paragraphs;
* one output field: the whole reply is that field (a prompt, a critique);
* several output fields: the first is free prose (reasoning), each later one follows a
  ``#### `` marker line, the convention of GSM8K solutions and of the model's own training data
  (with three or more outputs the marker names the field: ``#### answer: ...``).

A reply without the marker still parses: the last output field then gets the reply's last
``\\boxed{...}``, else its last line with content (:func:`final_answer_line`), which holds a
model's final answer in practice, so the metric decides, as in plain chat, instead of a parse
error. (Measured on GSM8K train questions: replies ending in a lone ``\\]`` after the answer
were read as that ``\\]``.)
"""

from __future__ import annotations

import re
from typing import Any

from dspy.adapters.base import Adapter
from dspy.adapters.utils import format_field_value, parse_value
from dspy.utils.exceptions import AdapterParseError

from ..metrics import last_braced

MARKER = "####"


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


# what is left of a line once display-math delimiters, environment ends and code fences are gone
_LAYOUT_ONLY_RE = re.compile(r"\\(?:begin|end)\{[^}]*\}|\\[\[\]()]|\$\$|```|[\s.$]")


def final_answer_line(text: str) -> str:
    """Where a reply without the marker holds its final answer: the last ``\\boxed{...}`` (the
    habit of math-tuned models, wherever it stands), else the last line with content -- a
    closing ``\\]``, ``$$`` or code fence after the answer is layout, not the answer."""
    boxed = last_braced(text, "\\boxed")
    if boxed is not None and boxed.strip():
        return f"\\boxed{{{boxed.strip()}}}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _LAYOUT_ONLY_RE.sub("", line):
            return line
    return lines[-1] if lines else ""


class ProseAdapter(Adapter):
    """Plain prose in, plain prose out (see the module doc); a drop-in ``dspy.Adapter``."""

    def format_field_description(self, signature: Any) -> str:
        return ""

    def format_field_structure(self, signature: Any) -> str:
        return ""

    def format_task_description(self, signature: Any) -> str:
        return signature.instructions

    def format_system_message(self, signature: Any) -> str:
        return self.format_task_description(signature).strip()

    def output_instruction(self, signature: Any) -> str:
        """The last line of the user message: how to lay out the reply."""
        names = list(signature.output_fields)
        fields = signature.output_fields
        if len(names) == 1:
            desc = fields[names[0]].json_schema_extra.get("desc") or _label(names[0])
            return f"Reply with the {_label(names[0]).lower()} only ({desc.rstrip('.')}), no preamble."
        first = fields[names[0]].json_schema_extra.get("desc") or _label(names[0])
        if len(names) == 2:
            last = fields[names[1]].json_schema_extra.get("desc") or _label(names[1])
            return f"Write your {_label(names[0]).lower()} ({first.rstrip('.')}), then write {MARKER} followed by {last[0].lower() + last[1:]}"
        later = ", ".join(f"'{MARKER} {name}: ...'" for name in names[1:])
        return f"Write your {_label(names[0]).lower()} ({first.rstrip('.')}), then one line each: {later}."

    def format_user_message_content(self, signature: Any, inputs: dict[str, Any], prefix: str = "",
                                    suffix: str = "", main_request: bool = False) -> str:
        parts = [prefix] if prefix else []
        for name, field in signature.input_fields.items():
            if name not in inputs:
                continue
            value = inputs[name]
            text = format_field_value(field_info=field, value=value) if not isinstance(value, str) else value
            if not str(text).strip():
                continue  # an empty prompt is no guidance, not a blank paragraph
            parts.append(f"{_label(name)}: {text}" if name != "question" else str(text))
        if main_request:
            parts.append(self.output_instruction(signature))
        if suffix:
            parts.append(suffix)
        return "\n\n".join(parts).strip()

    def format_assistant_message_content(self, signature: Any, outputs: dict[str, Any],
                                         missing_field_message: str | None = None) -> str:
        names = list(signature.output_fields)
        values = [str(outputs.get(name, missing_field_message or "")) for name in names]
        if len(names) == 1:
            return values[0]
        if len(names) == 2:
            return f"{values[0]}\n{MARKER} {values[1]}"
        return values[0] + "".join(f"\n{MARKER} {name}: {value}" for name, value in zip(names[1:], values[1:]))

    def format_finetune_data(self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any],
                             outputs: dict[str, Any]) -> dict[str, list[Any]]:
        """Chat messages for SFT: exactly the call's messages plus the reply :meth:`parse` reads back
        (the recipe of DSPy's ChatAdapter)."""
        messages = self.format(signature=signature, demos=demos, inputs=inputs)
        reply = self.format_assistant_message_content(signature=signature, outputs=outputs)
        return {"messages": [*messages, {"role": "assistant", "content": reply}]}

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        names = list(signature.output_fields)
        text = (completion or "").strip()
        if not text:
            raise AdapterParseError(adapter_name="ProseAdapter", signature=signature, lm_response=completion,
                                    message="empty reply")
        if len(names) == 1:
            raw = {names[0]: text}
        elif len(names) == 2:
            head, marker, tail = text.rpartition(MARKER)
            if marker:
                raw = {names[0]: head.strip(), names[1]: tail.strip().splitlines()[0].strip() if tail.strip() else ""}
            else:
                raw = {names[0]: text, names[1]: final_answer_line(text)}
            if not raw[names[1]]:
                raise AdapterParseError(adapter_name="ProseAdapter", signature=signature, lm_response=completion,
                                        message=f"nothing after {MARKER}")
        else:
            raw = {names[0]: text.split(MARKER, 1)[0].strip()}
            for name in names[1:]:
                found = re.search(rf"{re.escape(MARKER)}\s*{re.escape(name)}\s*:\s*(.+)", text)
                if not found:
                    raise AdapterParseError(adapter_name="ProseAdapter", signature=signature, lm_response=completion,
                                            message=f"no '{MARKER} {name}:' line")
                raw[name] = found.group(1).strip()
        parsed = {}
        for name, value in raw.items():
            annotation = signature.output_fields[name].annotation
            try:
                parsed[name] = value if annotation is str else parse_value(value, annotation)
            except (ValueError, TypeError) as error:
                raise AdapterParseError(adapter_name="ProseAdapter", signature=signature, lm_response=completion,
                                        message=f"{name}: {error}") from None
        return parsed
