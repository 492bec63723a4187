"""TextGrad engines over ``dspy.LM``: one way to name an LM for every role, TextGrad included.

TextGrad calls its LLMs through ``EngineLM`` objects. Its own engines either pass neither the
server address nor ``max_tokens``/``temperature`` (``experimental:`` litellm engine) or cache to
``~/.cache/textgrad`` keyed without the temperature (legacy ``CachedEngine``). :class:`DSPyEngine`
is a small ``EngineLM`` that sends every call through a ``dspy.LM`` instead, so local vLLM,
remote APIs, DSPy's response cache, retries, callbacks and LM history behave exactly as for the
DSPy modules, and per-call settings (temperature, max tokens, vLLM structured outputs) reach
the server.

Importing TextGrad has a side effect: textgrad 0.1.8 creates ``./logs/`` (or
``$TEXTGRAD_LOG_DIR``) and opens a JSON log file there that records every prompt, wherever the
caller's working directory is. (It does not read ``TEXTGRAD_DISABLE_LOGGING``; newer releases
do.) :func:`import_textgrad` imports it with the log pointed at a temporary folder, detaches
that file handler and removes the folder, so nothing is written outside the run folder. Set
``TEXTGRAD_LOG_DIR`` yourself to keep TextGrad's own log.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from typing import Any

logger = logging.getLogger(__name__)

_IMPORT_LOCK = threading.Lock()


def import_textgrad():
    """Import and return the ``textgrad`` package without letting it write log files.

    If ``TEXTGRAD_LOG_DIR`` is set, TextGrad's log is kept where the user asked for it. Else the
    import happens with the log directory pointed at a fresh temporary folder, and afterwards the
    file handler is closed and detached and the folder deleted. If TextGrad was already imported
    by someone else, only its file handler (opened under ``./logs``) is detached; the file it
    already created stays.
    """
    with _IMPORT_LOCK:
        user_log_dir = os.environ.get("TEXTGRAD_LOG_DIR")
        if "textgrad" in sys.modules:
            textgrad = sys.modules["textgrad"]
            if user_log_dir is None:
                _detach_file_handlers()
            return textgrad
        if user_log_dir is not None:
            import textgrad

            return textgrad
        scratch = tempfile.mkdtemp(prefix="textgrad-log-")
        os.environ["TEXTGRAD_LOG_DIR"] = scratch
        try:
            import textgrad
        finally:
            del os.environ["TEXTGRAD_LOG_DIR"]
            if "textgrad" in sys.modules:
                _detach_file_handlers()
            shutil.rmtree(scratch, ignore_errors=True)
        return textgrad


def _detach_file_handlers() -> None:
    tg_logger = logging.getLogger("textgrad")
    for handler in list(tg_logger.handlers):
        if isinstance(handler, logging.FileHandler):
            tg_logger.removeHandler(handler)
            handler.close()
    # The records still propagate to the root logger: whoever configures logging sees them.


tg = import_textgrad()


def is_hosted_vllm(lm: Any) -> bool:
    """True when ``lm`` is a ``dspy.LM`` addressed as ``hosted_vllm/<name>`` (a vLLM server)."""
    model = getattr(lm, "model", "")
    return isinstance(model, str) and model.startswith("hosted_vllm/")


def regex_extra_body(regex: str) -> dict[str, Any]:
    """The ``extra_body`` that makes a vLLM (>= 0.12) server constrain a reply to ``regex``.

    vLLM 0.32 reads ``structured_outputs``; it ignores the older ``guided_regex`` field.
    """
    return {"structured_outputs": {"regex": regex}}


def merge_extra_body(base: dict | None, extra: dict | None) -> dict | None:
    """Merge two ``extra_body`` dicts; ``structured_outputs`` entries are merged one level deep.

    ``dspy.LM`` replaces its default ``extra_body`` wholesale when a call passes one, which would
    drop settings a user put on the LM; this keeps both.
    """
    if not base:
        return dict(extra) if extra else None
    if not extra:
        return dict(base)
    merged = {**base, **extra}
    if isinstance(base.get("structured_outputs"), dict) and isinstance(extra.get("structured_outputs"), dict):
        merged["structured_outputs"] = {**base["structured_outputs"], **extra["structured_outputs"]}
    return merged


class DSPyEngine(tg.EngineLM):
    """A TextGrad ``EngineLM`` that calls a ``dspy.LM``.

    Every call becomes ``lm(messages=[system, user], **settings)``, where ``settings`` are the
    engine's defaults overridden by the call's keyword arguments (``temperature``,
    ``max_tokens``, ``extra_body``, ``rollout_id``, ...). ``extra_body`` is merged with the LM's
    own rather than replacing it. Thread-safe as far as the ``dspy.LM`` is (it is).

    Args:
        lm: the ``dspy.LM`` (or any ``dspy.BaseLM``) to call.
        system_prompt: used when a call gives none (TextGrad's default otherwise).
        **defaults: default call settings, e.g. ``temperature=0.0, max_tokens=512``.
    """

    def __init__(self, lm: Any, *, system_prompt: str | None = None, **defaults: Any):
        if lm is None or not callable(lm):
            raise TypeError(f"DSPyEngine needs a dspy.LM, got {lm!r}")
        self.lm = lm
        self.model_string = getattr(lm, "model", type(lm).__name__)
        if system_prompt is not None:
            self.system_prompt = system_prompt
        self.defaults = dict(defaults)

    def __repr__(self) -> str:
        return f"DSPyEngine({self.model_string!r}, {self.defaults})"

    def generate(self, content: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
        """Return the LM's reply text to ``content`` (a string, or a list of strings).

        Raises whatever the LM raises (connection errors, context overflow, ...): callers decide
        what an error means. A reply without text (e.g. a refusal) is returned as ``""``.
        """
        if isinstance(content, (list, tuple)):
            if any(not isinstance(part, str) for part in content):
                raise NotImplementedError("DSPyEngine handles text only (TextGrad passed non-text content)")
            content = "\n".join(content)
        messages = [
            {"role": "system", "content": system_prompt or self.system_prompt},
            {"role": "user", "content": content},
        ]
        settings = {**self.defaults, **kwargs}
        if "extra_body" in settings:
            merged = merge_extra_body(getattr(self.lm, "kwargs", {}).get("extra_body"), settings["extra_body"])
            if merged is None:
                settings.pop("extra_body")
            else:
                settings["extra_body"] = merged
        outputs = self.lm(messages=messages, **settings)
        if not outputs:
            return ""
        first = outputs[0]
        if isinstance(first, dict):
            first = first.get("text")
        return first if isinstance(first, str) else ""

    def __call__(self, content: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
        return self.generate(content, system_prompt=system_prompt, **kwargs)
