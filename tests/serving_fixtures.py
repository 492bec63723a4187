"""Session fixtures for tests that need a real vLLM server or the tiny model.

Import them into ``tests/conftest.py`` (``from serving_fixtures import *``) so that every test
module shares ONE server per session; a module that also imports them would get its own copy.

Fixtures:
    tiny_model_dir      Path of a tiny random Llama (built once per session).
    vllm_server         a running :class:`VLLMServer` on the tiny model (LoRA: rank 8, 3 slots,
                        so at most 2 adapters at once).
    tiny_lora_adapters  dict name -> Path of two peft LoRA adapters for the tiny model.

Helper:
    make_tiny_adapter(base_dir, out_dir, seed, rank=8)  write a peft adapter with non-zero B.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports litellm (it would fetch a cost map from the network for ~6 s) or
# transformers (no model hub here).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_SERVED_NAME = "tiny-llama"
TINY_MAX_LORA_RANK = 8
TINY_MAX_LORAS = 3

__all__ = ["tiny_model_dir", "vllm_server", "tiny_lora_adapters", "make_tiny_adapter", "TINY_SERVED_NAME"]


def make_tiny_adapter(base_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int, rank: int = 8) -> Path:
    """Save a peft LoRA adapter (all linear layers) for the model in ``base_dir``.

    peft initialises B to zero, which would leave the model unchanged; ``init_lora_weights=False``
    draws both A and B at random, so the adapter visibly changes greedy output.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)  # safetensors by default
    return Path(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trprompt_dspy.infra.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / TINY_SERVED_NAME, seed=0)


@pytest.fixture(scope="session")
def tiny_lora_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_tiny_adapter(tiny_model_dir, root / name, seed=seed) for name, seed in (("ad-one", 1), ("ad-two", 2))}


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, tmp_path_factory):
    from trprompt_dspy.infra.serving import ServerConfig, VLLMServer

    config = ServerConfig(
        model=str(tiny_model_dir),
        served_model_name=TINY_SERVED_NAME,
        device="cpu",
        # float32: the random model's logits are close together; full precision keeps greedy
        # output independent of how requests are batched.
        dtype="float32",
        max_model_len=4096,
        max_lora_rank=TINY_MAX_LORA_RANK,
        max_loras=TINY_MAX_LORAS,
        startup_timeout_s=300,
        log_path=tmp_path_factory.mktemp("logs") / "vllm-tiny.log",
    )
    with VLLMServer(config) as server:
        yield server
