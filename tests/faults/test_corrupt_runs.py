"""Corrupted run folders on resume: each damage to a finished compile's folder (a copy of the
shared tiny run) gives a clear error or a safe repair, never a silently wrong resume, and keeps
every record that was whole. A damaged adapter is then resumed for real to the end."""

import json
import re
import shutil

import pytest

import trprompt_dspy as t
from helpers import tiny_teleprompter
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.runs import RunFolder, RunFolderError, read_jsonl
from trprompt_dspy.teleprompter.integrity import adapter_problem, repair_run_folder

ROUND_2 = ["round_2/rollout", "round_2/finetune", "round_2/reward_search", "round_2/validation"]


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the shared, finished two-round run folder, free to damage."""
    return shutil.copytree(tiny_run.log_dir, tmp_path / "run")


def test_an_intact_folder_needs_no_repair(run_copy):
    folder = RunFolder(run_copy)
    before = folder.completed
    assert repair_run_folder(folder) == [] and folder.completed == before
    assert set(ROUND_2) <= set(before)


def test_a_damaged_adapter_is_trained_again_and_its_records_kept(run_copy):
    (run_copy / "round_2" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    folder = RunFolder(run_copy)
    (repair,) = repair_run_folder(folder)
    assert "not readable safetensors" in repair and "trained again" in repair
    # round 2's rollout stays done (its records are whole), what came after the adapter does not
    assert "round_2/rollout" in folder.completed and not {"round_2/finetune", "round_2/validation"} & set(folder.completed)
    assert {"round_0/validation", "round_1/rollout", "round_1/finetune"} <= set(RunFolder(run_copy).completed)
    # a config that is not JSON, or no weights at all, is found the same way
    adapter = run_copy / "round_1" / "adapter"
    (adapter / "adapter_config.json").write_text("{not json")
    assert "is not JSON" in adapter_problem(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    assert "has no adapter_model.safetensors" in adapter_problem(adapter)


def test_a_round_folder_deleted_by_hand_runs_that_round_again(run_copy):
    shutil.rmtree(run_copy / "round_2")
    folder = RunFolder(run_copy)
    (repair,) = repair_run_folder(folder)
    assert re.search(r"holds 0 of the [1-8] records", repair), repair
    assert not set(ROUND_2) & set(folder.completed) and "round_1/reward_search" in folder.completed


def test_records_cut_short_run_their_round_and_every_later_one_again(run_copy):
    records = run_copy / "round_1" / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[:5]))  # whole lines, fewer of them
    folder = RunFolder(run_copy)
    (repair,) = repair_run_folder(folder)
    assert re.search(r"holds 5 of the [6-8] records", repair), repair
    assert folder.completed == ["round_0/validation"]
    assert len(read_jsonl(records)) == 5  # the whole records are kept for the rollout to resume


def test_damage_that_cannot_be_repaired_safely_is_one_clear_error(run_copy):
    records = run_copy / "round_1" / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    lines[3] = lines[3][: len(lines[3]) // 2] + "\n"  # a torn line in the middle, not at the end
    records.write_text("".join(lines))
    with pytest.raises(RunFolderError, match=r"records\.jsonl:4: not valid JSON, and not the last line.*other lines are kept"):
        repair_run_folder(RunFolder(run_copy))
    (run_copy / "stages.json").write_text('{"round_1/rollout": ')
    with pytest.raises(RunFolderError, match=r"stages\.json is not valid JSON.*delete it to run every stage again"):
        RunFolder(run_copy)
    (run_copy / "stages.json").write_text("[1, 2]")
    with pytest.raises(RunFolderError, match="is not a table of stages"):
        RunFolder(run_copy)
    (run_copy / "stages.json").write_text("{}")
    (run_copy / "fingerprint.json").write_text("")
    with pytest.raises(RunFolderError, match=r"fingerprint\.json is not valid JSON"):
        RunFolder(run_copy, fingerprint={"config": 1})


def test_a_resume_over_a_damaged_adapter_trains_it_again_and_finishes(run_copy, clean_adapters, shared_data_dir):
    # the settings and data of the shared tiny run (helpers.compile_tiny_run)
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    val = load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=3)
    weights = run_copy / "round_2" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut off mid-file
    records = read_jsonl(run_copy / "round_2" / "records.jsonl")
    compiled = tiny_teleprompter(clean_adapters, run_copy).compile(t.TRPromptProgram(), trainset=train, valset=val)
    report = json.loads((run_copy / "report.json").read_text())
    assert len(report["repairs"]) == 1 and "round 2's adapter is trained again" in report["repairs"][0]
    assert read_jsonl(run_copy / "round_2" / "records.jsonl") == records  # not rolled out again
    assert adapter_problem(run_copy / "round_2" / "adapter") is None
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert compiled.prompter.adapter["name"].startswith("prompter-r2-")
    # the LM usage of the stages the earlier process ran is still counted, with this one's
    everything, here = report["usage_all_processes"], report["usage"]["totals"]
    assert everything["stages_without_usage"] == [] and everything["calls"] > here["calls"] > 0
    # ... and per role (what the evidence benchmark's budget table reads)
    assert {"prompter", "target", "critic"} <= set(everything["roles"])
    assert sum(r["calls"] for r in everything["roles"].values()) == everything["calls"]
    assert report["rounds"][0]["usage"]["rollout"]  # round 1 ran in the earlier process
