"""The demo's compile estimated now (with the adapter probe) against the demo compile of 2026-12-04
(``benchmarks/results/estimate_check_demo.json``: the same settings, the same kind of machine).

    TRPROMPT_DATA_DIR=../shared/data .venv/bin/python benchmarks/estimate_demo_check.py

Writes ``benchmarks/results/estimate_check_demo_adapter.json`` (the markdown beside it is written by hand from it).
"""
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import trprompt_dspy as t  # noqa: E402
from trprompt_dspy.app.demo import DemoSettings, demo_config, demo_data
from trprompt_dspy.metrics import metric_for
from trprompt_dspy.teleprompter.estimate import stage_seconds
s = DemoSettings(data_dir=os.environ["TRPROMPT_DATA_DIR"])
train, val, _ = demo_data(s)
with t.VLLMServer(t.ServerConfig(model="default")) as server:
    tele = t.TRPromptTeleprompter(server=server, metric=metric_for(s.dataset), config=demo_config(s),
                                  lm_kwargs={"max_tokens": s.max_tokens})
    est = tele.estimate(t.TRPromptProgram(), trainset=train, valset=val, probe=8)
old = json.load(open(REPO / "benchmarks/results/estimate_check_demo.json"))
actual = {x["stage"]: x["actual_s"] for x in old["stages"]}
rows = [(x.stage, stage_seconds(x, est.per_call, est.probe), actual.get(x.stage)) for x in est.stages]
for r in rows: print(r)
e = sum(v for st, v, a in rows if a is not None); a = sum(a for _, _, a in rows if a is not None)
print("probe", est.probe); print(f"LM time est {e:.1f} actual {a:.1f} ratio {e/a:.2f}")
json.dump({"probe": est.probe, "per_call": est.per_call, "rows": rows, "estimated_s": e, "actual_s": a},
          open(REPO / "benchmarks/results/estimate_check_demo_adapter.json", "w"), indent=1)
