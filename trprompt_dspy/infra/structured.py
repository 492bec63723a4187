"""A ``dspy.LM`` that makes a vLLM server enforce each DSPy signature's output schema.

Small local models rarely hold DSPy's output formats on their own (SmolLM2-135M: about half of
its replies parse). vLLM can constrain decoding to a JSON schema (xgrammar), and DSPy's
``JSONAdapter`` builds such a schema for every signature, but it only sends it to LMs that
declare ``supports_response_schema``; litellm/DSPy do not declare it for ``hosted_vllm``.

:class:`StructuredLM` declares it, then rewrites the adapter's ``response_format`` (a pydantic
model class) into vLLM's own request field ``structured_outputs.json`` after capping every
free-text string with ``maxLength``. The cap matters: with an uncapped ``reasoning`` string a
small model loops until the token limit and the JSON never closes (measured, see
``benchmarks/parse_rate.py``).

Use it with ``dspy.JSONAdapter()``::

    lm = server.lm(structured=True)            # or StructuredLM("hosted_vllm/base", api_base=...)
    dspy.configure(lm=lm, adapter=dspy.JSONAdapter())
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import dspy
import pydantic

from .checks import check_choice
from .models import OUTPUT_FORMATS
from .prose import ProseAdapter

logger = logging.getLogger(__name__)

#: Default ``maxLength`` given to free-text string fields that have none.
DEFAULT_MAX_STRING_LENGTH = 300


def cap_strings(schema: dict, max_length: int | None) -> dict:
    """Return a copy of a JSON schema where every unconstrained string has ``maxLength``.

    Strings that already carry ``maxLength``, an ``enum``, a ``const`` or a ``pattern`` keep
    their own constraint. ``max_length=None`` returns an unmodified copy.
    """
    schema = copy.deepcopy(schema)
    if max_length is None:
        return schema

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and not ({"maxLength", "enum", "const", "pattern", "format"} & node.keys()):
                node["maxLength"] = max_length
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def response_format_to_schema(response_format: Any) -> dict | None:
    """Extract a JSON schema from what DSPy adapters put in ``response_format``.

    Accepts a pydantic model class (what ``JSONAdapter`` sends) or an OpenAI-style
    ``{"type": "json_schema", "json_schema": {"schema": ...}}`` dict. Returns None for anything
    else (e.g. ``{"type": "json_object"}``), which is then passed through unchanged.
    """
    if isinstance(response_format, type) and issubclass(response_format, pydantic.BaseModel):
        return response_format.model_json_schema()
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        inner = response_format.get("json_schema") or {}
        schema = inner.get("schema")
        return schema if isinstance(schema, dict) else None
    return None


class StructuredLM(dspy.LM):
    """``dspy.LM`` for a vLLM server that enforces the response schema DSPy's adapters send.

    It behaves exactly like ``dspy.LM`` (same constructor arguments, cache, history,
    callbacks) except that:

    * ``supports_response_schema`` is True and ``response_format`` is a supported parameter, so
      ``dspy.JSONAdapter`` sends each signature's JSON schema;
    * a schema in ``response_format`` is moved to ``extra_body["structured_outputs"]["json"]``
      (the field vLLM >= 0.12 reads; it ignores the old ``guided_json``), with free-text
      strings capped at ``max_string_length`` characters.

    Whitespace between JSON tokens is a server setting in vLLM 0.32 (the request's
    ``disable_any_whitespace`` is ignored): see ``ServerConfig.compact_json``.

    Args:
        model: litellm-style model name, normally ``"hosted_vllm/<served name or adapter>"``.
        max_string_length: ``maxLength`` for string fields without their own limit; None keeps
            the schema as DSPy built it.
        output_format: ``"json"`` (the above) or ``"prose"``: no schema is sent, and the library's
            predictors talk to the model through :class:`~trprompt_dspy.infra.prose.ProseAdapter`
            (a real model reasons in prose and loses most of its skill inside a JSON string).
        **kwargs: passed to :class:`dspy.LM` (``api_base``, ``api_key``, ``max_tokens``, ...).
    """

    def __init__(
        self,
        model: str,
        *,
        max_string_length: int | None = DEFAULT_MAX_STRING_LENGTH,
        output_format: str = "json",
        **kwargs,
    ):
        check_choice("output_format", output_format, OUTPUT_FORMATS)
        if max_string_length is not None and (not isinstance(max_string_length, int) or max_string_length < 1):
            raise ValueError(f"max_string_length must be a positive int or None, got {max_string_length!r}")
        super().__init__(model, **kwargs)
        self.max_string_length = max_string_length
        self.output_format = output_format

    @property
    def supports_response_schema(self) -> bool:  # noqa: D102 - documented on the class
        return self.output_format == "json"

    @property
    def supported_params(self) -> set[str]:  # noqa: D102 - documented on the class
        params = set(super().supported_params)
        return params | {"response_format"} if self.output_format == "json" else params

    def _rewrite(self, kwargs: dict) -> dict:
        response_format = kwargs.get("response_format")
        if response_format is None or self.output_format != "json":
            return kwargs
        schema = response_format_to_schema(response_format)
        if schema is None:
            return kwargs
        kwargs = dict(kwargs)
        del kwargs["response_format"]
        extra_body = dict(self.kwargs.get("extra_body") or {})
        extra_body.update(kwargs.get("extra_body") or {})
        structured = dict(extra_body.get("structured_outputs") or {})
        structured["json"] = cap_strings(schema, self.max_string_length)
        extra_body["structured_outputs"] = structured
        kwargs["extra_body"] = extra_body
        return kwargs

    def __call__(self, prompt=None, *, messages=None, **kwargs):
        """Call the LM; a schema in ``response_format`` is enforced by vLLM (see class docs)."""
        return super().__call__(prompt, messages=messages, **self._rewrite(kwargs))

    async def acall(self, prompt=None, *, messages=None, **kwargs):
        """Async :meth:`__call__`."""
        return await super().acall(prompt, messages=messages, **self._rewrite(kwargs))

    def dump_state(self):
        """DSPy state plus the schema settings, so a saved program reloads the same LM."""
        state = super().dump_state()
        state["max_string_length"] = self.max_string_length
        state["output_format"] = self.output_format
        return state


class SafeJSONAdapter(dspy.JSONAdapter):
    """``dspy.JSONAdapter`` whose ``parse`` fails only with ``AdapterParseError``.

    DSPy's JSON repair raises a bare ``ValueError`` on deeply nested replies (found by
    ``tests/faults/test_fuzz.py`` with ``"{" * 3000``). The rollout, the evaluation and the
    reward search treat an ``AdapterParseError`` as an unparseable answer (scored wrong and
    counted); any other exception would count as a failed call instead. Used wherever this
    library picks the adapter; behaves exactly like ``JSONAdapter`` otherwise.
    """

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        from dspy.utils.exceptions import AdapterParseError

        try:
            return super().parse(signature, completion)
        except AdapterParseError:
            raise
        except (ValueError, TypeError, RecursionError) as exc:
            raise AdapterParseError(
                adapter_name="JSONAdapter", signature=signature, lm_response=str(completion)[:2000],
                message=f"unparseable reply ({type(exc).__name__}: {str(exc)[:200]})",
            ) from None


#: one adapter per wire format for every call that gets the default below (no per-call state)
_ADAPTERS = {"json": SafeJSONAdapter(), "prose": ProseAdapter()}


def adapter_for(lm: Any) -> dspy.Adapter | None:
    """The adapter the library's predictors use with ``lm``: the one of a :class:`StructuredLM`'s
    wire format (or of a format named as a string, ``"json"``/``"prose"``), None (DSPy's own
    default) for any other LM."""
    if isinstance(lm, str):
        return _ADAPTERS[lm]
    return _ADAPTERS[lm.output_format] if isinstance(lm, StructuredLM) else None


class StructuredPredict(dspy.Predict):
    """``dspy.Predict`` that uses the adapter of its LM's wire format (:func:`adapter_for`:
    :class:`SafeJSONAdapter` or :class:`~trprompt_dspy.infra.prose.ProseAdapter`) when its LM is
    a :class:`StructuredLM` and nobody configured an adapter.

    A ``StructuredLM`` only enforces a schema that ``JSONAdapter`` sends; under DSPy's default
    ``ChatAdapter`` a small local model writes free text that rarely parses. The library's own
    modules (prompter, solver, critic) use this predictor, so a compiled prompter served locally
    works in any pipeline without ``dspy.context(adapter=...)``. An adapter set with
    ``dspy.configure``/``dspy.context`` always wins.
    """

    def _adapter_context(self, kwargs: dict[str, Any]) -> Any:
        if dspy.settings.adapter is not None:
            return contextlib.nullcontext()
        adapter = adapter_for(kwargs.get("lm") or self.lm or dspy.settings.lm)
        return dspy.context(adapter=adapter) if adapter is not None else contextlib.nullcontext()

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        with self._adapter_context(kwargs):
            return super().forward(**kwargs)

    async def aforward(self, **kwargs: Any) -> dspy.Prediction:
        with self._adapter_context(kwargs):
            return await super().aforward(**kwargs)
