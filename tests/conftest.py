"""Shared test settings: no hub, no network cost map, the local data folder."""

import os
from pathlib import Path

import pytest

# Before anything imports litellm/transformers/textgrad.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TEXTGRAD_DISABLE_LOGGING", "1")

# One tiny model and one vLLM server for the whole session (see serving_fixtures.py).
from serving_fixtures import tiny_lora_adapters, tiny_model_dir, vllm_server  # noqa: E402,F401

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TRPROMPT_TEST_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The benchmark data folder beside the repo (../shared/data), as CI provides it."""
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.fail(f"test data not found at {SHARED_DATA}; CI runs with ../shared beside the repo "
                    "(or set TRPROMPT_TEST_DATA_DIR)")
    return SHARED_DATA
