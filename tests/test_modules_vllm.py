"""The foundation modules through the real stack: DSPy -> litellm -> the vLLM server on the tiny
random model, with structured outputs so its (random) replies parse."""

import dspy

import trprompt_dspy as t
from trprompt_dspy.data import load_dataset
from trprompt_dspy.evaluation import evaluate
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
