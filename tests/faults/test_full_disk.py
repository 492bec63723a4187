"""A real full disk: the run folder on a small tmpfs that the compile fills.

The disk is filled for real (a ballast file written until the kernel answers ENOSPC) at a chosen
moment: before the 4th rollout record, right before the adapter is saved, and right before the
final report. Each time the compile stops with ONE line (DiskFullError) naming the folder and the
space needed, nothing written before is lost or torn, and once the ballast is deleted a compile
with the same log_dir finishes the run.

Mounting needs root (CI runs as root); where the mount is refused the tests are skipped with the
reason (pytest's -ra prints it).
"""

import contextlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import peft
import pytest

import trprompt_dspy as t
from helpers import tiny_teleprompter, unload_all_adapters
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.runs import DiskFullError, JsonlAppender, read_jsonl
from trprompt_dspy.teleprompter import rounds

pytestmark = pytest.mark.slow

SIZE_MIB = 64


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs mounted at a fresh folder, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MIB}m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {(done.stderr or done.stdout).strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Ballast:
    """Fills a disk to the last byte with one file; ``free()`` deletes it."""

    def __init__(self, disk: Path):
        self.path = disk / f"ballast-{uuid.uuid4().hex[:6]}"
        self.filled = False

    def fill(self) -> None:
        if self.filled:
            return
        self.filled = True
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
                with contextlib.suppress(OSError):  # ENOSPC: go on with a smaller chunk
                    while True:
                        os.write(fd, chunk)
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.path.unlink(missing_ok=True)


def _compile(server, data_dir, log_dir):
    train = load_dataset("gsm8k", "train", data_dir=data_dir, limit=4)
    val = load_dataset("gsm8k", "test", data_dir=data_dir, limit=3)
    try:
        return tiny_teleprompter(server, log_dir, rounds=1).compile(t.TRPromptProgram(), trainset=train, valset=val)
    finally:
        unload_all_adapters(server)


def _assert_one_line_naming(error: DiskFullError, log_dir: Path, what: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert str(log_dir) in message and what in message
    assert "needs about" in message and "free" in message and "same log_dir" in message


def _done(log_dir: Path) -> list[str]:
    """The stages recorded as done (read directly: opening a RunFolder probes the full disk)."""
    stages = log_dir / "stages.json"
    return list(json.loads(stages.read_text())) if stages.is_file() else []


def _records(log_dir: Path) -> list[dict]:
    return read_jsonl(log_dir / "round_1" / "records.jsonl")


def _finish_and_check(server, data_dir, log_dir, ballast) -> dict:
    ballast.free()
    compiled = _compile(server, data_dir, log_dir)
    assert compiled is not None
    report = json.loads((log_dir / "report.json").read_text())
    assert len(report["rounds"]) == 1 and "final_reward" in report
    keys = [(r["example_id"], r["extra"]["sample"]) for r in _records(log_dir)]
    assert len(keys) == len(set(keys)) == 8  # 4 questions x 2 samples, each once
    assert not [p for p in log_dir.rglob("*.tmp*")]
    return report


def test_disk_full_during_rollout_records(clean_adapters, shared_data_dir, small_disk, monkeypatch):
    log_dir, ballast = small_disk / "run", Ballast(small_disk)
    original, appended = JsonlAppender.append, []

    def append(self, obj):
        if self.path.name == "records.jsonl":
            if len(appended) == 3:
                ballast.fill()
            appended.append(obj)
        return original(self, obj)

    monkeypatch.setattr(JsonlAppender, "append", append)
    with pytest.raises(DiskFullError) as caught:
        _compile(clean_adapters, shared_data_dir, log_dir)
    monkeypatch.undo()
    _assert_one_line_naming(caught.value, log_dir / "round_1", "the rollout")
    # the records' last memory page had room for a few more after the fill; then a write failed
    # part-way and was cut back: only whole lines, none torn
    text = (log_dir / "round_1" / "records.jsonl").read_text()
    assert text.endswith("\n")
    before = [json.loads(line) for line in text.splitlines()]
    assert 3 <= len(before) < 8
    assert "round_1/rollout" not in _done(log_dir)

    _finish_and_check(clean_adapters, shared_data_dir, log_dir, ballast)
    after = {(r["example_id"], r["extra"]["sample"]): r for r in _records(log_dir)}
    for record in before:  # kept as written, not regenerated
        assert after[(record["example_id"], record["extra"]["sample"])] == record


def test_disk_full_while_saving_the_adapter(clean_adapters, shared_data_dir, small_disk, monkeypatch):
    log_dir, ballast = small_disk / "run", Ballast(small_disk)
    original = peft.PeftModel.save_pretrained

    def save_pretrained(self, *args, **kwargs):
        ballast.fill()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", save_pretrained)
    with pytest.raises(DiskFullError) as caught:
        _compile(clean_adapters, shared_data_dir, log_dir)
    monkeypatch.undo()
    _assert_one_line_naming(caught.value, log_dir / "round_1", "saving the adapter")
    records = _records(log_dir)
    assert len(records) == 8
    assert _done(log_dir)[-1] == "round_1/rollout"
    # no half-written adapter in place or in a staging folder
    assert not (log_dir / "round_1" / "adapter").exists()
    assert not [p for p in (log_dir / "round_1").iterdir() if p.name.startswith(".adapter")]

    _finish_and_check(clean_adapters, shared_data_dir, log_dir, ballast)
    assert _records(log_dir) == records
    assert (log_dir / "round_1" / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_disk_full_while_writing_the_final_report(clean_adapters, shared_data_dir, small_disk, monkeypatch):
    log_dir, ballast = small_disk / "run", Ballast(small_disk)
    original = rounds.write_report

    def write_report(folder, report):
        if "final_reward" in report:  # the last write of the compile, after every stage is done
            ballast.fill()
        return original(folder, report)

    monkeypatch.setattr(rounds, "write_report", write_report)
    with pytest.raises(DiskFullError) as caught:
        _compile(clean_adapters, shared_data_dir, log_dir)
    monkeypatch.undo()
    _assert_one_line_naming(caught.value, log_dir, "writing the report")
    # the report written after round 1 is whole, and every stage is recorded
    report = json.loads((log_dir / "report.json").read_text())
    assert len(report["rounds"]) == 1 and "final_reward" not in report
    assert "round_1/validation" in _done(log_dir)
    adapter = (log_dir / "round_1" / "adapter" / "adapter_model.safetensors").read_bytes()

    _finish_and_check(clean_adapters, shared_data_dir, log_dir, ballast)
    assert (log_dir / "round_1" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
