"""The run folder: atomic writes, completed stages across processes, and refusal to mix runs."""

import json
import os
import subprocess
import sys

import pytest

from trprompt_dspy.infra.runs import JsonlAppender, RunFolder, RunFolderError, atomic_write_json, read_jsonl


def test_stages_persist_and_survive_a_new_process(tmp_path):
    run = RunFolder(tmp_path / "run", fingerprint={"rounds": 2})
    run.mark_done("round_1/rollout", {"records": 8})
    # another process sees the same completed stages
    code = (
        "from trprompt_dspy.infra.runs import RunFolder; import sys;"
        f"r = RunFolder({str(tmp_path / 'run')!r}, fingerprint={{'rounds': 2}});"
        "print(r.completed, r.result('round_1/rollout'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['round_1/rollout'] {'records': 8}"
    assert run.is_done("round_1/rollout") and not run.is_done("round_1/finetune")
    assert run.round_dir(1) == run.path / "round_1" and run.round_dir(1).is_dir()


def test_a_folder_of_a_different_run_is_refused(tmp_path):
    RunFolder(tmp_path, fingerprint={"rounds": 2, "n_samples": 4})
    with pytest.raises(RunFolderError, match=r"different settings \(rounds\)"):
        RunFolder(tmp_path, fingerprint={"rounds": 3, "n_samples": 4})


def test_unwritable_folder_fails_before_any_work(tmp_path):
    # (a path below a file: unwritable even for root, unlike a chmod'ed folder)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunFolderError, match="not writable"):
        RunFolder(a_file / "run")


def test_atomic_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})
    assert json.loads(path.read_text()) == {"k": [1, 2]}
    atomic_write_json(path, {"k": 3})
    assert json.loads(path.read_text()) == {"k": 3}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(path, {"k": 4})
    assert json.loads(path.read_text()) == {"k": 3}  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_jsonl_torn_last_line_is_dropped_but_a_torn_middle_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    appender = JsonlAppender(path)
    appender.append({"i": 1})
    appender.append({"i": 2})
    with open(path, "a") as f:
        f.write('{"i": 3')
    assert read_jsonl(path) == [{"i": 1}, {"i": 2}]
    with open(path, "a") as f:
        f.write('\n{"i": 4}\n')
    with pytest.raises(RunFolderError, match=r"r\.jsonl:3: not valid JSON"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_jsonl_lines_may_hold_unicode_line_separators(tmp_path):
    # json.dumps leaves U+2028 / U+0085 raw; str.splitlines() would cut the record there
    from trprompt_dspy.infra.runs import JsonlAppender, read_jsonl

    rows = [{"prompt": "a\u2028b\u0085c\u2029d\x1ce"}, {"prompt": "ok"}]
    appender = JsonlAppender(tmp_path / "r.jsonl")
    for row in rows:
        appender.append(row)
    assert read_jsonl(tmp_path / "r.jsonl") == rows
