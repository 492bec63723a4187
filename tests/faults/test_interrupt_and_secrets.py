"""Ctrl-C during a compile stops it within seconds, leaves no process behind and a resumable run
folder; API keys given through the environment or an LM never land in anything a compile writes."""

import json
import signal
import time
from pathlib import Path

import pytest

import trprompt_dspy as t
from helpers import PLANTED_KEY, alive, start_child_compile, tiny_teleprompter, wait_for_records
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.runs import read_jsonl


@pytest.mark.timeout(600)
def test_ctrl_c_stops_quickly_leaves_no_process_and_resumes(clean_adapters, shared_data_dir, tmp_path):
    log_dir, pids_file = tmp_path / "run", tmp_path / "server-pids.json"
    records = log_dir / "round_1" / "records.jsonl"
    child = start_child_compile(clean_adapters.model_path, shared_data_dir, log_dir, rounds=1, pids_file=pids_file)
    try:
        wait_for_records(child, records, 2)
        child.send_signal(signal.SIGINT)
        sent = time.monotonic()
        child.wait(timeout=60)
        stopped_s = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0 and stopped_s < 30, stopped_s
    server_pids = json.loads(pids_file.read_text())
    deadline = time.monotonic() + 10
    while any(alive(p) for p in server_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in server_pids if alive(p)], "server processes were left behind"

    before = read_jsonl(records)
    assert 2 <= len(before) < 8
    tele = tiny_teleprompter(clean_adapters, log_dir, rounds=1)
    compiled = tele.compile(t.TRPromptProgram(), trainset=load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4))
    after = read_jsonl(records)
    assert len(after) == 8 and after[: len(before)] == before  # nothing lost, nothing duplicated
    assert compiled.prompter.adapter["name"].startswith("prompter-r1-")
    rollout = json.loads((log_dir / "report.json").read_text())["rounds"][0]["rollout"]
    assert (rollout["resumed"], rollout["new"]) == (len(before), 8 - len(before))


@pytest.mark.timeout(600)
def test_api_keys_never_land_in_run_folders_saved_programs_or_logs(tiny_run, vllm_server, tmp_path, monkeypatch):
    # the shared run compiled with the key planted in the environment and in the LM its critic
    # and optimizer reach the local server through (as if it were an API that needs a key)
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED_KEY)
    monkeypatch.setenv("TRPROMPT_TEST_TOKEN", PLANTED_KEY + "-env")
    assert tiny_run.keyed_lm.kwargs["api_key"] == PLANTED_KEY and tiny_run.report["rounds"][0]["usage"]["rollout"]["critic"]
    program = tiny_run.compiled.deepcopy()
    program.solver.set_lm(tiny_run.keyed_lm)  # an LM holding the key, saved with the program
    program.save(tmp_path / "program")

    written = [p for folder in (tiny_run.log_dir, tmp_path) for p in folder.rglob("*") if p.is_file()]
    assert len(written) > 10 and (tmp_path / "program" / "manifest.json") in written
    if vllm_server.log_path:
        written.append(Path(vllm_server.log_path))
    leaks = [str(p) for p in written if PLANTED_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks
