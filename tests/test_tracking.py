"""Experiment tracking in MLflow (``TRPromptConfig.track="mlflow"``): a real compile on the tiny
model logged to a real local SQLite store and read back; without MLflow installed, one line
saying how to install it, before any LM call."""

import json
import sys
from pathlib import Path

import dspy
import pytest

import trprompt_dspy as t
from helpers import tiny_teleprompter
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.tracking import TrackingError, make_tracker
from trprompt_dspy.teleprompter import TRPromptConfig


def test_a_compile_is_logged_to_a_local_mlflow_store(clean_adapters, shared_data_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    log_dir = tmp_path / "run"
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    val = load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=2)
    tele = tiny_teleprompter(clean_adapters, log_dir, rounds=1, validate_initial=False, track="mlflow")
    compiled = tele.compile(t.TRPromptProgram(), trainset=train, valset=val)
    report = json.loads((log_dir / "report.json").read_text())

    client = MlflowClient(f"sqlite:///{log_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trprompt").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["config.rounds"] == "1" and run.data.params["config.rollout.n_samples"] == "2"
    row = report["rounds"][0]
    (val_acc,) = client.get_metric_history(run.info.run_id, "validation_accuracy")
    assert val_acc.step == 1 and val_acc.value == row["validation"]["accuracy"]
    rollout_calls = sum(m["calls"] for models in row["usage"]["rollout"].values() for m in models.values())
    assert run.data.metrics["rollout_lm_calls"] == rollout_calls == 4 * 2 * 3
    assert run.data.metrics["sft_final_loss"] == row["finetune"]["final_loss"]
    assert len(client.get_metric_history(run.info.run_id, "sft_loss_round_1")) == len(row["finetune"]["loss_curve"]) >= 1
    # artifacts: t*, the report, the plot and the compiled program, beside the database
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(log_dir)
    assert (artifacts / "t_star.txt").read_text() == compiled.prompter.reward
    assert json.loads((artifacts / "report.json").read_text())["selected_round"] == report["selected_round"]
    assert (artifacts / "report.png").is_file() and (artifacts / "program" / "program.json").is_file()
    assert (artifacts / "round_1" / "t_star.txt").read_text() == row["reward_search"]["best_reward"]


def test_tracking_without_mlflow_is_one_line_before_any_lm_call(clean_adapters, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    with pytest.raises(TrackingError, match=r"pip install 'trprompt-dspy\[track\]'"):
        make_tracker("mlflow", tmp_path)
    tele = tiny_teleprompter(clean_adapters, tmp_path / "run", track="mlflow")
    ex = [dspy.Example(id=f"q{i}", question="1+1?", answer="2").with_inputs("question") for i in range(3)]
    with pytest.raises(TrackingError):
        tele.compile(t.TRPromptProgram(), trainset=ex)
    assert not (tmp_path / "run" / "round_1").exists()  # nothing ran
    # untracked, nothing needs MLflow
    assert make_tracker(None, tmp_path) is None
    with pytest.raises(ValueError, match="track must be"):
        TRPromptConfig(track="wandb")
    from trprompt_dspy.app.cli import build_parser, compile_config

    config = compile_config(build_parser().parse_args(["compile", "--track", "mlflow", "--track-uri", "sqlite:///x.db"]))
    assert (config.track, config.track_uri) == ("mlflow", "sqlite:///x.db")
