"""The ``trprompt`` command: argument and input errors give one message and exit status 2;
``trprompt demo --tiny`` runs the whole main job (real vLLM, trl, TextGrad) on the tiny model."""

import json
import socket
import subprocess
import sys

import pytest
from helpers import cli_error

from trprompt_dspy.app.cli import main
from trprompt_dspy.app.config_file import ConfigError, config_from_dict, load_config
from trprompt_dspy.data.word_problems import word_problems


def test_user_mistakes_give_one_clear_message(capsys, tmp_path, monkeypatch, shared_data_dir):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert "unknown dataset 'nope'" in cli_error(capsys, ["demo", "--dataset", "nope"])
    assert "unknown dataset 'nope'" in cli_error(capsys, ["compile", "--dataset", "nope"])
    assert "no such file" in cli_error(capsys, ["compile", "--file", str(tmp_path / "missing.jsonl")])
    assert "no such config file" in cli_error(capsys, ["compile", "--config", str(tmp_path / "c.toml")])
    assert "not a saved TRPrompt program" in cli_error(capsys, ["evaluate", str(tmp_path)])
    assert "needs OPENAI_API_KEY" in cli_error(capsys, [
        "compile", "--data-dir", str(shared_data_dir), "--train-size", "2", "--val-size", "0",
        "--critic-model", "openai/gpt-4o-mini"])
    assert "does not exist" in cli_error(capsys, [
        "compile", "--data-dir", str(shared_data_dir), "--train-size", "2", "--val-size", "0",
        "--model", str(tmp_path / "no-model"), "--log-dir", str(tmp_path / "run")])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"port {port}" in cli_error(capsys, [
            "compile", "--data-dir", str(shared_data_dir), "--train-size", "2", "--val-size", "0",
            "--port", str(port), "--log-dir", str(tmp_path / "run2")])
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 2\nroundz = 3\n")
    assert "unknown setting(s) roundz" in cli_error(capsys, ["compile", "--config", str(bad)])
    (tmp_path / "run3").mkdir()
    assert "holds no run to continue" in cli_error(capsys, [
        "compile", "--data-dir", str(shared_data_dir), "--train-size", "2", "--val-size", "0",
        "--resume", "--log-dir", str(tmp_path / "run3")])
    # argparse's own errors (status 2 as well)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--train", "0"])
    assert exc.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_help_and_the_package_import_load_no_training_stack():
    """``trprompt --help`` and ``import trprompt_dspy`` stay light (they took ~6 s when the package
    imported torch, trl, peft and textgrad eagerly); every public name still resolves."""
    heavy = ("torch", "trl", "peft", "textgrad", "vllm")
    probe = (
        "import sys, contextlib, io\n"
        "import trprompt_dspy as t\n"
        "from trprompt_dspy.app.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert 'demo' in out.getvalue()\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))\n"
        "print(all(getattr(t, n) is not None for n in t.__all__), callable(t.serve_prompters))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    before_access, resolved = out.stdout.splitlines()[-2:]
    assert before_access == "[]", out.stdout
    assert resolved == "True True", out.stdout


def test_config_files_in_toml_and_yaml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('rounds = 3\nrebalance = "balance"\n[rollout]\nn_samples = 2\n[finetune]\nlora_r = 8\n'
                    'target_modules = ["q_proj", "v_proj"]\n[search]\nsteps = 2\n')
    config = load_config(toml, rounds=1)
    assert config.rounds == 1 and config.rebalance == "balance" and config.rollout.n_samples == 2
    assert config.finetune.lora_r == 8 and config.finetune.target_modules == ["q_proj", "v_proj"]
    assert config.search.steps == 2
    yaml = tmp_path / "c.yaml"
    yaml.write_text("rounds: 2\nsearch:\n  minibatch_size: 4\n  patience: null\n")
    config = load_config(yaml)
    assert config.search.minibatch_size == 4 and config.search.patience is None
    (tmp_path / "x.yaml").write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "x.yaml")  # safe_load: no object construction


@pytest.mark.parametrize("data, message", [
    ({"roundz": 1}, "unknown setting"),
    ({"rounds": "2"}, "expected an integer"),
    ({"rounds": -1}, "rounds must be a positive int"),
    ({"rollout": {"n_samples": 0}}, "n_samples must be a positive int"),
    ({"search": {"steps": 1.5}}, "expected an integer"),
    ({"finetune": 3}, "must be a table"),
    ({"rollout": {"temperature": "hot"}}, "expected a number"),
    ({"update_reward": "yes"}, "expected true or false"),
    ({"finetune": {"overlength": "cut"}}, "must be one of"),
])
def test_bad_config_values_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, shared_data_dir):
    run = tmp_path_factory.mktemp("cli") / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "trprompt_dspy", "demo", "--tiny", "--log-dir", str(run), "--data-dir", str(shared_data_dir)],
        capture_output=True, text=True, timeout=900,
    )
    return run, proc


def test_demo_tiny_runs_the_main_job_end_to_end(tiny_demo):
    run, proc = tiny_demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((run / "results.json").read_text())
    assert list(results["methods"]) == ["zero-shot", "zero-shot CoT", "untrained prompter", "TRPrompt (compiled)"]
    for r in results["methods"].values():
        assert r["n"] == 3 and 0.0 <= r["accuracy"] <= 1.0
    report = json.loads((run / "compile" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert (run / "compile" / "report.png").is_file() and (run / "program" / "manifest.json").is_file()
    assert "TRPrompt (compiled)" in proc.stdout and "trprompt evaluate" in proc.stdout


def test_evaluate_and_serve_a_saved_program(tiny_demo, tmp_path):
    run, proc = tiny_demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    program = run / "program"
    out = tmp_path / "eval.json"
    # the user's own file, with its own column names
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"problem": ex.question, "solution": ex.answer, "qid": f"my-{i}"}) + "\n"
                            for i, ex in enumerate(word_problems(4, seed=3))))
    ev = subprocess.run(
        [sys.executable, "-m", "trprompt_dspy", "evaluate", str(program), "--file", str(mine), "--metric", "words",
         "--question-field", "problem", "--answer-field", "solution", "--id-field", "qid", "--n", "3",
         "--max-tokens", "96", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-4000:]
    assert f"{mine}: accuracy" in ev.stdout
    report = json.loads(out.read_text())
    assert report["n"] == 3 and [r["id"] for r in report["rows"]] == ["my-0", "my-1", "my-2"]

    # stderr is not read here: never let a full pipe block the server's shutdown
    serve = subprocess.Popen([sys.executable, "-m", "trprompt_dspy", "serve", str(program)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in serve.stdout:  # blocks until the server is up and the endpoint is printed
            lines.append(line)
            if "Ctrl-C stops the server" in line:
                break
        text = "".join(lines)
        assert "serving on http://127.0.0.1:" in text and "prompter adapter(s): prompter-r2-" in text, text
        serve.send_signal(__import__("signal").SIGINT)
        assert serve.wait(timeout=120) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def test_example_programs_run(tiny_demo, monkeypatch):
    from pathlib import Path

    run, proc = tiny_demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    programs = Path(__file__).resolve().parents[1] / "programs"
    # the compiled prompter inside a different DSPy pipeline, in a fresh process
    drop_in = subprocess.run([sys.executable, str(programs / "drop_in_pipeline.py"), str(run / "program"),
                              "Tom has 3 apples and buys 2 more. How many apples does he have?"],
                             capture_output=True, text=True, timeout=600)
    assert drop_in.returncode == 0, drop_in.stderr[-4000:]
    assert "prompt:" in drop_in.stdout and "verified:" in drop_in.stdout
    # API roles without a key: explains and exits 0, runs nothing
    env = {k: v for k, v in __import__("os").environ.items() if k != "OPENAI_API_KEY"}
    api = subprocess.run([sys.executable, str(programs / "api_models.py")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert api.returncode == 0 and "needs OPENAI_API_KEY" in api.stdout, api.stdout + api.stderr[-2000:]
