"""The estimate before a compile (``TRPromptTeleprompter.estimate``, ``trprompt compile --dry-run``)
checked against a real compile on the tiny model: the calls of every rollout and validation
exactly, the t* search within its bound, tokens and LM time from a real probe."""

import trprompt_dspy as t
from helpers import tiny_config, tiny_teleprompter
from trprompt_dspy.data import load_dataset
from trprompt_dspy.teleprompter.estimate import count_calls, serves_adapter, stage_seconds


def _actual_calls(report, stage):
    return {role: sum(m["calls"] for m in models.values())
            for role, models in report["usage"]["stages"].get(stage, {}).items()}


def test_the_estimate_matches_a_real_compile(tiny_run, vllm_server, shared_data_dir, tmp_path):
    # the settings and data of the shared tiny compile (helpers.compile_tiny_run)
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    val = load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=3)
    tele = tiny_teleprompter(vllm_server, tmp_path / "unused")
    estimate = tele.estimate(t.TRPromptProgram(), trainset=train, valset=val, probe=4)
    report = tiny_run.report
    assert [s.stage for s in estimate.stages] == [
        "round_0/validation", "round_1/rollout", "round_1/reward_search", "round_1/validation",
        "round_2/rollout", "round_2/reward_search", "round_2/validation"]
    for stage in estimate.stages:
        actual = _actual_calls(report, stage.stage)
        if stage.at_most:  # the search: fewer when a proposal is invalid (not evaluated)
            assert all(actual.get(role, 0) <= n for role, n in stage.calls.items()), (stage, actual)
            assert set(actual) <= set(stage.calls)
        else:
            assert actual == stage.calls, (stage.stage, actual)
    assert estimate.totals()["calls"] >= report["usage"]["totals"]["calls"]
    # the probe measured every rollout role; local models are unpriced, never $0
    probe = estimate.probe
    assert probe["questions"] == 4 and probe["seconds"] > 0 and probe["completion_tokens_per_s"] > 0
    for role in ("prompter", "target", "critic"):
        assert estimate.per_call[role]["prompt_tokens"] > 0 and estimate.per_call[role]["cost_usd"] is None
    assert estimate.per_call["optimizer"]["at_most"] and estimate.totals()["cost_usd"] is None
    assert estimate.wall_s > 0
    # the stages after round 1's SFT serve the prompter's adapter: a second probe timed them with an
    # untrained adapter of the compile's LoRA shape, which is unloaded again
    assert probe["adapter"]["questions"] == 4 == probe["adapter"]["concurrency"] == probe["concurrency"]
    assert probe["adapter"]["completion_tokens_per_s"] > 0
    assert not [name for name in vllm_server.adapters if name.startswith("estimate-probe-")]
    by_stage = {s.stage: stage_seconds(s, estimate.per_call, probe) for s in estimate.stages}
    assert estimate.wall_s == round(sum(by_stage.values()), 1)
    rollout_tokens = {s.stage: sum(n * estimate.per_call[r]["completion_tokens"] for r, n in s.calls.items())
                      for s in estimate.stages if s.stage.endswith("rollout")}
    assert by_stage["round_1/rollout"] == round(rollout_tokens["round_1/rollout"] / probe["completion_tokens_per_s"], 1)
    assert by_stage["round_2/rollout"] == round(
        rollout_tokens["round_2/rollout"] / probe["adapter"]["completion_tokens_per_s"], 1)
    # the tokens of the rollout roles land near the compile's own (same model, same prompts)
    actual = report["usage"]["roles"]
    for role in ("prompter", "target", "critic"):
        mean = (actual[role]["prompt_tokens"]) / actual[role]["calls"]
        assert 0.5 * mean <= estimate.per_call[role]["prompt_tokens"] <= 2 * mean, (role, estimate.per_call[role], mean)
    table = estimate.table()
    assert "round_1/reward_search" in table and "at most" in table and "unpriced" in table


def test_only_round_0_and_round_1s_rollout_run_on_the_base_model():
    stages = [s.stage for s in count_calls(tiny_config(), n_train=4, n_val=2)]
    assert [s for s in stages if not serves_adapter(s)] == ["round_0/validation", "round_1/rollout"]


def test_a_numeric_reward_has_no_critic_and_no_search():
    stages = count_calls(tiny_config(reward="numeric"), n_train=4, n_val=0)
    assert [s.stage for s in stages] == ["round_1/rollout", "round_2/rollout"]
    assert stages[0].calls == {"prompter": 8, "target": 8} and not stages[0].at_most
    # t* kept after round 1: one search only
    stages = count_calls(tiny_config(update_reward=False), n_train=4, n_val=2)
    assert [s.stage for s in stages if "search" in s.stage] == ["round_1/reward_search"]


def test_a_cached_validation_counts_only_the_questions_the_search_did_not_score():
    # the demo's compile (DSPy's cache on): t* was scored on the 16 held-out validation
    # questions during the search, so its validation made 0 new calls (estimate_check_demo.md)
    config = tiny_config(search_heldout="valset", search_heldout_size=2)
    val = {s.stage: s.calls for s in count_calls(config, n_train=4, n_val=3, cached=True)}
    assert val["round_1/validation"] == {"prompter": 1, "target": 1}
    assert val["round_0/validation"] == {"prompter": 3, "target": 3}  # no search before it
    uncached = {s.stage: s.calls for s in count_calls(config, n_train=4, n_val=3)}
    assert uncached["round_1/validation"] == {"prompter": 3, "target": 3}
    # t* kept after round 1: round 2's adapter is new and its validation is asked in full
    kept = {s.stage: s.calls for s in count_calls(tiny_config(update_reward=False, search_heldout_size=0),
                                                  n_train=4, n_val=3, cached=True)}
    assert kept["round_1/validation"] == {"prompter": 0, "target": 0}
    assert kept["round_2/validation"] == {"prompter": 3, "target": 3}
    # held-out questions from the trainset: the validation shares nothing with the search
    trainside = {s.stage: s.calls for s in count_calls(tiny_config(search_heldout="trainset", search_heldout_size=1),
                                                       n_train=4, n_val=3, cached=True)}
    assert trainside["round_1/validation"] == {"prompter": 3, "target": 3}


def test_dry_run_counts_without_a_model(capsys, shared_data_dir):
    from trprompt_dspy.app.cli import main

    assert main(["compile", "--dataset", "gsm8k", "--data-dir", str(shared_data_dir), "--train-size", "24",
                 "--val-size", "16", "--rounds", "1", "--dry-run", "--probe", "0"]) == 0
    out = capsys.readouterr().out
    # 24 questions x 4 samples (RolloutConfig's default) x prompter, solver and critic
    assert "round_1/rollout" in out and " 288" in out and "at most" in out and "not probed" in out
    assert "not counted: requests DSPy re-sends" in out


def test_dry_run_writes_the_estimate_it_prints(capsys, shared_data_dir, tmp_path):
    import json

    from trprompt_dspy.app.cli import main
    from trprompt_dspy.teleprompter.estimate import CompileEstimate

    common = ["compile", "--dataset", "gsm8k", "--data-dir", str(shared_data_dir), "--train-size", "24",
              "--val-size", "16", "--rounds", "1"]
    path = tmp_path / "out" / "estimate.json"
    assert main([*common, "--dry-run", "--probe", "0", "--estimate-out", str(path)]) == 0
    printed = capsys.readouterr().out
    # read back (benchmarks/estimate_check.py --estimate): the same stages, calls and table
    estimate = CompileEstimate.from_dict(json.loads(path.read_text()))
    assert [s.stage for s in estimate.stages] == ["round_0/validation", "round_1/rollout",
                                                  "round_1/reward_search", "round_1/validation"]
    assert estimate.stages[1].calls == {"prompter": 96, "target": 96, "critic": 96}
    assert estimate.stages[2].at_most and not estimate.stages[1].at_most
    assert estimate.table() in printed and f"estimate written to {path}" in printed
    # an estimate is made before a compile: without --dry-run the flag is refused, in one line
    assert main([*common, "--estimate-out", str(path)]) == 2
    assert "--estimate-out goes with --dry-run" in capsys.readouterr().err
