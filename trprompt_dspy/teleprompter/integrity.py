"""What a resumed compile checks in its run folder before trusting it, and what it repairs.

``stages.json`` says which stages are done; a folder edited or damaged by hand can disagree
with it. Before the rounds start, :func:`repair_run_folder` checks every done stage's files:

* **a rollout's records** (``round_k/records.jsonl``) missing or holding fewer records than the
  stage recorded (the round folder was deleted, the file cut short): the records are what every
  later stage was computed from, so round k and every later round are done again (the records
  that are still there are kept and not regenerated). A line damaged in the middle of the file
  is an error naming the line (``infra.runs.iter_jsonl``): what else is wrong is unknown, and
  deleting that line by hand is the user's call.
* **an adapter** (``round_k/adapter``) missing, empty or not readable as safetensors, or with a
  config that is not JSON: it is derived from the records, so it is trained again, and the
  stages after it in that round and every later round are done again.

Each repair is logged as a warning naming what was wrong and what runs again; nothing that is
whole is thrown away. ``stages.json`` or ``fingerprint.json`` that is not JSON is an error
raised by ``RunFolder`` itself, saying which file to delete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..infra.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..infra.runs import RunFolder, read_jsonl
from ..rollout.rollout import records_path_for

logger = logging.getLogger(__name__)


def adapter_problem(adapter_dir: Path) -> str | None:
    """Why an adapter folder cannot be served, or None when its config and weights read."""
    config, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config.is_file() or not weights.is_file():
        return f"{adapter_dir} has no {ADAPTER_CONFIG if not config.is_file() else ADAPTER_WEIGHTS}"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{config} is not JSON"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                return f"{weights} holds no tensors"
    except Exception as exc:  # safetensors raises its own error types for a cut or empty file
        return f"{weights} is not readable safetensors ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def _round_of(stage: str) -> int:
    return int(stage.split("/", 1)[0].removeprefix("round_"))


def repair_run_folder(folder: RunFolder) -> list[str]:
    """Check the files of every done stage (see the module doc); forget the stages that must run
    again. Returns one line per repair (also logged)."""
    repairs: list[str] = []
    done = folder.completed
    for k in sorted({_round_of(s) for s in done if _round_of(s) >= 1}):
        rollout = folder.result(f"round_{k}/rollout") if folder.is_done(f"round_{k}/rollout") else None
        problem = None
        if rollout is not None:
            path = records_path_for(folder.path / f"round_{k}")
            have = len(read_jsonl(path))  # a line damaged mid-file raises, naming it
            if have < int(rollout.get("records", 0)):
                problem = (f"{path} holds {have} of the {rollout['records']} records round {k}'s rollout wrote; "
                           f"round {k} and later rounds run again (the records there are kept)")
                again = [s for s in folder.completed if _round_of(s) >= k]
        if problem is None and folder.is_done(f"round_{k}/finetune"):
            adapter = folder.path / f"round_{k}" / "adapter"  # where the compile serves it from
            why = adapter_problem(adapter)
            if why is not None:
                problem = f"{why}; round {k}'s adapter is trained again, and what came after it runs again"
                again = [s for s in folder.completed if _round_of(s) > k or (
                    _round_of(s) == k and not s.endswith("/rollout"))]
        if problem is not None:
            folder.forget(again)
            logger.warning("run folder %s: %s", folder.path, problem)
            repairs.append(problem)
            break  # every later round was forgotten with this one
    return repairs
