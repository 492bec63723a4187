"""LoRA SFT of the prompter on the tiny model, with real trl/peft and a real vLLM server.

Only the chat-format equality tests use a scripted LM (DSPy's DummyLM): they check the text the
prompter sends, not what a model answers. Everything else trains real adapters; the serving
tests load them into one module-scoped vLLM server and decode greedily through the prompter.
"""

from __future__ import annotations

import difflib
import json
import os
import threading
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dspy  # noqa: E402
from dspy.utils.dummies import DummyLM  # noqa: E402
from dspy.utils.exceptions import AdapterParseError  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

import trprompt_dspy.finetune.trainer as trainer  # noqa: E402
from trprompt_dspy.errors import TRPromptError  # noqa: E402
from trprompt_dspy.finetune import (  # noqa: E402
    FinetuneCancelled,
    FinetuneConfig,
    FinetuneError,
    FinetuneInputError,
    finetune_prompter,
    format_prompter_example,
    prepare_examples,
    records_to_chat_data,
    render_prompt,
    stop_token_strings,
    tokenize_chat_example,
)
from trprompt_dspy.finetune.__main__ import main  # noqa: E402
from trprompt_dspy.infra.settings import result_settings  # noqa: E402
from trprompt_dspy.modules.roles import QueryAwarePrompter  # noqa: E402
from trprompt_dspy.rollout.records import (  # noqa: E402
    RecordError,
    RolloutRecord,
    read_records,
    write_records,
)

RECORDS = [
    RolloutRecord(question="What is 2+3?", prompt="Add the two numbers.", critique="The prompt was clear.",
                  answer="5", correct=True, reference="5"),
    RolloutRecord(question="Natalia sold 48 clips in April.", prompt="Compute half, then add.",
                  critique="The prompt did not help.", answer="12", correct=False, reference="72"),
]
# Settings under which the tiny model below memorised both records (loss ~1e-4, exact greedy
# reproduction) for each of 6 seeds tried, with ChatAdapter and JSONAdapter chats; used where a
# test needs the adapter to reproduce its training prompts exactly.
MEMORISE = dict(learning_rate=1e-2, lr_scheduler="cosine", warmup_ratio=0.1, lora_dropout=0.0, max_steps=80,
                progress=False)
# A short run for tests that only need a trained adapter.
QUICK = dict(learning_rate=1e-2, lr_scheduler="constant", lora_dropout=0.0, max_steps=8, progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama that LoRA can steer. With the default 0.02 init its frozen LM head
    spans logits of about +-1, too flat for an adapter to memorise a prompt; with two layers
    the adapter often failed to tell the two training questions apart (seen with 2 of 8 seeds
    for ChatAdapter chats, 6 of 8 for JSONAdapter chats)."""
    from trprompt_dspy.infra.models import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("ft-model") / "tiny-ft", seed=0,
        initializer_range=0.3, hidden_size=128, num_heads=4, intermediate_size=256, num_layers=3,
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


# ------------------------------------------------------------------------------ records


def test_records_round_trip_through_jsonl(tmp_path):
    path = write_records(tmp_path / "r.jsonl", RECORDS)
    assert read_records(path) == RECORDS
    # Unknown keys survive in `extra`; a line without a critique is refused with its number.
    path.write_text(json.dumps({**RECORDS[0].to_dict(), "temperature": 0.7}) + "\n\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(RecordError, match=r"r.jsonl:3: .*lacks prompt, critique"):
        read_records(path)
    path.write_text(json.dumps({**RECORDS[0].to_dict(), "temperature": 0.7}) + "\n")
    assert read_records(path)[0].extra == {"temperature": 0.7}


# ------------------------------------------------------------------------------ chat format


@pytest.mark.parametrize("adapter_cls", [dspy.ChatAdapter, dspy.JSONAdapter])
def test_training_messages_are_what_the_prompter_sends(adapter_cls):
    """Byte-for-byte: the prompter's real call (captured by the LM) equals the training chat,
    and the training completion parses back to the record's prompt."""
    adapter = adapter_cls()
    prompter = QueryAwarePrompter(reward="ignored: the record's critique is the reward")
    prompter.generate.demos = [dspy.Example(question="What is 1+1?", textual_reward="Good.", prompt="Add.")]
    for record in RECORDS:
        lm = DummyLM([{"prompt": record.prompt}], adapter=adapter)
        with dspy.context(lm=lm, adapter=adapter):
            prediction = prompter(question=record.question, textual_reward=record.critique)
            example = format_prompter_example(record, prompter=prompter)  # adapter from dspy.settings
        sent = lm.history[-1]["messages"]
        assert example["messages"][:-1] == sent
        assert json.dumps(example["messages"][:-1]) == json.dumps(sent)
        assert prediction.prompt == record.prompt
        assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]  # the demo is in
        completion = example["messages"][-1]
        assert completion["role"] == "assistant"
        assert adapter.parse(prompter.generate.signature, completion["content"]) == {"prompt": record.prompt}
    if adapter_cls is dspy.JSONAdapter:
        # With the server's compact JSON grammar the model must emit exactly this object...
        assert completion["content"] == json.dumps({"prompt": RECORDS[-1].prompt}, separators=(",", ":"))
        # ...and without it, the adapter's own indented form.
        loose = format_prompter_example(RECORDS[-1], prompter=prompter, adapter=adapter, compact_json=False)
        assert loose["messages"][-1]["content"] == adapter.format_assistant_message_content(
            prompter.generate.signature, {"prompt": RECORDS[-1].prompt})
        assert loose["messages"][:-1] == example["messages"][:-1]


def test_completion_tokens_end_at_the_stop_token(tokenizer, tiny_dir):
    messages = records_to_chat_data(RECORDS[:1])[0]["messages"]
    stops = stop_token_strings(tokenizer, tiny_dir)
    assert stops == ["<|im_end|>"]
    example = tokenize_chat_example(tokenizer, messages, stops)
    # The prompt ids are the rendered chat with the generation prompt, as vLLM builds them.
    assert example.prompt_ids == tokenizer(render_prompt(tokenizer, messages[:-1]), add_special_tokens=False)["input_ids"]
    # The completion is the assistant content then the stop token, and nothing after it.
    assert tokenizer.decode(example.completion_ids) == messages[-1]["content"] + "<|im_end|>"
    assert example.completion_ids[-1] == tokenizer.eos_token_id


# ------------------------------------------------------------------------------ training


def test_loss_falls_and_the_adapter_folder_holds_only_safetensors_and_json(tiny_dir, tmp_path):
    from safetensors import safe_open

    result = finetune_prompter(RECORDS, tmp_path / "adapter", model=str(tiny_dir),
                               config=FinetuneConfig(**{**QUICK, "max_steps": 20}))
    curve = result.loss_curve
    assert len(curve) == 20 and curve[-1] < 0.5 * curve[0]
    files = sorted(path.name for path in result.adapter_dir.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "training_summary.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no staging left over
    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and all("lora_A" in name or "lora_B" in name for name in names)
    assert any("mlp.down_proj" in name for name in names)  # all-linear by default
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == str(tiny_dir)
    summary = json.loads(result.summary_path.read_text())
    assert summary == json.loads(json.dumps(result.summary, default=str))
    assert summary["steps"] == 20 and summary["examples"]["train_examples"] == 2
    assert summary["examples"]["completion_tokens"] > 0 and summary["tokens_processed"] > 0
    assert summary["device"]["device"] == "cpu" and summary["metadata"]["dspy_adapter"] == "ChatAdapter"
    assert summary["loss_curve"][0]["step"] == 1 and summary["wall_seconds"] > 0


def test_same_seed_same_adapter(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    config = FinetuneConfig(**{**QUICK, "lora_dropout": 0.1})  # dropout draws from the seeded RNG too
    one = finetune_prompter(RECORDS, tmp_path / "one", model=str(tiny_dir), config=config)
    two = finetune_prompter(RECORDS, tmp_path / "two", model=str(tiny_dir), config=config)
    other = finetune_prompter(RECORDS, tmp_path / "other", model=str(tiny_dir), config=config.replace(seed=1))
    assert one.loss_curve == two.loss_curve and one.loss_curve != other.loss_curve
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (one, two))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_continue_from_the_previous_adapter(tiny_dir, tmp_path):
    first = finetune_prompter(RECORDS, tmp_path / "r1", model=str(tiny_dir), config=FinetuneConfig(**QUICK))
    second = finetune_prompter(
        RECORDS, tmp_path / "r2", model=str(tiny_dir),
        config=FinetuneConfig(**QUICK, init_from="previous", previous_adapter=first.adapter_dir),
    )
    # Round 2 starts where round 1 ended, not from the base model's loss.
    assert second.loss_curve[0] < 0.8 * first.loss_curve[0]
    with pytest.raises(FinetuneInputError, match="previous_adapter"):
        FinetuneConfig(init_from="previous")
    with pytest.raises(FinetuneInputError, match="not an adapter folder"):
        finetune_prompter(RECORDS, tmp_path / "r3", model=str(tiny_dir),
                          config=FinetuneConfig(**QUICK, init_from="previous", previous_adapter=tmp_path))


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def no_training(monkeypatch):
    """Make any training attempt fail loudly: bad input must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer, "_train", refuse)


def test_empty_or_identical_records_are_refused(tiny_dir, tmp_path, no_training):
    with pytest.raises(FinetuneInputError, match="no rollout records"):
        finetune_prompter([], tmp_path / "a", model=str(tiny_dir))
    with pytest.raises(FinetuneInputError, match="all 3 examples are identical"):
        finetune_prompter([RECORDS[0]] * 3, tmp_path / "a", model=str(tiny_dir))
    blank = RolloutRecord(question="q", prompt="  ", critique="c")
    with pytest.raises(FinetuneInputError, match="record 1 has an empty or non-string prompt"):
        finetune_prompter([RECORDS[0], blank], tmp_path / "a", model=str(tiny_dir))
    assert not (tmp_path / "a").exists()


def test_duplicates_are_trained_once(tiny_dir, tmp_path):
    result = finetune_prompter([RECORDS[0], RECORDS[1], RECORDS[0]], tmp_path / "a", model=str(tiny_dir),
                               config=FinetuneConfig(**{**QUICK, "max_steps": 1}))
    assert result.summary["examples"]["duplicates_removed"] == 1
    assert result.summary["examples"]["train_examples"] == 2


def test_overlong_records_are_counted_truncated_dropped_or_refused(tiny_dir, tokenizer, tmp_path, no_training):
    long = RolloutRecord(question="What is 2+3?", prompt="Add the numbers carefully. " * 40, critique="Too long.")
    stops = ["<|im_end|>"]
    lengths = [tokenize_chat_example(tokenizer, m["messages"], stops) for m in records_to_chat_data([RECORDS[0], long])]
    limit = lengths[0].length + 5  # the short record fits, the long one does not
    assert lengths[1].length > limit and len(lengths[1].prompt_ids) < limit
    chat = records_to_chat_data([RECORDS[0], long])
    truncated = prepare_examples(chat, tokenizer, FinetuneConfig(max_length=limit), stop_strings=stops)
    assert truncated.stats["overlength"] == 1 and truncated.stats["truncated"] == 1
    assert [e.length for e in truncated.examples] == [lengths[0].length, limit]
    dropped = prepare_examples(chat, tokenizer, FinetuneConfig(max_length=limit, overlength="drop"), stop_strings=stops)
    assert dropped.stats["dropped_overlength"] == 1 and len(dropped.examples) == 1
    with pytest.raises(FinetuneInputError, match=r"1 of 2 examples are longer than max_length"):
        finetune_prompter([RECORDS[0], long], tmp_path / "a", model=str(tiny_dir),
                          config=FinetuneConfig(max_length=limit, overlength="error"))
    with pytest.raises(FinetuneInputError, match="prompt alone"):
        finetune_prompter(RECORDS, tmp_path / "a", model=str(tiny_dir), config=FinetuneConfig(max_length=16))


def test_unusable_output_folders_are_refused(tiny_dir, tmp_path, no_training):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FinetuneInputError, match="already exists"):
        finetune_prompter(RECORDS, tmp_path / "exists", model=str(tiny_dir))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FinetuneInputError, match="not a folder"):
        finetune_prompter(RECORDS, tmp_path / "a-file", model=str(tiny_dir))
    with pytest.raises(FinetuneInputError, match="cannot create"):
        finetune_prompter(RECORDS, tmp_path / "a-file" / "adapter", model=str(tiny_dir))
    with pytest.raises(FinetuneInputError, match="does not exist"):
        finetune_prompter(RECORDS, tmp_path / "b", model=str(tmp_path / "no-model"))
    with pytest.raises(FinetuneInputError, match="lora_r"):
        FinetuneConfig(lora_r=0)


def test_errors_and_speed_only_settings():
    """Every finetune error is a TRPromptError and keeps its builtin base; the settings that do not
    change the adapter are left out of a run's fingerprint."""
    assert issubclass(FinetuneInputError, TRPromptError) and issubclass(FinetuneInputError, ValueError)
    assert issubclass(FinetuneError, TRPromptError) and issubclass(FinetuneError, RuntimeError)
    assert issubclass(FinetuneCancelled, FinetuneError)
    config = FinetuneConfig()
    left_out = set(config.to_dict()) - set(result_settings(config))
    assert left_out == {"cpu_threads", "device", "gradient_checkpointing", "micro_batch_size", "overwrite", "progress"}
    with pytest.raises(FinetuneInputError, match="unknown FinetuneConfig field"):
        config.replace(threads=2)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt


def test_an_interrupted_run_leaves_no_adapter_and_keeps_the_old_one(tiny_dir, tmp_path):
    config = FinetuneConfig(**QUICK)
    with pytest.raises(KeyboardInterrupt):
        finetune_prompter(RECORDS, tmp_path / "adapter", model=str(tiny_dir), config=config, callbacks=[_Interrupt()])
    assert list(tmp_path.iterdir()) == []
    # With overwrite, the finished adapter is replaced only by a finished one.
    done = finetune_prompter(RECORDS, tmp_path / "adapter", model=str(tiny_dir), config=config)
    before = (done.adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        finetune_prompter(RECORDS, tmp_path / "adapter", model=str(tiny_dir), config=config.replace(overwrite=True, seed=3),
                          callbacks=[_Interrupt()])
    assert (done.adapter_dir / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(FinetuneCancelled):
        finetune_prompter(RECORDS, tmp_path / "cancelled", model=str(tiny_dir), config=config, cancel_event=cancel)
    assert not (tmp_path / "cancelled").exists()


# ------------------------------------------------------------------------------ served by vLLM


@pytest.fixture(scope="module")
def ft_server(tiny_dir, tmp_path_factory):
    """One vLLM server on the steerable tiny model for this module (fp32: greedy output must
    not depend on batching)."""
    from trprompt_dspy.infra.serving import ServerConfig, VLLMServer

    config = ServerConfig(
        model=str(tiny_dir), served_model_name="tiny-ft", device="cpu", dtype="float32",
        max_model_len=4096, max_lora_rank=16, max_loras=4, startup_timeout_s=300,
        log_path=tmp_path_factory.mktemp("ft-logs") / "vllm.log",
    )
    with VLLMServer(config) as server:
        yield server


def _greedy_prompter(lm) -> QueryAwarePrompter:
    return QueryAwarePrompter(lm=lm)


@pytest.mark.slow
def test_prompt_tokens_match_what_vllm_tokenizes(ft_server, tokenizer, tiny_dir):
    messages = records_to_chat_data(RECORDS[:1])[0]["messages"]
    example = tokenize_chat_example(tokenizer, messages, stop_token_strings(tokenizer, tiny_dir))
    request = urllib.request.Request(
        ft_server.base_url + "/tokenize",
        data=json.dumps({"model": "tiny-ft", "messages": messages[:-1], "add_generation_prompt": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        served = json.load(response)["tokens"]
    assert served == example.prompt_ids


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


@pytest.mark.slow
def test_served_adapter_makes_the_prompter_reproduce_its_training_prompts(ft_server, tiny_dir, tmp_path):
    """The whole path: records -> ChatAdapter chats -> trl/peft -> vLLM -> the prompter's DSPy call.
    The base model, asked the same chats, is far from the trained replies: the prompts come from
    the adapter, not from the model or the chat."""
    result = finetune_prompter(RECORDS, tmp_path / "memorised", model=str(tiny_dir), config=FinetuneConfig(**MEMORISE))
    assert result.loss_curve[-1] < 0.01
    ft_server.load_adapter("memorised", result.adapter_dir)
    try:
        tuned = ft_server.lm("memorised", temperature=0.0, max_tokens=64, cache=False)
        base = ft_server.lm(temperature=0.0, max_tokens=64, cache=False)
        chats = records_to_chat_data(RECORDS)
        with dspy.context(adapter=dspy.ChatAdapter()):
            for record, chat in zip(RECORDS, chats):
                trained_reply = chat["messages"][-1]["content"]
                got = _greedy_prompter(tuned)(question=record.question, textual_reward=record.critique).prompt
                assert got == record.prompt
                # Byte for byte: vLLM returned the trained assistant message (its stop token ends it).
                assert tuned.history[-1]["outputs"] == [trained_reply]

                # The base model's raw reply to the very same messages (what the prompter sends, see
                # test_training_messages_are_what_the_prompter_sends) is nowhere near the trained one...
                [untuned_reply] = base(messages=chat["messages"][:-1])
                assert _similarity(untuned_reply, trained_reply) < 0.5, untuned_reply
                # ...and if the prompter can parse a prompt out of it at all, that prompt is not the trained one.
                try:
                    untuned = _greedy_prompter(base)(question=record.question, textual_reward=record.critique).prompt
                except AdapterParseError:
                    continue
                assert _similarity(untuned or "", record.prompt) < 0.5, untuned
    finally:
        ft_server.unload_adapter("memorised")


@pytest.mark.slow
def test_dspy_provider_trains_and_serves_a_json_adapter(ft_server, tiny_dir, tmp_path):
    """DSPy's contract: lm.finetune(...) -> TrainingJob -> job.result() is an LM on the new
    adapter. Trained on JSONAdapter chats (compact JSON, as the server's grammar forces it) and
    queried with vLLM enforcing the JSON schema."""
    from dspy.clients.utils_finetune import TrainingStatus

    from trprompt_dspy.finetune.dspy_provider import LoRAProvider
    from trprompt_dspy.infra.structured import StructuredLM

    record = RECORDS[1]
    provider = LoRAProvider(server=ft_server, output_root=tmp_path, config=FinetuneConfig(**MEMORISE))
    lm = StructuredLM("hosted_vllm/tiny-ft", api_base=ft_server.api_base, api_key="local", provider=provider,
                      temperature=0.0, max_tokens=64, cache=False)
    chat_data = records_to_chat_data([record], adapter=dspy.JSONAdapter())
    job = lm.finetune(train_data=chat_data, train_data_format="chat", train_kwargs={"max_steps": 40})
    tuned = job.result()
    assert not isinstance(tuned, BaseException), tuned
    try:
        assert job.status() == TrainingStatus.succeeded
        assert tuned.model == f"hosted_vllm/{job.adapter_name}" and job.adapter_name in ft_server.adapters
        assert isinstance(tuned, StructuredLM) and tuned.provider is provider
        assert job.finetune_result.summary["steps"] == 40
        with dspy.context(adapter=dspy.JSONAdapter()):
            got = _greedy_prompter(tuned)(question=record.question, textual_reward=record.critique).prompt
        assert got == record.prompt
        assert tuned.history[-1]["outputs"] == [chat_data[0]["messages"][-1]["content"]]
        # A bad job finishes with its error as the result, as DSPy's LM.finetune does.
        failed = lm.finetune(train_data=[], train_data_format="chat")
        assert isinstance(failed.result(), FinetuneInputError) and failed.status() == TrainingStatus.failed
    finally:
        ft_server.unload_adapter(job.adapter_name)


def test_command_line_trains_from_a_records_file(tiny_dir, tmp_path, capsys):
    records = write_records(tmp_path / "rollouts.jsonl", RECORDS)
    out = tmp_path / "adapter"
    args = ["--records", str(records), "--output", str(out), "--model", str(tiny_dir), "--max-steps", "2",
            "--adapter", "json", "--lora-r", "8", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["lora_r"] == 8
    assert summary["metadata"]["dspy_adapter"] == "JSONAdapter"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "training_summary.json")
    assert main(args) == 2  # the folder exists now
    assert "already exists" in capsys.readouterr().err
    # A bad records file is bad input too (exit status 2, one line), refused before any training.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    assert main(["--records", str(bad), "--output", str(tmp_path / "b"), "--model", str(tiny_dir)]) == 2
    assert "lacks prompt, critique" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_an_adapter_that_cannot_be_moved_into_place_is_kept(tiny_dir, tmp_path, monkeypatch):
    """A folder that appears at output_dir while training stops the publish, and the finished
    adapter stays where the error says (it used to be deleted right after the message named it)."""
    out = tmp_path / "adapter"

    def train_then_clash(prepared, tokenizer, model_dir, config, settings, staging, *rest):
        (staging / "adapter_config.json").write_text("{}")
        out.mkdir()  # someone else wrote the output folder meanwhile
        return {"steps": 1}

    monkeypatch.setattr(trainer, "_train", train_then_clash)
    with pytest.raises(FinetuneError, match="appeared while training; the new adapter stays in (.+)") as error:
        finetune_prompter(RECORDS, out, model=str(tiny_dir), config=FinetuneConfig(**QUICK))
    kept = Path(str(error.value).rsplit("stays in ", 1)[1])
    assert (kept / "adapter_config.json").is_file() and (kept / "training_summary.json").is_file()
