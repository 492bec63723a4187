"""Shared test settings and fixtures: no hub, no network cost map, the local data folder, the
session's vLLM server (kept free of adapters between tests) and one shared compiled run."""

import os
import sys
from pathlib import Path

import pytest

# Before anything imports litellm/transformers/textgrad.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TEXTGRAD_DISABLE_LOGGING", "1")

# This folder on sys.path whatever pytest's import mode (its default "prepend" puts it there for
# this conftest too): test modules in tests/ and tests/faults/ import serving_fixtures and helpers.
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# One tiny model and one vLLM server for the whole session (see serving_fixtures.py).
from serving_fixtures import tiny_lora_adapters, tiny_model_dir, vllm_server  # noqa: E402,F401

REPO = TESTS.parent
SHARED_DATA = Path(os.environ.get("TRPROMPT_TEST_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The benchmark data folder beside the repo (../shared/data), as CI provides it."""
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.fail(f"test data not found at {SHARED_DATA}; CI runs with ../shared beside the repo "
                    "(or set TRPROMPT_TEST_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture
def clean_adapters(vllm_server):  # noqa: F811 (the fixture imported above)
    """The session's server; every adapter the test loaded (itself or through a compile) is
    unloaded afterwards, whatever the test did: the server has LoRA slots for two at once."""
    # helpers imports the library (seconds): only tests that use the server pay for it
    from helpers import unload_all_adapters

    yield vllm_server
    unload_all_adapters(vllm_server)


@pytest.fixture(scope="session")
def tiny_run(vllm_server, shared_data_dir, tmp_path_factory):  # noqa: F811
    """ONE two-round compile of the tiny settings with API keys planted (see
    ``helpers.compile_tiny_run``), for the tests that only read a compile's results: its run
    folder, report and compiled program. A test that changes the run folder, or needs other
    settings, compiles on its own."""
    from helpers import compile_tiny_run

    return compile_tiny_run(vllm_server, shared_data_dir, tmp_path_factory.mktemp("tiny-run") / "run")
