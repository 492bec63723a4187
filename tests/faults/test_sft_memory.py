"""The memory check before SFT (``finetune/memory.py``): the estimate accounts for the OOM that
was seen, settings that would not fit get a smaller micro-batch or one clear error, and a real
SFT on a tiny model runs with what the check chose -- all without exhausting the machine (the
available memory is set, not used up)."""

import json

import pytest

import trprompt_dspy.finetune.memory as memory
from trprompt_dspy.finetune import FinetuneConfig, finetune_prompter
from trprompt_dspy.finetune.config import FinetuneInputError
from trprompt_dspy.finetune.memory import GiB, ModelShape, fit_memory, sft_memory_bytes
from trprompt_dspy.rollout.records import RolloutRecord

# published shapes (their config.json): SmolLM2-135M (the embedded default) and Qwen2.5-0.5B
SMOLLM2_135M = ModelShape(hidden=576, layers=30, heads=9, vocab=49152, params=134.5e6)
QWEN_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "intermediate_size": 4864, "tie_word_embeddings": True}


def test_the_estimate_accounts_for_the_oom_that_was_seen():
    # killed at 18.7 GB of RSS: 8 sequences of 1024 tokens in one pass, fp32, no checkpointing
    seen = sft_memory_bytes(SMOLLM2_135M, micro_batch=8, seq_len=1024)
    assert seen > 18.7e9
    # what the CPU default does instead (2 sequences per pass) needs a fraction of that
    assert sft_memory_bytes(SMOLLM2_135M, micro_batch=2, seq_len=1024) < seen / 3
    assert (sft_memory_bytes(SMOLLM2_135M, micro_batch=2, seq_len=1024, gradient_checkpointing=True)
            < sft_memory_bytes(SMOLLM2_135M, micro_batch=2, seq_len=1024))


def test_settings_that_do_not_fit_get_a_smaller_batch_or_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_05B))
    config = FinetuneConfig(per_device_batch_size=8)
    common = dict(seq_len=1024, weight_bytes=4, compute_bytes=4, gradient_checkpointing=False)
    # plenty of memory: nothing changes
    assert fit_memory(config, str(tmp_path), micro_batch=8, available=512 * GiB, **common)[:2] == (8, False)
    # 12 GiB: a smaller micro-batch (a divisor of 8: the optimizer step is unchanged)
    micro, ckpt, report = fit_memory(config, str(tmp_path), micro_batch=8, available=12 * GiB, **common)
    assert micro in (1, 2, 4) and report["changed"].startswith("micro_batch 8 -> ")
    assert report["estimate_gib"] <= 12 * memory.HEADROOM
    # 3 GiB holds the fp32 weights (2 GiB) and little else: one line saying what to set
    with pytest.raises(FinetuneInputError, match=r"SFT would need about .* GiB .*3\.0 GiB is available: lower max_length"):
        fit_memory(config, str(tmp_path), micro_batch=8, available=3 * GiB, **common)
    # an explicit micro_batch_size is checked, never changed
    with pytest.raises(FinetuneInputError, match="micro-batch 8"):
        fit_memory(config.replace(micro_batch_size=8), str(tmp_path), micro_batch=8, available=12 * GiB, **common)


RECORDS = [
    RolloutRecord(question="What is 2+3?", prompt="Add the two numbers.", critique="The prompt was clear.",
                  answer="5", correct=True, reference="5"),
    RolloutRecord(question="Natalia sold 48 clips in April.", prompt="Compute half, then add.",
                  critique="The prompt did not help.", answer="12", correct=False, reference="72"),
]


def test_a_real_sft_runs_with_the_batch_the_check_chose_or_stops_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    config = FinetuneConfig(max_steps=2, per_device_batch_size=2, micro_batch_size=2, progress=False)
    # with room to spare: the settings as they are; the report says what was checked
    first = finetune_prompter(RECORDS, tmp_path / "a", model=str(tiny_model_dir), config=config).summary
    assert first["micro_batch_size"] == 2 and first["memory"]["changed"] is None
    seq_len = first["memory"]["seq_len"]
    shape = ModelShape.from_dir(tiny_model_dir)
    lora = memory.lora_param_count(tiny_model_dir, config.lora_r)
    one, two = (sft_memory_bytes(shape, micro_batch=b, seq_len=seq_len, lora_params=lora) for b in (1, 2))
    # room for one sequence per pass, not two: the check takes 1 and trains as many per step
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: int((one + two) / 2 / memory.HEADROOM))
    auto = config.replace(micro_batch_size=None)
    second = finetune_prompter(RECORDS, tmp_path / "b", model=str(tiny_model_dir), config=auto).summary
    assert second["micro_batch_size"] == 1 and second["memory"]["changed"] == "micro_batch 2 -> 1"
    assert second["steps"] == 2
    # nothing fits: one line before the model is loaded, and no adapter folder is left behind
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 64 * 1024**2)
    with pytest.raises(FinetuneInputError, match="SFT would need about"):
        finetune_prompter(RECORDS, tmp_path / "none", model=str(tiny_model_dir), config=auto)
    assert not (tmp_path / "none").exists()
