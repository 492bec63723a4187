"""The LoRA trainer of :mod:`trprompt_dspy.finetune` behind DSPy's fine-tuning contract.

DSPy fine-tunes through an LM's provider: ``lm.finetune(train_data, train_data_format)`` starts
a :class:`dspy.clients.provider.TrainingJob` in a thread, and ``job.result()`` is a copy of the
LM that names the fine-tuned model. :class:`LoRAProvider` implements that contract with the
local peft + trl trainer and, when given a running :class:`~trprompt_dspy.infra.serving.VLLMServer`,
loads the new adapter into it so the returned LM answers straight away::

    provider = LoRAProvider(server=server, output_root="runs/x/adapters")
    lm = server.lm(provider=provider)                   # or dspy.LM(..., provider=provider)
    job = lm.finetune(train_data=chat_data, train_data_format="chat",
                      train_kwargs={"max_steps": 50, "learning_rate": 1e-4})
    tuned_lm = job.result()                             # hosted_vllm/<adapter name>

``train_data`` is DSPy's chat format (``[{"messages": [..., assistant]}]``, what
``adapter.format_finetune_data`` returns, and what :func:`trprompt_dspy.finetune.records_to_chat_data`
builds from rollout records); ``train_kwargs`` are :class:`~trprompt_dspy.finetune.FinetuneConfig`
fields plus ``output_dir`` and ``adapter_name``.

DSPy's own ``LocalProvider`` is not used: it needs sglang, passes an argument current trl
renamed, and always merges adapters (ENVIRONMENT.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat, TrainingStatus

from ..infra.adapters import adapter_fingerprint
from .config import FinetuneConfig, FinetuneInputError
from .trainer import FinetuneResult, train_lora

logger = logging.getLogger(__name__)

#: ``train_kwargs`` keys that are not :class:`FinetuneConfig` fields.
JOB_KEYS = ("output_dir", "adapter_name")


class LoRATrainingJob(TrainingJob):
    """A running LoRA fine-tune (a ``concurrent.futures.Future``).

    ``job.result()`` is the fine-tuned ``dspy.LM`` -- or, as DSPy's ``LM.finetune`` does for
    every provider, the exception the training raised. After success :attr:`finetune_result`
    holds the adapter folder and training summary.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cancel_event = threading.Event()
        self.finetune_result: FinetuneResult | None = None
        self.adapter_name: str | None = None
        self._status = TrainingStatus.pending

    def cancel(self) -> bool:
        """Ask the training to stop after its current step; no adapter is written.

        Returns:
            True (the request is always recorded; the job then finishes with
            :class:`~trprompt_dspy.finetune.FinetuneCancelled` as its result).
        """
        # Not Future.cancel(): DSPy's worker thread always ends with set_result(), which a
        # cancelled Future refuses; the result becomes FinetuneCancelled instead.
        self.cancel_event.set()
        return True

    def status(self) -> TrainingStatus:
        """pending, running, succeeded, failed or cancelled."""
        if self.done():
            result = self.result()
            if isinstance(result, BaseException):
                return TrainingStatus.cancelled if self.cancel_event.is_set() else TrainingStatus.failed
            return TrainingStatus.succeeded
        return self._status


class LoRAProvider(Provider):
    """DSPy provider that fine-tunes LoRA adapters locally (peft + trl) and serves them with vLLM.

    Args:
        model: base model to train (``"default"``, a folder or a ``.gguf``); default: the
            server's model when a server is given, else ``"default"``.
        server: a running :class:`~trprompt_dspy.infra.serving.VLLMServer` of that base model; each
            finished adapter is loaded into it. Without one, the returned LM names the adapter
            but it must be loaded by the caller (``server.load_adapter(job.adapter_name,
            job.finetune_result.adapter_dir)``).
        output_root: folder under which adapters are written when ``train_kwargs`` holds no
            ``output_dir`` (default: ``<temp folder>/trprompt-dspy-adapters``).
        config: base :class:`FinetuneConfig`; ``train_kwargs`` override its fields per job.
        adapter_prefix: adapter names are ``<prefix>-<weights fingerprint>``, so a retrained
            adapter never reuses a name (DSPy caches responses by model name).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        server: Any = None,
        output_root: str | os.PathLike | None = None,
        config: FinetuneConfig | None = None,
        adapter_prefix: str = "prompter",
    ):
        super().__init__()
        self.finetunable = True
        self.TrainingJob = LoRATrainingJob
        self.model = model
        self.server = server
        self.output_root = Path(output_root) if output_root is not None else None
        self.config = config or FinetuneConfig()
        self.adapter_prefix = adapter_prefix

    def __deepcopy__(self, memo: dict) -> LoRAProvider:
        # A provider is a handle on a server and a trainer, not data: programs that deep-copy
        # their LMs (DSPy teleprompters do) must share it.
        return self

    @staticmethod
    def is_provider_model(model: str) -> bool:
        """Never auto-selected: pass ``provider=LoRAProvider(...)`` to ``dspy.LM`` explicitly."""
        return False

    def base_model(self) -> str | os.PathLike:
        """The model adapters are trained on."""
        if self.model is not None:
            return self.model
        if self.server is not None and getattr(self.server, "model_path", None):
            return self.server.model_path
        return "default"

    def finetune(
        self,
        job: LoRATrainingJob,
        model: str,
        train_data: list[dict[str, Any]],
        train_data_format: TrainDataFormat | str | None,
        train_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Train an adapter on DSPy chat data; return the model name of the fine-tuned LM.

        Args:
            job: the job DSPy created (progress and cancellation).
            model: the LM's model name (informational: the base weights come from
                :meth:`base_model`).
            train_data: ``[{"messages": [...]}]``.
            train_data_format: ``"chat"`` (the only supported format) or None.
            train_kwargs: :class:`FinetuneConfig` fields, ``output_dir`` and ``adapter_name``.

        Returns:
            ``"hosted_vllm/<adapter name>"``.

        Raises:
            FinetuneInputError: another data format, unknown ``train_kwargs`` or bad data.
        """
        if train_data_format not in (None, TrainDataFormat.CHAT, TrainDataFormat.CHAT.value):
            raise FinetuneInputError(f"LoRAProvider trains on chat data only, got format {train_data_format!r}")
        kwargs = dict(train_kwargs or {})
        output_dir = kwargs.pop("output_dir", None)
        name = kwargs.pop("adapter_name", None)
        config = self.config.replace(**kwargs) if kwargs else self.config
        if output_dir is None:
            root = self.output_root or Path(tempfile.gettempdir()) / "trprompt-dspy-adapters"
            output_dir = root / f"{self.adapter_prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        job._status = TrainingStatus.running
        logger.info("fine-tuning %s (LM %s) on %d examples into %s", self.base_model(), model, len(train_data), output_dir)
        result = train_lora(
            train_data,
            output_dir,
            model=self.base_model(),
            config=config,
            cancel_event=job.cancel_event,
            metadata={"source": "dspy_provider", "lm": model},
        )
        job.finetune_result = result
        if name is None:
            name = f"{self.adapter_prefix}-{adapter_fingerprint(result.adapter_dir)}"
        job.adapter_name = name
        if self.server is not None:
            self.server.load_adapter(name, result.adapter_dir)
        else:
            logger.info("adapter %s written to %s; load it into a server to use it", name, result.adapter_dir)
        return f"hosted_vllm/{name}"
