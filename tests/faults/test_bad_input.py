"""Bad input and unsafe files: one clear error each, before work is lost or any model starts."""

import errno
import json
import os
import shutil

import dspy
import pytest

import trprompt_dspy as t
from helpers import tiny_teleprompter
from trprompt_dspy.infra.adapters import UnsafeAdapterError
from trprompt_dspy.modules.compiled import load_compiled
from trprompt_dspy.infra.runs import DiskFullError, JsonlAppender, RunFolder, RunFolderError, atomic_write_json, read_jsonl
from trprompt_dspy.infra.serving import AdapterError


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_keeps_every_earlier_artifact_whole(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    folder.mark_done("round_1/rollout", {"records": 2})
    records = JsonlAppender(tmp_path / "run" / "round_1" / "records.jsonl")
    records.append({"id": 1})
    atomic_write_json(tmp_path / "run" / "report.json", {"round": 1})

    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(DiskFullError, match=r"no space left on the disk of .*round_1 for writing records\.jsonl"):
        records.append({"id": 2})
    with pytest.raises(DiskFullError, match="recording that round_1/finetune is done .* same log_dir to resume"):
        folder.mark_done("round_1/finetune", {"steps": 3})
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(tmp_path / "run" / "report.json", {"round": 2})
    monkeypatch.undo()

    # what was written before is whole; nothing half-written or temporary is left
    assert read_jsonl(tmp_path / "run" / "round_1" / "records.jsonl") == [{"id": 1}]
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == {"round": 1}
    assert RunFolder(tmp_path / "run").completed == ["round_1/rollout"]
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]


def test_unwritable_run_folder_fails_before_any_model_call(vllm_server, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    train = [dspy.Example(id=f"q{i}", question=f"{i}+1?", answer=str(i + 1)).with_inputs("question") for i in range(4)]
    with pytest.raises(RunFolderError, match="not writable"):
        tiny_teleprompter(vllm_server, blocker / "run").compile(t.TRPromptProgram(), trainset=train)


def test_pickled_adapters_are_refused_unless_allowed(tiny_lora_adapters, vllm_server, tmp_path):
    src = tiny_lora_adapters["ad-one"]
    unsafe = tmp_path / "unsafe"
    shutil.copytree(src, unsafe)
    (unsafe / "adapter_model.safetensors").rename(unsafe / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickled"):
        vllm_server.load_adapter("unsafe-one", unsafe)
    assert "unsafe-one" not in vllm_server.adapters

    # a saved program whose adapter was swapped for a pickle
    program = t.TRPromptProgram()
    program.prompter.adapter = {"name": "p", "path": str(src), "base_model": vllm_server.model_path}
    program.save(tmp_path / "program")
    adapter_dir = next((tmp_path / "program" / "adapters").iterdir())
    (adapter_dir / "adapter_model.safetensors").rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(UnsafeAdapterError, match="allow_pickle=True"):
        load_compiled(t.TRPromptProgram(), tmp_path / "program")
    loaded = load_compiled(t.TRPromptProgram(), tmp_path / "program", allow_pickle=True)  # the user's explicit choice
    assert loaded.prompter.adapter["name"] == "p"


def test_report_text_from_models_is_not_markup(tmp_path):
    # a t* or prompt written by a model is printed as text: no rich markup, links or styles
    from rich.console import Console

    from trprompt_dspy.app.demo import print_results

    hostile = "[link=file:///etc/passwd]click[/link] [bold red]ALERT[/] <script>alert(1)</script>"
    console = Console(record=True, width=400)
    print_results({"dataset": "words", "model": "m", "sizes": {"test": 1}, "run_dir": str(tmp_path),
                   "final_reward": hostile, "methods": {"zero-shot": {"accuracy": 0.0, "n": 1, "n_correct": 0,
                                                                      "n_errors": 0, "wall_s": 1.0}}}, console)
    text = console.export_text()
    assert "[link=file:///etc/passwd]click[/link]" in text and "[bold red]ALERT[/]" in text
    assert "href" not in console.export_html()  # no link was made


@pytest.mark.parametrize("make, message", [
    # True is an int to Python; as a size it is a mistake, refused everywhere alike
    (lambda: t.TRPromptConfig(rounds=True), "rounds must be a positive int, got True"),
    (lambda: t.RolloutConfig(n_samples=True), "n_samples must be a positive int, got True"),
    (lambda: t.FinetuneConfig(lora_r=True), "lora_r must be a positive int, got True"),
    (lambda: t.FinetuneConfig(per_device_batch_size=0), "per_device_batch_size must be a positive int, got 0"),
    (lambda: t.FinetuneConfig(max_steps=0, max_length=4), "max_steps must be a positive int or None, got 0; "
                                                          "max_length must be an int >= 8, got 4"),
    (lambda: t.RolloutConfig(num_threads=0), "num_threads must be a positive int, got 0"),
    (lambda: t.TRPromptConfig(max_server_restarts=-1), "max_server_restarts must be an int >= 0, got -1"),
    (lambda: t.TRPromptConfig(rebalance="more"), "rebalance must be 'none' or 'balance', got 'more'"),
    (lambda: t.RewardSearchConfig(patience=0), "RewardSearchConfig.patience must be a positive int or None, got 0"),
    (lambda: t.ServerConfig(model="m", tensor_parallel_size=0), "tensor_parallel_size must be a positive int, got 0"),
    (lambda: t.ServerConfig(model="m", device="tpu"), "device must be 'auto', 'cpu' or 'cuda', got 'tpu'"),
])
def test_settings_refuse_bad_values_by_name(make, message):
    with pytest.raises(ValueError) as exc:
        make()
    assert message in str(exc.value)
