"""ProseAdapter: the signature in plain prose, replies read as a model writes them in plain chat."""

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

import trprompt_dspy as t
from trprompt_dspy.infra.prose import MARKER, ProseAdapter
from trprompt_dspy.metrics import gsm8k_metric
from trprompt_dspy.prompts.signatures import (
    CritiquePrompt,
    GeneratePrompt,
    SolveWithPrompt,
)


class ScriptedLM(dspy.BaseLM):
    """Replies with fixed texts and keeps the messages it was sent."""

    def __init__(self, replies):
        super().__init__(model="scripted", cache=False)
        self.replies, self.sent = list(replies), []

    def forward(self, prompt=None, messages=None, **kwargs):
        from litellm import ModelResponse

        self.sent.append(messages)
        return ModelResponse(choices=[{"message": {"role": "assistant", "content": self.replies.pop(0)},
                                       "finish_reason": "stop"}], model="scripted")


def test_the_solver_is_asked_in_plain_prose():
    messages = ProseAdapter().format(SolveWithPrompt, [], {"question": "Tom has 3 apples and buys 4. How many?",
                                                           "prompt": "Add the two amounts."})
    system, user = messages[0]["content"], messages[1]["content"]
    assert system == SolveWithPrompt.instructions
    assert user.startswith("Tom has 3 apples") and "Prompt: Add the two amounts." in user
    assert user.endswith(f"then write {MARKER} followed by the final answer only, e.g. 42 or \\frac{{1}}{{2}}.")
    assert "[[" not in system + user and "{" not in user.split("e.g.")[0]  # no DSPy markers, no JSON


def test_an_empty_prompt_is_left_out():
    user = ProseAdapter().format(SolveWithPrompt, [], {"question": "1+1?", "prompt": ""})[1]["content"]
    assert "Prompt:" not in user


@pytest.mark.parametrize("reply, reasoning, answer", [
    ("3 + 4 = 7 apples.\n#### 7", "3 + 4 = 7 apples.", "7"),
    ("First 3.\n#### 5\nThen more text\n#### 7 apples\nbye", "First 3.\n#### 5\nThen more text", "7 apples"),
    ("3 + 4 = 7.\nSo Tom has 7 apples.", "3 + 4 = 7.\nSo Tom has 7 apples.", "So Tom has 7 apples."),
    # no marker: the last \boxed{} wherever it stands, else the last line that is not layout
    ("He has\n\\[\n\\boxed{3}\n\\]", "He has\n\\[\n\\boxed{3}\n\\]", "\\boxed{3}"),
    ("So \\(\\boxed{44}\\) stickers.\nHope this helps!", "So \\(\\boxed{44}\\) stickers.\nHope this helps!", "\\boxed{44}"),
    ("x = 2 + 1\n$$\nx = 3\n$$\n```", "x = 2 + 1\n$$\nx = 3\n$$\n```", "x = 3"),
])
def test_replies_parse_like_plain_chat(reply, reasoning, answer):
    parsed = ProseAdapter().parse(SolveWithPrompt, reply)
    assert parsed == {"reasoning": reasoning, "answer": answer}


def test_the_fallback_answer_is_what_the_metric_reads_in_plain_chat():
    # a reply that closes its display math after the answer was once read as "\\]" (wrong)
    reply = "Josh spends 10 + 2 + 4 * 1.25 = 17.\nHe has left:\n\\[\n20 - 17 = \\boxed{3}\n\\]"
    answer = ProseAdapter().parse(SolveWithPrompt, reply)["answer"]
    example = dspy.Example(question="q", answer="3")
    assert gsm8k_metric(example, dspy.Prediction(answer=answer))
    assert gsm8k_metric(example, dspy.Prediction(answer=reply))  # plain chat reads the whole reply


def test_an_empty_reply_or_nothing_after_the_marker_is_a_parse_error():
    for reply in ("", "   ", "reasoning\n####   "):
        with pytest.raises(AdapterParseError):
            ProseAdapter().parse(SolveWithPrompt, reply)


def test_a_single_output_is_the_whole_reply():
    assert ProseAdapter().parse(GeneratePrompt, "  Add 3 and 4 carefully.\n") == {"prompt": "Add 3 and 4 carefully."}
    user = ProseAdapter().format(CritiquePrompt, [], {
        "question": "q", "prompt": "p", "solver_reasoning": "r", "solver_answer": "a", "reference_answer": "b",
        "is_correct": False})[1]["content"]
    assert "Is correct: False" in user and user.endswith("no preamble.")


def test_typed_and_several_outputs():
    sig = dspy.Signature("question -> notes: str, ok: bool, score: float")
    parsed = ProseAdapter().parse(sig, "thinking\n#### ok: yes\n#### score: 0.5")
    assert parsed == {"notes": "thinking", "ok": True, "score": 0.5}
    with pytest.raises(AdapterParseError, match="score"):
        ProseAdapter().parse(sig, "thinking\n#### ok: true")


def test_training_completions_parse_back_to_their_outputs():
    adapter = ProseAdapter()
    outputs = {"reasoning": "3 + 4 = 7", "answer": "7"}
    data = adapter.format_finetune_data(SolveWithPrompt, [], {"question": "q", "prompt": "p"}, outputs)
    assert adapter.parse(SolveWithPrompt, data["messages"][-1]["content"]) == outputs


@pytest.mark.filterwarnings("ignore:Implementing custom LMs through BaseLM:DeprecationWarning")
def test_the_solver_answers_through_the_adapter():
    lm = ScriptedLM(["Tom starts with 3 and buys 4: 3 + 4 = 7.\n#### 7"])
    with dspy.context(adapter=ProseAdapter()):
        prediction = t.Solver(lm=lm)(question="Tom has 3 apples and buys 4. How many?", prompt="")
    assert prediction.answer == "7" and gsm8k_metric(dspy.Example(answer="7"), prediction)
    assert lm.sent[0][-1]["content"].startswith("Tom has 3 apples")


def test_each_model_gets_its_wire_format(tmp_path, tiny_model_dir):
    from trprompt_dspy.infra.models import PROFILE_FILE, output_format_for

    assert output_format_for("default") == "json"                      # the 135M model needs a schema
    assert output_format_for("qwen2.5-coder-0.5b") == "prose"           # real models reason in prose
    assert output_format_for("Qwen/Qwen2.5-7B-Instruct") == "prose"     # a hub id: a real model
    assert output_format_for(str(tiny_model_dir)) == "json"             # a tiny folder, by its weights
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:                    # 0.7 GB of weights (sparse)
        f.truncate(700_000_000)
    assert output_format_for(str(big)) == "prose"
    (big / PROFILE_FILE).write_text('{"output_format": "json"}')        # a folder may say otherwise
    assert output_format_for(str(big)) == "json"
    from trprompt_dspy.infra.model_cache import ModelNotAvailableError

    for bad, message in (('{"output_format": "xml"}', "must be one of json, prose, got 'xml'"),
                         ("[1, 2]", "is not a JSON object"), ("{oops", "is not a JSON object")):
        (big / PROFILE_FILE).write_text(bad)
        with pytest.raises(ModelNotAvailableError, match=message):
            output_format_for(str(big))


def test_a_prose_lm_sends_no_schema_and_gets_the_prose_adapter():
    from trprompt_dspy.infra.structured import (
        SafeJSONAdapter,
        StructuredLM,
        adapter_for,
    )

    prose = StructuredLM("hosted_vllm/m", api_base="http://127.0.0.1:1/v1", output_format="prose")
    json_lm = StructuredLM("hosted_vllm/m", api_base="http://127.0.0.1:1/v1")
    assert not prose.supports_response_schema and json_lm.supports_response_schema
    assert isinstance(adapter_for(prose), ProseAdapter) and isinstance(adapter_for(json_lm), SafeJSONAdapter)
    assert adapter_for(dspy.LM("openai/x")) is None and isinstance(adapter_for("prose"), ProseAdapter)
    assert prose._rewrite({"response_format": SolveWithPrompt}) == {"response_format": SolveWithPrompt}
    assert prose.dump_state()["output_format"] == "prose"
    with pytest.raises(ValueError, match="output_format"):
        StructuredLM("hosted_vllm/m", output_format="xml")
    with pytest.raises(ValueError, match="output_format"):
        t.ServerConfig(output_format="xml")


@pytest.mark.slow
def test_the_solver_talks_prose_to_a_real_server(vllm_server):
    """Through the real vLLM server: the request carries prose messages and no schema, and the
    reply parses into a reasoning and an answer (the tiny random model writes noise)."""
    lm = vllm_server.lm(structured=True, output_format="prose", max_tokens=48, temperature=0.0, cache=False)
    solver = t.Solver(lm=lm)
    prediction = solver(question="Tom has 3 apples and buys 4. How many?", prompt="Add them.")
    sent = lm.history[-1]
    assert "structured_outputs" not in (sent["kwargs"].get("extra_body") or {})
    assert sent["messages"][0]["content"] == SolveWithPrompt.instructions
    assert "Prompt: Add them." in sent["messages"][-1]["content"] and "[[ ##" not in str(sent["messages"])
    assert isinstance(prediction.answer, str) and prediction.answer.strip()


@pytest.mark.slow
def test_a_compile_in_prose_trains_on_the_prose_it_sends(clean_adapters, shared_data_dir, tmp_path):
    """One round on the tiny model with the prose format, through the real stack: the rollout,
    SFT, the t* search and validation run; the compiled prompter is served in prose; the run
    folder says so."""
    import json

    from helpers import TINY_LM_KWARGS, tiny_config

    from trprompt_dspy.data import load_dataset
    from trprompt_dspy.metrics import gsm8k_metric as metric

    server = clean_adapters
    train = load_dataset("gsm8k", "train", data_dir=shared_data_dir, limit=4)
    val = load_dataset("gsm8k", "test", data_dir=shared_data_dir, limit=2)
    tele = t.TRPromptTeleprompter(server=server, metric=metric, config=tiny_config(rounds=1), log_dir=tmp_path,
                                  lm_kwargs=dict(TINY_LM_KWARGS), output_format="prose")
    compiled = tele.compile(t.TRPromptProgram(), trainset=train, valset=val)
    assert json.loads((tmp_path / "config.json").read_text())["output_format"] == "prose"
    lm = compiled.prompter.generate.lm
    assert lm.output_format == "prose" and lm.model.endswith(compiled.prompter.adapter["name"])
    compiled.prompter(question=train[0].question)
    sent = lm.history[-1]["messages"]
    assert sent[0]["content"] == compiled.prompter.generate.signature.instructions and "[[ ##" not in str(sent)
    summary = json.loads((tmp_path / "round_1" / "adapter" / "training_summary.json").read_text())
    assert summary["steps"] >= 1
