"""`trprompt serve` of a saved program under load: 64 concurrent clients for 60 s on loopback.

Every request must succeed (0 failed), the latency p50/p99 are printed (``pytest -s`` shows them;
speed is measured, not asserted), and a Ctrl-C afterwards stops the server with exit 0 and no
process of its tree left.
"""

import json
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

pytestmark = pytest.mark.slow

CLIENTS = 64
SECONDS = 60


def _endpoint(lines: list[str]) -> tuple[str, str, str]:
    """(api_base, adapter name, base model name) from the lines `trprompt serve` printed."""
    text = "".join(lines)
    api_base = text.split("serving on ", 1)[1].split()[0]
    base = text.split("base model: ", 1)[1].split()[0]
    adapter = text.split("prompter adapter(s): ", 1)[1].split()[0].rstrip(",")
    return api_base, adapter, base


def _ask(api_base: str, model: str, content: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0.0}
    request = urllib.request.Request(api_base + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.load(response)
    if response.status != 200 or not reply.get("choices"):
        raise RuntimeError(f"HTTP {response.status}: {str(reply)[:200]}")


def test_serve_under_load_then_ctrl_c(tiny_run, tmp_path):
    program = tmp_path / "program"
    tiny_run.compiled.save(str(program))
    serve = subprocess.Popen([sys.executable, "-m", "trprompt_dspy", "serve", str(program), "--host", "127.0.0.1"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in serve.stdout:  # until the endpoint is printed
            lines.append(line)
            if "Ctrl-C stops the server" in line:
                break
        api_base, adapter, base = _endpoint(lines)
        assert api_base.startswith("http://127.0.0.1:") and adapter.startswith("prompter-r")
        tree = psutil.Process(serve.pid).children(recursive=True)
        assert tree, "the server runs in child processes"

        latencies, failures, lock = [], [], threading.Lock()
        deadline = time.monotonic() + SECONDS

        def client(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                # mostly the adapter, every 4th request the base model: mixed LoRA batches
                model = base if n % 4 == 3 else adapter
                start = time.perf_counter()
                try:
                    _ask(api_base, model, f"Client {i}, question {n}: what is {i} + {n}?")
                except Exception as exc:  # counted, not raised: every failure is reported below
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    with lock:
                        latencies.append(time.perf_counter() - start)
                n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=SECONDS + 180)
        assert not failures, f"{len(failures)} failed requests, first: {failures[0]}"
        assert len(latencies) >= CLIENTS  # every client got answers
        cuts = statistics.quantiles(latencies, n=100)
        print(f"\nserve under load: {CLIENTS} clients x {SECONDS} s: {len(latencies)} requests, 0 failed, "
              f"{len(latencies) / SECONDS:.1f} req/s, latency p50 {cuts[49]:.2f} s, p99 {cuts[98]:.2f} s")

        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
