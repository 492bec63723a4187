"""TRPromptTeleprompter end to end on the tiny model through the real stack: vLLM server, trl
SFT, TextGrad search; the compiled program saved, loaded in a new process and run."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import dspy
import pytest

import trprompt_dspy as t
from helpers import has_records, kill_when, start_child_compile, tiny_config, tiny_teleprompter, wait_for_records
from trprompt_dspy.data import load_dataset
from trprompt_dspy.metrics import gsm8k_metric
from trprompt_dspy.rollout.rollout import RolloutConfig
from trprompt_dspy.infra.runs import read_jsonl
from trprompt_dspy.teleprompter import TRPromptConfig, TRPromptTeleprompter, rebalance_records


def test_compile_two_rounds_save_load_in_a_new_process(tiny_run, vllm_server, tmp_path):
    compiled, log_dir, report = tiny_run.compiled, tiny_run.log_dir, tiny_run.report

    # the student is untouched; the compiled copy carries t* and its adapter
    assert tiny_run.student.prompter.adapter is None and tiny_run.student.prompter.generate.lm is None
    assert report["selected_round"] == 2  # tiny_config: select_round="last"
    assert compiled.prompter.adapter["name"].startswith("prompter-r2-")
    assert compiled.prompter.generate.lm.model == f"hosted_vllm/{compiled.prompter.adapter['name']}"

    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert "initial_validation" in report
    for row in report["rounds"]:
        assert row["rollout"]["records"] == 8  # 4 questions x 2 samples
        assert row["finetune"]["steps"] == 2
        assert row["validation"]["n"] == 3
        assert row["usage"]["rollout"], "rollout LM calls were counted"
    assert report["final_reward"] == compiled.prompter.reward
    assert 0 < report["lm_busy_s"] < report["wall_s"] and report["training_s"] > 0
    assert (log_dir / "report.png").stat().st_size > 1000
    assert len(read_jsonl(log_dir / "round_1" / "records.jsonl")) == 8
    assert (log_dir / "round_2" / "adapter" / "adapter_model.safetensors").is_file()
    assert (log_dir / "round_1" / "reward_search" / "reward_search.json").is_file()
    # t* is also scored on the validation questions (which no adapter was trained on), and is
    # no longer than the longest critique the round's adapter saw
    from trprompt_dspy.metrics import answer_in_text
    from trprompt_dspy.reward_search import read_trace

    for k, row in enumerate(report["rounds"], start=1):
        search = row["reward_search"]
        assert search["heldout"] == 3 and search["accuracy_source"] == "heldout"
        trained = [r for i in range(1, k + 1) for r in read_jsonl(log_dir / f"round_{i}" / "records.jsonl")
                   if r["prompt"].strip() and r["critique"].strip()
                   and not answer_in_text(r["prompt"], r["reference"], r["question"])]
        longest = max(len(r["critique"].strip()) for r in trained)
        assert search["max_reward_chars"] == max(20, min(200, longest))
        trace = read_trace(log_dir / f"round_{k}" / "reward_search")
        assert trace["config"]["max_reward_chars"] == search["max_reward_chars"]
        assert trace["trace"][0]["current_heldout_accuracy"] is not None
        assert len(search["best_reward"]) <= search["max_reward_chars"] or search["best_reward"] == row["reward_in"]

    out = tmp_path / "compiled"
    compiled.save(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompters"]["prompter.generate"]["reward"] == compiled.prompter.reward
    files = sorted(p.name for p in (out / "adapters").rglob("*") if p.is_file())
    assert "adapter_model.safetensors" in files and all(f.endswith((".safetensors", ".json")) for f in files)

    # a fresh process loads the folder, serves the adapter on a server it starts, and runs a
    # different pipeline around the loaded prompter
    script = textwrap.dedent(f"""
        import dspy, trprompt_dspy as t
        from trprompt_dspy.modules.compiled import load_compiled, serve_prompters

        class VerifiedSolve(dspy.Module):
            def __init__(self):
                super().__init__()
                self.prompter = t.QueryAwarePrompter()
                self.solve = dspy.ChainOfThought("question, prompt -> answer")
                self.check = dspy.Predict("question, answer -> is_plausible: bool")
            def forward(self, question):
                prompt = self.prompter(question=question).prompt
                answer = self.solve(question=question, prompt=prompt).answer
                return dspy.Prediction(prompt=prompt, answer=answer, ok=self.check(question=question, answer=answer).is_plausible)

        loaded = t.TRPromptProgram()
        load_compiled(loaded, {str(out)!r})
        pipeline = VerifiedSolve()
        pipeline.prompter = loaded.prompter
        server = serve_prompters(pipeline, t.VLLMServer(model={vllm_server.model_path!r}, served_model_name="base",
                                 dtype="float32", max_lora_rank=8, max_loras=3).start(),
                                 max_tokens=64, max_string_length=80, cache=False)
        with server, dspy.context(lm=server.lm(structured=True, max_tokens=64, max_string_length=80),
                                  adapter=dspy.JSONAdapter()):
            out = pipeline(question="Tom has 3 apples and buys 2 more. How many apples does he have?")
        print("REWARD", loaded.prompter.reward == {compiled.prompter.reward!r})
        print("PROMPT", type(out.prompt).__name__, "OK", type(out.ok).__name__)
    """)
    # run as a user would, `python /tmp/my_script.py`: the script's folder is the temp folder the
    # server logs go to, and comes first on sys.path
    user_tmp = tmp_path / "user-tmp"
    user_tmp.mkdir()
    (user_tmp / "my_script.py").write_text(script)
    proc = subprocess.run([sys.executable, str(user_tmp / "my_script.py")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TMPDIR": str(user_tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REWARD True" in proc.stdout and "PROMPT str OK bool" in proc.stdout, proc.stdout
    # nothing in the temp folder can be imported in place of the package, and the interpreter
    # exits without a finaliser's traceback
    assert not (user_tmp / "trprompt_dspy").exists()
    assert any((user_tmp / "trprompt-dspy-logs").glob("vllm-base-*.log"))
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_rebalance_keeps_as_many_wrong_as_right_records():
    from trprompt_dspy.rollout.records import RolloutRecord

    records = [RolloutRecord(question=f"q{i}", prompt="p", critique="c", correct=i < 6) for i in range(8)]
    balanced = rebalance_records(records, seed=0)
    assert sum(r.correct for r in balanced) == 2 and sum(not r.correct for r in balanced) == 2
    assert rebalance_records(records[:6]) == records[:6]  # nothing to balance against


def test_the_round_returned_is_the_best_on_validation():
    from trprompt_dspy.teleprompter.rounds import select_round

    rows = [{"validation": {"accuracy": a}} for a in (0.4, 0.2, 0.4)]
    assert select_round(rows, {"accuracy": 0.3}) == 3            # a tie goes to the later round
    assert select_round(rows[:2], {"accuracy": 0.3}) == 1
    assert select_round(rows, {"accuracy": 0.5}) == 0            # the untrained prompter, strictly best
    assert select_round(rows, {"accuracy": 0.4}) == 3 and select_round(rows, None) == 3
    assert select_round(rows[:2], None, "last") == 2 and select_round([{}, {}], None) == 2  # no validation
    with pytest.raises(ValueError, match="select_round"):
        TRPromptConfig(select_round="first")


def test_the_search_scores_t_star_on_questions_kept_out_of_sft():
    from trprompt_dspy.teleprompter.rounds import search_split

    train = [dspy.Example(id=f"t{i}", question=f"q{i}", answer="1") for i in range(10)]
    val = [dspy.Example(id=f"v{i}", question=f"v{i}", answer="1") for i in range(5)]
    # valset (the default): every training question is rolled out, the first N validation ones held out
    assert search_split(train, val, TRPromptConfig(search_heldout_size=3)) == (train, val[:3])
    assert search_split(train, val, TRPromptConfig(search_heldout_size=0))[1] == val
    assert search_split(train, [], TRPromptConfig()) == (train, None)  # no valset: the paper's way
    assert search_split(train, val, TRPromptConfig(search_heldout="none")) == (train, None)
    # trainset: a seeded slice that the rollouts never see, both parts in the trainset's order
    rest, held = search_split(train, val, TRPromptConfig(search_heldout="trainset", search_heldout_size=4, seed=1))
    assert len(held) == 4 and sorted(rest + held, key=train.index) == train and not set(map(id, rest)) & set(map(id, held))
    assert rest == sorted(rest, key=train.index) and held == sorted(held, key=train.index)
    again = search_split(train, val, TRPromptConfig(search_heldout="trainset", search_heldout_size=4, seed=1))
    assert again == (rest, held)
    assert search_split(train, val, TRPromptConfig(search_heldout="trainset", search_heldout_size=4, seed=2)) != again
    with pytest.raises(ValueError, match="leaves no training question"):
        search_split(train, val, TRPromptConfig(search_heldout="trainset", search_heldout_size=10))
    with pytest.raises(ValueError, match="search_heldout must be"):
        TRPromptConfig(search_heldout="test")
    with pytest.raises(ValueError, match="needs search_heldout_size >= 1"):
        TRPromptConfig(search_heldout="trainset", search_heldout_size=0)


def test_records_whose_prompt_gives_the_answer_away_are_not_trained_on():
    from trprompt_dspy.rollout.records import RolloutRecord
    from trprompt_dspy.teleprompter.rounds import without_answer_leaks

    question = "Tom has 3 boxes of 4 apples. How many apples?"
    records = [RolloutRecord(question=question, prompt=prompt, critique="c", reference="12")
               for prompt in ("Multiply the boxes by the apples per box.", "3 x 4 = 12, so answer 12.",
                              "Use the 3 and the 4 of the question.")]
    assert without_answer_leaks(records) == [records[0], records[2]]
    with pytest.raises(ValueError, match="answer_leaks must be"):
        TRPromptConfig(answer_leaks="mask")


def test_bad_compile_arguments(vllm_server, tmp_path):
    tele = tiny_teleprompter(vllm_server, tmp_path / "run")
    ex = [dspy.Example(id="a", question="q", answer="1").with_inputs("question")]
    with pytest.raises(ValueError, match="trainset is empty"):
        tele.compile(t.TRPromptProgram(), trainset=[])
    with pytest.raises(ValueError, match="reward search needs at least"):
        tele.compile(t.TRPromptProgram(), trainset=ex)
    with pytest.raises(ValueError, match="exactly one QueryAwarePrompter"):
        tele.compile(t.Solver(), trainset=ex * 3)
    with pytest.raises(ValueError, match="rounds must be"):
        TRPromptConfig(rounds=0)
    with pytest.raises(ValueError, match="needs a running VLLMServer"):
        TRPromptTeleprompter(server=None)


def test_killed_compile_resumes_without_regenerating_records(clean_adapters, shared_data_dir, tmp_path):
    log_dir = tmp_path / "run"
    records = log_dir / "round_1" / "records.jsonl"
    # the child compiles with ONE rollout thread (records arrive one by one) on its own server
    child = start_child_compile(clean_adapters.model_path, shared_data_dir, log_dir)
    try:
        wait_for_records(child, records, 3, timeout_s=240)
        child.kill()  # SIGKILL mid-rollout: no chance to clean up
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
    before = read_jsonl(records)
    assert 3 <= len(before) < 8, len(before)

    tele = tiny_teleprompter(clean_adapters, log_dir)
    tele.config.rollout = dataclasses.replace(tele.config.rollout, num_threads=1)
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    compiled = tele.compile(t.TRPromptProgram(), trainset=train)

    after = read_jsonl(records)
    assert len(after) == 8
    # the records written before the kill are kept as they were, not generated again
    assert after[: len(before)] == before
    key = lambda r: (r["example_id"], r["extra"]["sample"])  # noqa: E731
    assert len({key(r) for r in after}) == 8
    report = json.loads((log_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][0]["rollout"]["resumed"] == len(before)
    assert report["rounds"][0]["rollout"]["new"] == 8 - len(before)
    assert report["selected_round"] == 2  # tiny_config: select_round="last"
    assert compiled.prompter.adapter["name"].startswith("prompter-r2-")


def test_records_with_an_empty_prompt_or_critique_are_not_trained_on(tmp_path):
    # seen on the embedded 135M model: a sampled prompt can be empty
    from trprompt_dspy.rollout.records import RolloutRecord, write_records
    from trprompt_dspy.infra.runs import RunFolder
    from trprompt_dspy.teleprompter.rounds import _RoundLoop

    loop = _RoundLoop.__new__(_RoundLoop)
    loop.folder, loop.config = RunFolder(tmp_path), tiny_config()
    records = [RolloutRecord(question="q1", prompt="p", critique="c"), RolloutRecord(question="q2", prompt=" ", critique="c"),
               RolloutRecord(question="q3", prompt="p", critique="")]
    write_records(tmp_path / "round_1" / "records.jsonl", records)
    assert [r.question for r in loop._training_records(1)] == ["q1"]


def test_server_killed_mid_rollout_is_restarted_or_stops_resumably(vllm_server, shared_data_dir, tmp_path):
    from trprompt_dspy.teleprompter import ServerDiedError

    config = dataclasses.replace(vllm_server.config, port=None, log_path=tmp_path / "vllm.log")
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=6)
    log_dir, records = tmp_path / "run", tmp_path / "run" / "round_1" / "records.jsonl"
    one_thread = RolloutConfig(n_samples=2, temperature=1.0, num_threads=1)

    def tele(server, restarts):
        tele = tiny_teleprompter(server, log_dir, rounds=1, rollout=one_thread, max_server_restarts=restarts)
        # one quick retry: a dead server refuses connections, there is nothing to wait for
        tele.lm_kwargs["num_retries"] = 1
        return tele

    with t.VLLMServer(config) as server:
        # no restart allowed: a clear error, and what was done stays in the run folder
        watcher = kill_when(server, lambda: has_records(records, 3))
        with pytest.raises(ServerDiedError, match="compile again with the same log_dir"):
            tele(server, 0).compile(t.TRPromptProgram(), trainset=train)
        watcher.join()
        first = read_jsonl(records)
        assert 3 <= len(first) < 12 and not server.running and server.pids() == []

        # the user restarts the server and resumes; the server dies again and is restarted
        server.restart()
        watcher = kill_when(server, lambda: has_records(records, len(first) + 2))
        compiled = tele(server, 1).compile(t.TRPromptProgram(), trainset=train)
        watcher.join()
        assert server.running and server.restarts == 2
        after = read_jsonl(records)
        assert len(after) == 12 and after[: len(first)] == first
        assert len({(r["example_id"], r["extra"]["sample"]) for r in after}) == 12  # none twice
        report = json.loads((log_dir / "report.json").read_text())
        assert [r["during"] for r in report["server_restarts"]] == ["round_1/rollout"]
        assert report["server_start_s"] > 0
        assert compiled.prompter.adapter["name"] in server.adapters


def test_usage_is_counted_per_role_when_roles_share_one_model(tiny_run):
    report = tiny_run.report
    usage = report["rounds"][0]["usage"]
    # one model plays every role here (the critic and the optimizer even share one LM object);
    # the calls are still told apart by role
    assert set(usage["rollout"]) == {"prompter", "target", "critic"}
    assert {"prompter", "target", "optimizer"} <= set(usage["reward_search"])
    roles = report["usage"]["roles"]
    # one critique per record: 2 rounds x 4 questions x 2 samples; the optimizer's calls apart
    assert roles["critic"]["calls"] == 16 and roles["optimizer"]["calls"] > 0
    assert roles["prompter"]["calls"] >= 16 and roles["target"]["calls"] >= 16
    # a local model has no price: its cost is unknown, not zero
    assert roles["target"]["cost_usd"] is None and roles["target"]["unpriced_calls"] == roles["target"]["calls"]
    assert report["usage"]["totals"]["calls"] == sum(r["calls"] for r in roles.values())


def _offline_tele(**kwargs):
    """A teleprompter over a stand-in for a running server: for what is decided before a compile."""
    from types import SimpleNamespace

    server = SimpleNamespace(running=True, model_path="tiny-model", lm=lambda *args, **kwargs: None)
    return TRPromptTeleprompter(server=server, **{"metric": gsm8k_metric, **kwargs})


def test_the_metric_is_required():
    from trprompt_dspy.baselines import QPOTeleprompter

    for metric in (None, "gsm8k"):
        with pytest.raises(TypeError, match=r"needs a metric.*trprompt_dspy\.metrics\.metric_for\(<dataset>\)") as err:
            _offline_tele(metric=metric)
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="QPOTeleprompter needs a metric"):
        QPOTeleprompter(server=_offline_tele().server)
    assert _offline_tele().metric is gsm8k_metric


def test_speed_only_settings_keep_the_run_fingerprint(tmp_path):
    from trprompt_dspy.infra.runs import RunFolder, RunFolderError

    train = [dspy.Example(id=f"q{i}", question="q", answer="1").with_inputs("question") for i in range(3)]

    def folder(config):
        return RunFolder(tmp_path / "run", fingerprint=_offline_tele(config=config)._fingerprint(train, None))

    folder(tiny_config())
    # threads, progress bars and restarts change how fast a run goes: it resumes
    folder(tiny_config(progress=False, val_num_threads=1, max_server_restarts=0, max_lm_calls=5, max_wall_s=60,
                       rollout=RolloutConfig(n_samples=2, temperature=1.0, num_threads=1)))
    # a setting that changes what is computed is refused, at the top level and in a section
    for changed in (tiny_config(rounds=3), tiny_config(rollout=RolloutConfig(n_samples=3, num_threads=8))):
        with pytest.raises(RunFolderError, match="different settings \\(config\\)"):
            folder(changed)
    # everything is still described in config.json
    assert {"progress", "val_num_threads", "max_server_restarts"} <= set(tiny_config().to_dict())
    assert "num_threads" in tiny_config().to_dict()["rollout"]


def test_the_fingerprint_leaves_out_exactly_the_speed_only_settings():
    # the settings a run may be resumed with other values of (the name list these marks replaced)
    from trprompt_dspy.infra.settings import result_settings

    config = TRPromptConfig()
    kept = result_settings(config)
    left_out = {section: set(dataclasses.asdict(getattr(config, section))) - set(kept[section])
                for section in ("rollout", "finetune", "search")}
    left_out["top"] = set(config.to_dict()) - set(kept)
    assert left_out == {
        "top": {"progress", "max_server_restarts", "val_num_threads", "max_lm_calls", "max_cost_usd", "max_wall_s",
                "track", "track_uri"},
        "rollout": {"num_threads"},
        "finetune": {"cpu_threads", "device", "gradient_checkpointing", "overwrite", "micro_batch_size", "progress"},
        "search": {"num_threads", "progress", "straggler_timeout_s"},
    }
