"""``trprompt demo``: the main job on the embedded default model, end to end.

Starts a local vLLM server, measures the baselines (zero-shot, zero-shot CoT, the untrained
prompter) on held-out questions, compiles a ``TRPromptProgram`` (rounds of rollout, LoRA SFT and
t* search), measures the compiled program on the same questions, prints a table and saves the
run folder: the compile's report and plot, ``results.json`` and the compiled program.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import dspy

from ..data.loaders import train_val_test
from ..finetune import FinetuneConfig
from ..infra.checks import check_ints
from ..infra.runs import atomic_write_json
from ..infra.progress import DISPLAY_SETTING, CompileDisplay
from ..infra.structured import adapter_for
from ..metrics import metric_for
from ..reward_search import RewardSearchConfig
from ..rollout.rollout import RolloutConfig
from ..teleprompter import TRPromptConfig


@dataclasses.dataclass
class DemoSettings:
    """What ``trprompt demo`` runs. The defaults finish in under 20 minutes on 2 CPU cores."""

    dataset: str = "words"
    model: str = "default"
    tiny: bool = False
    train: int = 16
    val: int = 16
    test: int = 40
    rounds: int = 2
    data_dir: str | None = None
    log_dir: str | None = None
    num_threads: int = 16
    max_tokens: int = 384

    def __post_init__(self) -> None:
        from ..data.loaders import dataset_names

        if self.dataset not in dataset_names():
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(dataset_names())}")
        check_ints(self, ("train", "val", "test", "rounds", "num_threads", "max_tokens"))


def demo_config(settings: DemoSettings) -> TRPromptConfig:
    """Compile sizes of the demo: small enough for a CPU, every stage of the method present."""
    if settings.tiny:
        # the tiny random model: only the plumbing is exercised (see tests/test_cli.py)
        return TRPromptConfig(
            rounds=settings.rounds, validate_initial=False,
            rollout=RolloutConfig(n_samples=2, num_threads=8),
            finetune=FinetuneConfig(max_steps=2, per_device_batch_size=4, lora_r=8, lora_alpha=16),
            search=RewardSearchConfig(steps=1, num_candidates=2, minibatch_size=2, num_threads=8, patience=None,
                                      max_reward_chars=200, regex_preamble_chars=40, proposal_max_tokens=400,
                                      feedback_max_tokens=64, max_results_chars=1500, max_field_chars=100),
            val_num_threads=8,
        )
    return TRPromptConfig(
        rounds=settings.rounds,
        validate_initial=False,  # the untrained prompter is measured on the test questions instead
        rollout=RolloutConfig(n_samples=2, temperature=1.0, num_threads=settings.num_threads),
        finetune=FinetuneConfig(num_epochs=1.0, per_device_batch_size=8, max_length=1024),
        search=RewardSearchConfig(steps=1, num_candidates=2, minibatch_size=8, num_threads=settings.num_threads),
        val_num_threads=settings.num_threads,
    )


def demo_data(settings: DemoSettings) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    """(train, val, test) of the demo (see ``data.train_val_test``)."""
    return train_val_test(settings.dataset, settings.train, settings.val, settings.test, data_dir=settings.data_dir)


def tiny_model_dir() -> Path:
    """The tiny random test model, built once into the model cache."""
    from ..infra.model_cache import cache_root
    from ..infra.models import build_tiny_model

    folder = cache_root() / "tiny-random-llama"
    if not (folder / "config.json").is_file():
        build_tiny_model(folder, seed=0)
    return folder


def run_demo(settings: DemoSettings, console: Any = None) -> dict[str, Any]:
    """Run the demo; return the results written to ``<run>/results.json``.

    Raises:
        DataError, ModelNotAvailableError, ServerError: bad dataset or model, or no server.
    """
    from rich.console import Console

    from ..baselines import ZeroShot, ZeroShotCoT, untrained_prompter
    from ..infra.evaluation import evaluate
    from ..infra.serving import ServerConfig, VLLMServer
    from ..modules.program import TRPromptProgram
    from ..teleprompter import TRPromptTeleprompter

    console = console or Console()
    metric = metric_for(settings.dataset)
    train, val, test = demo_data(settings)
    run_dir = Path(settings.log_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model_label = "tiny random Llama (plumbing test)" if settings.tiny else (
        "SmolLM2-135M-Instruct (embedded default)" if settings.model == "default" else settings.model)
    console.print(
        f"[bold]trprompt demo[/bold]: TRPrompt on [cyan]{settings.dataset}[/cyan] with {model_label} in every role "
        f"(prompter, solver, critic, optimizer)\n  {len(train)} training and {len(val)} validation questions for the "
        f"compile, {len(test)} held-out test questions; run folder {run_dir}"
    )
    if settings.tiny:
        server_config = ServerConfig(model=str(tiny_model_dir()), served_model_name="tiny", dtype="float32",
                                     max_lora_rank=8, max_loras=3, log_path=run_dir / "vllm.log")
        lm_kwargs = {"max_tokens": 96, "max_string_length": 120, "cache": False}
    else:
        server_config = ServerConfig(model=settings.model, log_path=run_dir / "vllm.log")
        lm_kwargs = {"max_tokens": settings.max_tokens}
    console.print("starting the local vLLM server (about 30 s on 2 CPU cores)...")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "dataset": settings.dataset, "model": model_label, "runs": 1, "settings": dataclasses.asdict(settings),
        "sizes": {"train": len(train), "val": len(val), "test": len(test)}, "methods": {},
    }
    with VLLMServer(server_config) as server:
        lm = server.lm(structured=True, temperature=0.0, **lm_kwargs)
        threads = 8 if settings.tiny else settings.num_threads

        def measure(name: str, program: dspy.Module) -> None:
            t0 = time.perf_counter()
            # the same one-line display as the compile's, instead of DSPy's bar
            with CompileDisplay(settings.rounds) as display, display.stage(f"test · {name}"), \
                    dspy.context(lm=lm, adapter=adapter_for(lm), **{DISPLAY_SETTING: display}):
                report = evaluate(program, test, metric, num_threads=threads)
            results["methods"][name] = {**report.to_dict(), "wall_s": round(time.perf_counter() - t0, 1)}
            atomic_write_json(run_dir / "results.json", results)

        measure("zero-shot", ZeroShot())
        measure("zero-shot CoT", ZeroShotCoT())
        measure("untrained prompter", untrained_prompter())

        console.print(f"compiling with TRPrompt: {settings.rounds} rounds of rollout, LoRA SFT and t* search...")
        t0 = time.perf_counter()
        tele = TRPromptTeleprompter(server=server, metric=metric, config=demo_config(settings),
                                    log_dir=run_dir / "compile", lm_kwargs=lm_kwargs)
        compiled = tele.compile(TRPromptProgram(), trainset=train, valset=val)
        results["compile_s"] = round(time.perf_counter() - t0, 1)
        measure("TRPrompt (compiled)", compiled)
        compiled.save(run_dir / "program")
        results["final_reward"] = compiled.prompter.reward
    results["wall_s"] = round(time.perf_counter() - start, 1)
    atomic_write_json(run_dir / "results.json", results)
    results["run_dir"] = str(run_dir)
    print_results(results, console)
    return results


def print_results(results: dict[str, Any], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    n = results["sizes"]["test"]
    table = Table(title=f"{results['dataset']}: {n} held-out test questions, {results['model']}, 1 run")
    for column in ("method", "accuracy", "correct", "unparsed", "wall s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, r in results["methods"].items():
        table.add_row(name, f"{r['accuracy']:.1%}", f"{r['n_correct']}/{r['n']}", str(r["n_errors"]), str(r["wall_s"]))
    console.print(table)
    run_dir = Path(results["run_dir"])
    # a model wrote the reward: printed as text, never as markup
    console.print("t* (the compiled prompter's reward):", escape(results.get("final_reward", "")), markup=True)
    console.print(
        f"\noutputs in {run_dir}:\n"
        f"  results.json            the table above\n"
        f"  compile/report.json     per-round figures (report.png: accuracy and time per stage)\n"
        f"  program/                the compiled program (DSPy JSON state + LoRA adapter + manifest)\n"
        f"reuse it:  trprompt evaluate {run_dir / 'program'} --dataset {results['dataset']}\n"
        f"           trprompt serve {run_dir / 'program'}\n"
        f"  or in Python: program = TRPromptProgram(); program.load(\"{run_dir / 'program'}\"); "
        "trprompt_dspy.serve_prompters(program)  (see programs/drop_in_pipeline.py)"
    )
