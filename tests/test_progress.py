"""One progress display per compile (``infra/progress.py``): a real compile on the tiny model
shows one line per stage and its round summary, and neither DSPy's per-batch bars nor trl's
loss dicts reach the console."""

import io

from rich.console import Console

import trprompt_dspy as t
from helpers import tiny_teleprompter
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra import progress
from trprompt_dspy.infra.progress import CompileDisplay


def test_a_compile_shows_one_line_per_stage_and_its_summary(clean_adapters, shared_data_dir, tmp_path, monkeypatch,
                                                             capfd):
    screen = io.StringIO()
    # a log file, not a terminal: one line per finished stage
    monkeypatch.setattr(progress, "_CONSOLE", Console(file=screen, force_terminal=False, width=200))
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    val = load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=2)
    tele = tiny_teleprompter(clean_adapters, tmp_path / "run", rounds=1, validate_initial=False, progress=True)
    tele.compile(t.TRPromptProgram(), trainset=train, valset=val)
    lines = screen.getvalue().splitlines()
    stages = [line.split(":")[0] for line in lines if line.startswith("round 1/1 · ")]
    assert stages == ["round 1/1 · rollout", "round 1/1 · finetune", "round 1/1 · reward_search",
                      "round 1/1 · validation"], lines
    rollout = next(line for line in lines if line.startswith("round 1/1 · rollout"))
    assert "8/8" in rollout and "acc " in rollout and "LM calls" in rollout  # 4 questions x 2 samples
    finetune = next(line for line in lines if line.startswith("round 1/1 · finetune"))
    assert "2/2" in finetune and "loss " in finetune  # tiny_config: max_steps=2
    assert any(line.startswith("round 1: val acc") for line in lines)  # the summary, once
    assert sum(line.startswith("round 1: val acc") for line in lines) == 1
    captured = capfd.readouterr()
    for noise in ("Processed", "{'loss'", "'grad_norm'", "it/s]"):
        assert noise not in captured.out + captured.err, noise


def test_on_a_terminal_the_line_is_live_and_summaries_print_above_it():
    screen = Console(file=io.StringIO(), force_terminal=True, width=160, record=True)
    with CompileDisplay(rounds=2, console_=screen) as display:
        assert display.live
        with display.stage("round_1/rollout"):
            display.batch_started(3)
            for output in ({"score": 1.0}, {"score": 0.0}, None):
                display.item_done(output)
        display.print("round 1: val acc 0.500")
    text = screen.export_text()
    assert "round 1: val acc 0.500" in text
    assert "round 1/2 · rollout" in text and "3/3" in text and "acc 50% of 2" in text
