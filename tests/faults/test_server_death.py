"""The local vLLM server killed (SIGKILL, by pid) during SFT and during the reward search: the
compile restarts it, reloads the adapter and finishes; nothing completed is lost or duplicated.
(Mid-rollout, and the bounded restarts with a resumable error, are in test_teleprompter.py.)"""

import dataclasses
import json

import pytest

import trprompt_dspy as t
from helpers import kill_when, tiny_teleprompter
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.runs import read_jsonl


def _done(log_dir, stage):
    path = log_dir / "stages.json"
    try:
        return stage in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


@pytest.mark.timeout(600)
@pytest.mark.parametrize("during", ["round_1/finetune", "round_1/reward_search"])
def test_server_killed_during_sft_or_search_is_restarted_and_the_compile_finishes(vllm_server, shared_data_dir, tmp_path, during):
    config = dataclasses.replace(vllm_server.config, port=None, log_path=tmp_path / "vllm.log")
    log_dir = tmp_path / "run"
    # the stage before the one to hit is done: the hit stage is running (or about to)
    previous = {"round_1/finetune": "round_1/rollout", "round_1/reward_search": "round_1/finetune"}[during]
    with t.VLLMServer(config) as server:
        tele = tiny_teleprompter(server, log_dir, rounds=1)
        tele.lm_kwargs["num_retries"] = 1
        if during == "round_1/reward_search":
            # kill once the search has started evaluating (its folder exists), not before
            ready = lambda: _done(log_dir, previous) and (log_dir / "round_1" / "reward_search").exists()  # noqa: E731
        else:
            ready = lambda: _done(log_dir, previous)  # noqa: E731
        watcher = kill_when(server, ready)
        train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
        compiled = tele.compile(t.TRPromptProgram(), trainset=train, valset=train[:2])
        watcher.join()
        report = json.loads((log_dir / "report.json").read_text())
        assert server.restarts == 1 and len(report["server_restarts"]) == 1
        # SFT does not need the server: it is not re-run, the server is restarted before serving
        expected = "round_1/serve_adapter" if during == "round_1/finetune" else during
        assert report["server_restarts"][0]["during"] == expected
        assert compiled.prompter.adapter["name"] in server.adapters  # the adapter is served again
        records = read_jsonl(log_dir / "round_1" / "records.jsonl")
        assert len(records) == 8 and len({(r["example_id"], r["extra"]["sample"]) for r in records}) == 8
        stages = json.loads((log_dir / "stages.json").read_text())
        assert {"round_1/rollout", "round_1/finetune", "round_1/reward_search", "round_1/validation"} <= set(stages)
        assert (log_dir / "round_1" / "reward_search" / "reward_search.json").is_file()
        assert len(list((log_dir / "round_1").glob("adapter*"))) == 1  # one adapter, no stray copy
