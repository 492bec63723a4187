"""Ctrl-C during a compile stops it within seconds, leaves no process behind and a resumable run
folder; API keys given through the environment or an LM never land in anything a compile writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import trprompt_dspy as t
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.runs import read_jsonl

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from test_teleprompter import _tele  # noqa: E402  (the tiny compile settings)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(600)
def test_ctrl_c_stops_quickly_leaves_no_process_and_resumes(vllm_server, shared_data_dir, tmp_path):
    log_dir, pids_file = tmp_path / "run", tmp_path / "server-pids.json"
    records = log_dir / "round_1" / "records.jsonl"
    script = textwrap.dedent(f"""
        import json, sys, dataclasses
        sys.path.insert(0, {str(TESTS)!r})
        import trprompt_dspy as t
        from trprompt_dspy.data import load_dataset
        from test_teleprompter import _tele
        server = t.VLLMServer(model={vllm_server.model_path!r}, served_model_name="base", dtype="float32",
                              max_lora_rank=8, max_loras=3).start()
        open({str(pids_file)!r}, "w").write(json.dumps(server.pids()))
        tele = _tele(server, {str(log_dir)!r}, rounds=1)
        tele.config.rollout = dataclasses.replace(tele.config.rollout, num_threads=1)
        with server:
            tele.compile(t.TRPromptProgram(), trainset=load_dataset("gsm8k", "train", data_dir={str(shared_data_dir)!r}, limit=4))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (records.is_file() and len(read_jsonl(records)) >= 2):
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no records appeared"
            time.sleep(0.1)
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
    while any(_alive(p) for p in server_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in server_pids if _alive(p)], "server processes were left behind"

    before = read_jsonl(records)
    assert 2 <= len(before) < 8
    tele = _tele(vllm_server, log_dir, rounds=1)
    compiled = tele.compile(t.TRPromptProgram(), trainset=load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4))
    after = read_jsonl(records)
    assert len(after) == 8 and after[: len(before)] == before  # nothing lost, nothing duplicated
    assert compiled.prompter.adapter is not None
    for name in list(vllm_server.adapters):
        vllm_server.unload_adapter(name)


PLANTED = "sk-planted-0123456789abcdefSECRET"


@pytest.mark.timeout(600)
def test_api_keys_never_land_in_run_folders_saved_programs_or_logs(vllm_server, shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    monkeypatch.setenv("TRPROMPT_TEST_TOKEN", PLANTED + "-env")
    # the critic and optimizer reach the local server as if it were an API that needs a key
    keyed = vllm_server.lm(structured=True, api_key=PLANTED, max_tokens=96, max_string_length=120, cache=False)
    tele = _tele(vllm_server, tmp_path / "run", rounds=1)
    tele.critic_lm, tele.optimizer_lm = keyed, keyed
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=2)
    compiled = tele.compile(t.TRPromptProgram(), trainset=train, valset=train[:1])
    compiled.solver.set_lm(keyed)  # an LM holding the key, saved with the program
    compiled.save(tmp_path / "program")
    for name in list(vllm_server.adapters):
        vllm_server.unload_adapter(name)

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    if vllm_server.log_path:
        written.append(Path(vllm_server.log_path))
    leaks = [str(p) for p in written if PLANTED.encode() in p.read_bytes()]
    assert not leaks, leaks
