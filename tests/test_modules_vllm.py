"""The foundation modules through the real stack: DSPy -> litellm -> the vLLM server on the tiny
random model, with structured outputs so its (random) replies parse."""

import dspy

import trprompt_dspy as t
from trprompt_dspy.data import load_dataset
from trprompt_dspy.infra.evaluation import evaluate
from trprompt_dspy.metrics import metric_for


def _lm(server, name=None):
    return server.lm(name, structured=True, max_tokens=96, temperature=0, cache=False, max_string_length=120)


def test_program_and_critic_run_on_vllm_with_one_lm_per_role(vllm_server, tiny_lora_adapters, shared_data_dir):
    server = vllm_server
    server.load_adapter("prompter-ad", tiny_lora_adapters["ad-one"])
    try:
        prompter_lm, solver_lm, critic_lm = _lm(server, "prompter-ad"), _lm(server), _lm(server)
        program = t.TRPromptProgram()
        program.prompter.set_lm(prompter_lm)
        program.solver.set_lm(solver_lm)
        examples = load_dataset("svamp", "test", data_dir=shared_data_dir, limit=4)

        with dspy.context(adapter=dspy.JSONAdapter()):
            report = evaluate(program, examples, metric_for("svamp"), num_threads=4, progress=False)
            row = report.rows[0]
            critique = t.TextualCritic(lm=critic_lm)(
                question=row["question"], prompt=row["prediction"]["prompt"],
                solver_reasoning=row["prediction"]["reasoning"], solver_answer=row["prediction"]["answer"],
                reference_answer=row["gold"], is_correct=row["correct"],
            ).critique
    finally:
        server.unload_adapter("prompter-ad")

    # every reply parsed, so no example was lost to the adapter
    assert report.n == 4 and report.n_errors == 0, report.error_counts
    for r in report.rows:
        assert all(isinstance(r["prediction"][k], str) for k in ("prompt", "reasoning", "answer"))
    assert isinstance(critique, str)
    # each role went to its own model on the server: the prompter to the adapter, the rest to the base
    assert len(prompter_lm.history) == 4 and len(solver_lm.history) == 4 and len(critic_lm.history) == 1
    assert {h["model"] for h in prompter_lm.history} == {"hosted_vllm/prompter-ad"}
    # the solver was given the prompts the prompter wrote, and the prompter the reward text
    solver_inputs = " ".join(h["messages"][-1]["content"] for h in solver_lm.history)
    assert all(r["prediction"]["prompt"] in solver_inputs for r in report.rows)
    assert all(program.prompter.reward in h["messages"][-1]["content"] for h in prompter_lm.history)


def test_modules_pick_the_json_adapter_for_a_structured_lm_unless_one_is_configured(vllm_server):
    """A compiled prompter dropped into a pipeline that configures no adapter must still send
    the JSON schema its StructuredLM enforces (under DSPy's ChatAdapter a small model's free
    text rarely parses); an adapter the user configures wins."""

    def schema_sent(entry) -> bool:
        return "json" in ((entry["kwargs"].get("extra_body") or {}).get("structured_outputs") or {})

    lm = _lm(vllm_server)
    prompter, solver = t.QueryAwarePrompter(lm=lm), t.Solver(lm=lm)
    question = "Tom has 3 apples and buys 2 more. How many apples does he have?"
    with dspy.context(adapter=None):
        prompt = prompter(question=question).prompt
        answer = solver(question=question, prompt=prompt).answer
    assert isinstance(prompt, str) and isinstance(answer, str)
    assert len(lm.history) == 2 and all(schema_sent(h) for h in lm.history)

    n = len(lm.history)
    with dspy.context(adapter=dspy.ChatAdapter()):
        try:
            prompter(question=question)
        except Exception:  # noqa: BLE001 - the tiny model's free text need not parse; only the request matters
            pass
    assert len(lm.history) > n and not schema_sent(lm.history[n])
