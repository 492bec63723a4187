"""Two compiles on one shared vLLM server, overlapping in time, each in its own run folder.

Both must finish; neither may serve the other's adapter; each holds at most one LoRA slot while
it runs and, when it ends, only the slot of the adapter its returned program uses; and when every
slot is taken, a third compile stops with a clear error (not base-model answers) and resumes once
a slot is free.
"""

import threading
import time

import pytest

import trprompt_dspy as t
from helpers import tiny_teleprompter
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.adapters import adapter_fingerprint
from trprompt_dspy.infra.serving import AdapterError

pytestmark = pytest.mark.slow


def test_two_overlapping_compiles_share_one_server(clean_adapters, shared_data_dir, tmp_path):
    server = clean_adapters
    assert server.adapter_capacity == 2
    pool = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=8)
    val = load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=3)
    runs = {"a": (pool[:4], 2), "b": (pool[4:], 1)}  # other questions, other round counts
    compiled, spans, failures = {}, {}, {}
    # the most adapters loaded at any moment, sampled while the compiles run
    peak = {"loaded": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak["loaded"] = max(peak["loaded"], len(server.adapters))
            time.sleep(0.05)

    def run(name):
        train, rounds = runs[name]
        start = time.monotonic()
        try:
            compiled[name] = tiny_teleprompter(server, tmp_path / name, rounds=rounds).compile(
                t.TRPromptProgram(), trainset=train, valset=val)
        except BaseException as exc:  # reported by the assertion below
            failures[name] = exc
        spans[name] = (start, time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=run, args=(name,)) for name in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    done.set()
    watcher.join()

    assert not failures, failures
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a0 < b1 and b0 < a1  # they ran at the same time
    assert peak["loaded"] <= 2  # one slot per compile at most, at every moment

    loaded = server.adapters
    for name, program in compiled.items():
        adapter = program.prompter.adapter
        assert adapter is not None, f"compile {name} returned no adapter"
        # its own adapter, from its own run folder, under the name of that adapter's contents
        assert adapter["path"].startswith(str(tmp_path / name) + "/")
        assert adapter["name"].endswith(adapter_fingerprint(adapter["path"])[:12])
        assert loaded[adapter["name"]] == adapter["path"]
        assert program.prompter.get_lm().model.endswith(adapter["name"])
    # compile a's round-1 adapter was unloaded when round 2's came: only the returned two remain
    assert set(loaded) == {p.prompter.adapter["name"] for p in compiled.values()}
    assert compiled["a"].prompter.adapter["path"].startswith(str(tmp_path / "a" / "round_2"))

    # every slot is taken now: a third compile stops with a clear error when it must serve its adapter
    third = tiny_teleprompter(server, tmp_path / "c", rounds=1)
    with pytest.raises(AdapterError, match=r"round 1: cannot load .* adapters loaded and max_loras=3.*same log_dir to resume"):
        third.compile(t.TRPromptProgram(), trainset=pool[:4], valset=val)
    # a slot freed, the same compile resumes (rollout and SFT are not redone) and finishes
    server.unload_adapter(compiled["b"].prompter.adapter["name"])
    finished = tiny_teleprompter(server, tmp_path / "c", rounds=1).compile(t.TRPromptProgram(), trainset=pool[:4], valset=val)
    assert finished.prompter.adapter["path"].startswith(str(tmp_path / "c" / "round_1"))
