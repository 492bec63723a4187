"""A remote LM that times out, answers HTTP 429 or 500, or sends an empty body.

The solver is an API model (``dspy.LM`` over HTTP, litellm's client, DSPy's retries) served by a
fault injector on localhost; the prompter and critic run on the real vLLM server with the tiny
model. Each faulty question must be retried a bounded number of times, then scored failed and
counted, while every other question gets its record.
"""

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dspy
import pytest

import trprompt_dspy as t
from trprompt_dspy.metrics import gsm8k_metric
from trprompt_dspy.rollout.rollout import RolloutConfig, run_rollout
from trprompt_dspy.infra.runs import read_jsonl
from trprompt_dspy.infra.structured import SafeJSONAdapter

FAULTS = ("rate-limited", "server-error", "empty-body", "too-slow")


class FaultyAPI(BaseHTTPRequestHandler):
    """OpenAI-compatible chat completions; the fault is named in the question."""

    hits: Counter = Counter()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        text = json.dumps(body.get("messages", []))
        fault = next((f for f in FAULTS if f in text), None)
        FaultyAPI.hits[fault or "ok"] += 1
        if fault == "rate-limited":
            return self._send(429, {"error": {"message": "rate limit", "type": "rate_limit_error"}}, {"Retry-After": "0"})
        if fault == "server-error":
            return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
        if fault == "empty-body":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault == "too-slow":
            time.sleep(6)  # past the client's timeout
        content = json.dumps({"reasoning": "2 and 2 make 4.", "answer": "4"})
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "faulty",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        })

    def _send(self, code, payload, headers=None):
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


@pytest.fixture
def faulty_api():
    FaultyAPI.hits.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.timeout(600)
def test_api_faults_are_retried_a_bounded_number_of_times_then_counted(vllm_server, faulty_api, tmp_path):
    retries = 2
    solver_lm = dspy.LM("openai/faulty", api_base=faulty_api, api_key="test", cache=False, timeout=2,
                        num_retries=retries, max_tokens=64)
    local = vllm_server.lm(structured=True, max_tokens=64, max_string_length=80, cache=False)
    prompter, critic = t.QueryAwarePrompter(lm=local), t.TextualCritic(lm=local)
    solver = t.Solver(lm=solver_lm)
    questions = ["What is 2+2?", "What is 2+2 plus 0?"] + [f"What is 2+2? ({fault})" for fault in FAULTS]
    examples = [dspy.Example(id=f"q{i}", question=q, answer="4").with_inputs("question") for i, q in enumerate(questions)]
    path = tmp_path / "records.jsonl"
    with dspy.context(adapter=SafeJSONAdapter()):
        result = run_rollout(prompter, solver, critic, examples, gsm8k_metric, reward="be clear",
                             config=RolloutConfig(n_samples=1, num_threads=6), records_path=path, progress=False)
    # the two healthy questions have their records; each faulty one failed and was counted
    assert {r.example_id for r in result.records} == {"q0", "q1"}
    assert all(r.correct for r in result.records)
    assert result.n_failed == len(FAULTS) and sum(result.error_counts.values()) == len(FAULTS)
    assert len(read_jsonl(path)) == 2
    # bounded: no faulty question was tried more than 1 + num_retries times
    for fault in FAULTS:
        assert 1 <= FaultyAPI.hits[fault] <= 1 + retries, (fault, FaultyAPI.hits)
    # transient errors (429, 500) were retried
    assert FaultyAPI.hits["rate-limited"] == 1 + retries and FaultyAPI.hits["server-error"] == 1 + retries
