"""Each role on a local model of its own: a second vLLM server for the target, supervised by the
compile like the prompter's, recorded in the saved program and started again by ``evaluate``."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

import trprompt_dspy as t
from trprompt_dspy.app.cli import LOCAL, _saved_role, main
from trprompt_dspy.infra.models import EMBEDDED_MODELS, is_local_model


def test_which_model_names_are_local(tmp_path):
    assert is_local_model("default") and is_local_model("qwen2.5-coder-1.5b") and "qwen2.5-coder-1.5b" in EMBEDDED_MODELS
    assert is_local_model(tmp_path) and is_local_model(str(tmp_path))
    # litellm names (provider/model) and hub ids are not served here
    assert not is_local_model("openai/gpt-4o-mini") and not is_local_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_a_saved_program_names_the_target_it_was_compiled_with():
    assert _saved_role({}, "target") == LOCAL  # a program saved before roles were recorded
    shared = {"roles": {"target": {"local": True, "model": "/gone/tiny", "shares_prompter": True}}}
    assert _saved_role(shared, "target") == LOCAL
    own = {"roles": {"target": {"local": True, "model": "qwen2.5-coder-1.5b", "shares_prompter": False}}}
    assert _saved_role(own, "target") == "qwen2.5-coder-1.5b"
    assert _saved_role({"roles": {"target": {"local": False, "model": "openai/gpt-4o-mini"}}}, "target") == "openai/gpt-4o-mini"


def test_a_role_must_be_an_lm_or_a_running_server(vllm_server):
    from trprompt_dspy.metrics import gsm8k_metric

    with pytest.raises(TypeError, match="critic_lm must be a dspy.BaseLM or a running VLLMServer"):
        t.TRPromptTeleprompter(server=vllm_server, metric=gsm8k_metric, critic_lm="openai/gpt-4o-mini")
    stopped = t.VLLMServer(t.ServerConfig(model="default"))
    with pytest.raises(ValueError, match="target_lm: the server of .* is not running"):
        t.TRPromptTeleprompter(server=vllm_server, metric=gsm8k_metric, target_lm=stopped)


@pytest.fixture
def target_server(tmp_path_factory):
    """A second tiny model (other weights, the same tokenizer recipe) on its own server, in prose
    and without LoRA: the target's base model."""
    from trprompt_dspy.infra.models import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("target-model") / "tiny-target", seed=1)
    config = t.ServerConfig(model=str(folder), served_model_name="tiny-target", device="cpu", dtype="float32",
                            enable_lora=False, output_format="prose", startup_timeout_s=300,
                            log_path=tmp_path_factory.mktemp("logs") / "vllm-target.log")
    with t.VLLMServer(config) as server:
        yield server


def _kill(server) -> None:
    for pid in server.pids():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.running


@pytest.mark.slow
def test_a_compile_with_the_target_on_a_second_base_model(clean_adapters, target_server, shared_data_dir, tmp_path, capsys):
    """Prompter (JSON, LoRA) on the session's tiny model, target on another tiny model served in
    prose: the target's server, killed before the compile, is restarted by it; the solver's calls
    go to that server in its own format; the saved program names the target's model, and
    ``trprompt evaluate`` starts a server for it again."""
    from helpers import TINY_LM_KWARGS, tiny_config

    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.metrics import gsm8k_metric

    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    val = load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=2)
    tele = t.TRPromptTeleprompter(server=clean_adapters, metric=gsm8k_metric, target_lm=target_server,
                                  config=tiny_config(rounds=1, select_round="best"), log_dir=tmp_path / "run",
                                  lm_kwargs=dict(TINY_LM_KWARGS))
    assert tele.servers == [clean_adapters, target_server]
    _kill(target_server)
    compiled = tele.compile(t.TRPromptProgram(), trainset=train, valset=val)

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["model"] for r in report["server_restarts"]] == [str(target_server.config.model)]
    # the best round on validation is returned: round 1, or round 0 (no adapter) if strictly better
    chosen, round_1 = report["selected_round"], report["rounds"][0]["validation"]["accuracy"]
    assert chosen == (0 if report["initial_validation"]["accuracy"] > round_1 else 1)
    assert (compiled.prompter.adapter is None) == (chosen == 0)
    target_lm = compiled.solver.solve.lm
    assert target_lm.kwargs["api_base"] == target_server.api_base and target_lm.output_format == "prose"
    assert target_lm.history, "the solver never called its own server"
    sent = target_lm.history[-1]["messages"]
    assert "[[ ##" not in str(sent) and not (target_lm.history[-1]["kwargs"].get("extra_body") or {}).get("structured_outputs")
    assert compiled.prompter.generate.lm.output_format == "json"  # the prompter keeps its server's format
    described = json.loads((tmp_path / "run" / "config.json").read_text())
    assert described["role_servers"]["target"]["model"] == target_server.model_path

    compiled.save(tmp_path / "program")
    roles = json.loads((tmp_path / "program" / "manifest.json").read_text())["roles"]
    assert roles["target"] == {"local": True, "model": str(target_server.config.model), "output_format": "prose",
                               "shares_prompter": False}
    assert roles["critic"]["shares_prompter"] and roles["optimizer"]["shares_prompter"]
    assert roles["prompter"]["model"] == str(clean_adapters.config.model)  # evaluate needs it without an adapter

    capsys.readouterr()
    code = main(["evaluate", str(tmp_path / "program"), "--dataset", "gsm8k", "--data-dir", str(shared_data_dir),
                 "--n", "2", "--max-tokens", "32", "--num-threads", "2"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert f"starting a local server for the target ({target_server.config.model})" in out
    assert "gsm8k test: accuracy" in out and "/2," in out


def test_the_command_line_serves_a_local_role_model_and_checks_api_ones(tmp_path, monkeypatch):
    from trprompt_dspy.app.cli import UserError, role_lm

    class Servers:
        def get(self, role, model):
            return ("server for", role, model)

    assert role_lm("target", LOCAL, {}) is None
    assert role_lm("critic", str(tmp_path), {}, Servers()) == ("server for", "critic", str(tmp_path))
    assert role_lm("target", "qwen2.5-coder-1.5b", {}, Servers()) == ("server for", "target", "qwen2.5-coder-1.5b")
    with pytest.raises(UserError, match="a local model other than the prompter's is not supported here"):
        role_lm("target", str(tmp_path), {})
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="--optimizer-model 'openai/gpt-4o-mini' needs OPENAI_API_KEY"):
        role_lm("optimizer", "openai/gpt-4o-mini", {}, Servers())
