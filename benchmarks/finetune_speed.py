"""Seconds per step and tokens/s of LoRA SFT of the prompter: trl defaults vs our settings.

Same data for every variant: batches of 8 sequences of exactly 256 tokens, cut from real
prompter training chats (GSM8K questions formatted by the prompter's ChatAdapter, tokenized by
the model's chat template; the prompt is cut from the left so the completion -- the only part
with loss -- stays whole). LoRA r=16, alpha=32, dropout 0.05, all-linear in every variant.

Variants:
  trl-defaults        plain ``SFTTrainer`` + ``SFTConfig(use_cpu=True)``: what trl does out of
                      the box on a CPU (bf16 autocast, gradient checkpointing, fp32 weights,
                      torch's default threads). ``use_cpu`` is the one change trl needs here:
                      its default ``bf16=True`` refuses to start without a GPU otherwise.
  trl-defaults-fp32   the other one-flag way to start trl on a CPU (``bf16=False``).
  trl-defaults-1thread  trl defaults on one torch thread: on a shared machine this separates
                      what our thread choice gains from what the other settings gain.
  ours                ``trprompt_dspy.finetune`` with its automatic settings (CPU_PROFILES,
                      threads capped at the cores idle when training starts).
  ours-*              ablations: one setting of ``ours`` changed at a time.

The first step of every run is left out (one-off kernel and allocator warm-up); the figure is
the median (and the minimum: the least disturbed step) of the remaining steps of all runs; the
variants run round-robin ``--repeats`` times so that a load change on a shared machine hits all
of them. Results go to ``benchmarks/results/finetune_speed.json``.

    .venv/bin/python benchmarks/finetune_speed.py --variants trl-defaults ours --repeats 3  # ~6 min idle
    .venv/bin/python benchmarks/finetune_speed.py --repeats 1     # every variant and ablation once
    .venv/bin/python benchmarks/finetune_speed.py --model tiny --steps 20 \\
        --output benchmarks/results/finetune_speed_tiny.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trprompt_dspy.finetune import (
    FinetuneConfig,
    TokenizedExample,
    records_to_chat_data,
    stop_token_strings,
    tokenize_chat_example,
    train_lora_on_tokens,
)
from trprompt_dspy.rollout.records import RolloutRecord

RESULTS = REPO / "benchmarks" / "results" / "finetune_speed.json"
BATCH, SEQ = 8, 256
LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
OURS_ABLATIONS = {
    "ours": {},
    "ours-1thread": {"cpu_threads": 1},
    "ours-2threads": {"cpu_threads": 2},
    "ours-fp32-weights": {"load_bf16": False},
    "ours-no-bf16": {"bf16": False, "load_bf16": False},
    "ours-checkpointing": {"gradient_checkpointing": True},
}


def load_questions(n: int) -> list[str]:
    path = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if path.is_file():
        with open(path) as f:
            return [json.loads(line)["question"] for _, line in zip(range(n), f)]
    return [f"A shop sells {i} apples at {i + 3} dollars each. How much is that in total?" for i in range(n)]


def build_examples(model_dir: str, n_sequences: int) -> list[TokenizedExample]:
    """Real prompter chats, cut to exactly SEQ tokens (left-cut prompt, whole completion)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stops = stop_token_strings(tokenizer, model_dir)
    records = [
        RolloutRecord(
            question=question,
            prompt=(f"Read the question carefully. List every quantity it gives ({question[:60]}...), decide which "
                    "operation links them, compute step by step and check the units of the final answer."),
            critique=("The prompt named the right quantities but did not warn about the unit conversion; "
                      "the solver added hours to minutes and got the wrong total."),
        )
        for question in load_questions(n_sequences)
    ]
    examples = []
    for chat in records_to_chat_data(records):
        example = tokenize_chat_example(tokenizer, chat["messages"], stops)
        completion = example.completion_ids[:96]
        prompt = example.prompt_ids[-(SEQ - len(completion)):]
        assert len(prompt) + len(completion) == SEQ, "prompt too short to fill the sequence"
        examples.append(TokenizedExample(prompt, completion))
    return examples


def run_trl_defaults(examples, model_dir: str, steps: int, bf16: bool, threads: int | None = None) -> dict:
    """Plain trl: SFTTrainer loads the model itself and wraps it with the same LoraConfig."""
    import torch

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    dataset = Dataset.from_list(
        [{"input_ids": e.prompt_ids + e.completion_ids,
          "completion_mask": [0] * len(e.prompt_ids) + [1] * len(e.completion_ids)} for e in examples]
    )
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch, use_cpu=True, per_device_train_batch_size=BATCH, max_steps=steps,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            **({} if bf16 else {"bf16": False}),
        )
        peft_config = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model_dir, args=args, train_dataset=dataset, peft_config=peft_config,
                             callbacks=[Timer()])
        settings = {"threads": torch.get_num_threads(), "bf16": args.bf16,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "weights_dtype": str(next(trainer.model.parameters()).dtype)}
        trainer.train()
    torch.set_num_threads(default_threads)
    return {"step_seconds": [round(t, 3) for t in times], "settings": settings}


def run_ours(examples, model_dir: str, steps: int, overrides: dict) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        config = FinetuneConfig(**LORA, max_steps=steps, per_device_batch_size=BATCH, max_length=SEQ,
                                progress=False, **overrides)
        result = train_lora_on_tokens(examples, Path(scratch) / "adapter", model=model_dir, config=config)
    return {"step_seconds": result.summary["step_seconds"], "settings": result.summary["device"]}


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default",
                        help="model to train: 'default' (the embedded SmolLM2-135M), 'tiny' (the test model) or a folder")
    parser.add_argument("--steps", type=int, default=3, help="steps per run (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, round-robin over the variants")
    parser.add_argument("--variants", nargs="*",
                        default=["trl-defaults", "trl-defaults-1thread", "trl-defaults-fp32", *OURS_ABLATIONS])
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    from trprompt_dspy.infra.models import build_tiny_model, resolve_model

    if args.model == "tiny":
        # The tests' model: decides the CPU profile of very small models.
        model_dir = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-speed-")) / "tiny", seed=0))
    else:
        model_dir = resolve_model(args.model)
    examples = build_examples(model_dir, BATCH * args.steps)
    report = {
        "model": model_dir, "batch": BATCH, "sequence_tokens": SEQ, "steps": args.steps, "repeats": args.repeats,
        "lora": LORA,
        "completion_tokens_per_sequence": round(statistics.mean(len(e.completion_ids) for e in examples), 1),
        "cpu_count": os.cpu_count(), "loadavg_before": uptime(), "variants": {},
    }
    # Round-robin repeats: on a shared machine the load changes within minutes, so every
    # variant gets runs spread over the whole benchmark rather than one run at one moment.
    for repeat in range(args.repeats):
        for name in args.variants:
            started = time.monotonic()
            if name == "trl-defaults":
                run = run_trl_defaults(examples, model_dir, args.steps, bf16=True)
            elif name == "trl-defaults-fp32":
                run = run_trl_defaults(examples, model_dir, args.steps, bf16=False)
            elif name == "trl-defaults-1thread":
                run = run_trl_defaults(examples, model_dir, args.steps, bf16=True, threads=1)
            elif name in OURS_ABLATIONS:
                overrides = dict(OURS_ABLATIONS[name])
                ours = report["variants"].get("ours", {}).get("runs")
                if "cpu_threads" not in overrides and ours:
                    # Change one setting at a time: keep the threads `ours` chose in this repeat.
                    overrides["cpu_threads"] = ours[-1]["settings"]["cpu_threads"]
                run = run_ours(examples, model_dir, args.steps, overrides)
            else:
                parser.error(f"unknown variant {name}")
            run.update(wall_seconds=round(time.monotonic() - started, 1), loadavg_after=uptime())
            entry = report["variants"].setdefault(name, {"runs": []})
            entry["runs"].append(run)
            # The first step of each run carries one-off costs; the rest are steady steps.
            steady = [t for r in entry["runs"] for t in r["step_seconds"][1:]] or [r["step_seconds"][0] for r in entry["runs"]]
            entry.update(
                median_seconds_per_step=round(statistics.median(steady), 3),
                min_seconds_per_step=round(min(steady), 3),
                tokens_per_second_at_median=round(BATCH * SEQ / statistics.median(steady), 1),
                tokens_per_second_at_min=round(BATCH * SEQ / min(steady), 1),
            )
            print(f"[{repeat + 1}/{args.repeats}] {name:22s} steps {run['step_seconds']}  {run['settings']}  "
                  f"load {run['loadavg_after']}", flush=True)
            gc.collect()
    print()
    for name, entry in report["variants"].items():
        print(f"{name:22s} median {entry['median_seconds_per_step']:7.2f} s/step ({entry['tokens_per_second_at_median']:7.1f} tok/s)"
              f"  min {entry['min_seconds_per_step']:7.2f} s/step ({entry['tokens_per_second_at_min']:7.1f} tok/s)")
    base = report["variants"].get("trl-defaults")
    ours = report["variants"].get("ours")
    if base and ours:
        report["speedup_vs_trl_defaults"] = {
            "median": round(base["median_seconds_per_step"] / ours["median_seconds_per_step"], 2),
            "min": round(base["min_seconds_per_step"] / ours["min_seconds_per_step"], 2),
        }
        print(f"ours vs trl defaults: {report['speedup_vs_trl_defaults']}")
    report["loadavg_after"] = uptime()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
