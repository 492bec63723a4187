"""Memory and throughput of one, two and three local vLLM servers on one machine.

A compile whose roles run on local models of their own starts one server per distinct base model
(e.g. prompter and target on Qwen2.5-Coder-0.5B, critic and optimizer on Qwen2.5-Coder-1.5B).
This measures, for each set of servers, started with the library's defaults (one engine thread
each on 2 cores, ``cpu_kvcache_space_gib`` GiB of KV cache each):

* ready time of each server, started one after the other;
* peak PSS of all the servers' process trees together (and RSS, an upper bound), sampled from
  /proc while they start and while they generate;
* generation throughput of each server alone, then of all of them at once (every server gets
  ``--concurrency`` concurrent requests of ``--max-tokens`` tokens), in completion tokens per
  second; the ratio tells how much of a server's speed is left when the others are busy.

Usage::

    .venv/bin/python benchmarks/multi_server.py --models qwen2.5-coder-0.5b qwen2.5-coder-1.5b smollm2-135m-instruct

Writes ``benchmarks/results/multi_server.{json,md}``. Numbers depend on what else runs on the
machine; the load average before each set is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving_speed import _complete, _proc_kib, throughput  # noqa: E402  (this folder is on sys.path)

from trprompt_dspy.infra.serving import ServerConfig, VLLMServer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


class GroupSampler(threading.Thread):
    """Peak summed PSS and RSS over the process trees of several servers."""

    def __init__(self, servers: list[VLLMServer], period_s: float = 0.2):
        super().__init__(daemon=True)
        self.servers, self.period_s = servers, period_s
        self.peak_pss_kib = self.peak_rss_kib = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = [pid for server in list(self.servers) for pid in server.pids()]
            self.peak_pss_kib = max(self.peak_pss_kib, sum(_proc_kib(p, "smaps_rollup", "Pss:") for p in pids))
            self.peak_rss_kib = max(self.peak_rss_kib, sum(_proc_kib(p, "status", "VmRSS:") for p in pids))
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure_set(models: list[str], *, concurrency: int, requests: int, max_tokens: int, kv_gib: int,
                log_dir: Path) -> dict:
    servers: list[VLLMServer] = []
    sampler = GroupSampler(servers)
    result: dict = {"models": models, "load_avg_before": os.getloadavg()[0], "kv_cache_gib_each": kv_gib,
                    "servers": []}
    sampler.start()
    try:
        for i, model in enumerate(models):
            config = ServerConfig(model=model, device="cpu", cpu_kvcache_space_gib=kv_gib, startup_timeout_s=900,
                                  enable_lora=(i == 0), log_path=log_dir / f"{len(models)}-{i}.log")
            server = VLLMServer(config)
            servers.append(server)
            start = time.perf_counter()
            server.start()
            _complete(server, "Hello", 8)  # first request pays one-off costs
            result["servers"].append({"model": model, "lora": i == 0, "ready_s": round(time.perf_counter() - start, 1),
                                      "cpu_threads": config.cpu_threads or max(1, (os.cpu_count() or 2) - 1)})
        result["idle_pss_gib"] = round(sum(_proc_kib(p, "smaps_rollup", "Pss:") for s in servers for p in s.pids()) / 2**20, 2)
        for entry, server in zip(result["servers"], servers):
            entry["alone"] = throughput(server, concurrency, requests, max_tokens)
        if len(servers) > 1:
            with ThreadPoolExecutor(max_workers=len(servers)) as pool:
                together = list(pool.map(lambda s: throughput(s, concurrency, requests, max_tokens), servers))
            for entry, shared in zip(result["servers"], together):
                entry["together"] = shared
                entry["together_over_alone"] = round(shared["tokens_per_s"] / entry["alone"]["tokens_per_s"], 2)
        result["load_avg_after"] = os.getloadavg()[0]
    finally:
        for server in servers:
            server.stop()
        sampler.stop()
    result.update(peak_pss_gib=round(sampler.peak_pss_kib / 2**20, 2), peak_rss_gib=round(sampler.peak_rss_kib / 2**20, 2))
    print(json.dumps(result), flush=True)
    return result


def markdown(report: dict) -> str:
    lines = ["# One, two and three local servers on one machine", "",
             f"{report['cpus']} CPU cores, {report['mem_gib']} GiB memory; each server with the library's defaults "
             f"(engine threads = cores - 1, {report['kv_cache_gib']} GiB KV cache, LoRA on the first). Throughput: "
             f"{report['concurrency']} concurrent requests of {report['max_tokens']} tokens per server "
             f"({report['requests']} requests), completion tokens/s. Command: `{report['command']}`.", "",
             "| servers | models | ready s (each) | idle PSS GiB | peak PSS GiB | peak RSS GiB | tok/s alone (each) | "
             "tok/s all at once (each) | sum at once | load before |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in report["sets"]:
        servers = entry["servers"]
        alone = " / ".join(str(s["alone"]["tokens_per_s"]) for s in servers)
        together = " / ".join(str(s["together"]["tokens_per_s"]) for s in servers) if len(servers) > 1 else alone
        total = sum((s.get("together") or s["alone"])["tokens_per_s"] for s in servers)
        lines.append(f"| {len(servers)} | {' + '.join(entry['models'])} | {' / '.join(str(s['ready_s']) for s in servers)} | "
                     f"{entry['idle_pss_gib']} | {entry['peak_pss_gib']} | {entry['peak_rss_gib']} | {alone} | {together} | "
                     f"{total:.1f} | {entry['load_avg_before']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m-instruct"],
                        help="the first 1, 2, ... of these are served together")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=ServerConfig.cpu_kvcache_space_gib)
    parser.add_argument("--out", type=Path, default=RESULTS / "multi_server.json")
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="trprompt-multi-server-"))
    report = {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
              "kv_cache_gib": args.kv_cache_gib, "concurrency": args.concurrency, "requests": args.requests,
              "max_tokens": args.max_tokens, "command": " ".join(["python", *sys.argv]), "sets": []}
    for count in range(1, len(args.models) + 1):
        report["sets"].append(measure_set(args.models[:count], concurrency=args.concurrency, requests=args.requests,
                                          max_tokens=args.max_tokens, kv_gib=args.kv_cache_gib, log_dir=log_dir))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    main()
