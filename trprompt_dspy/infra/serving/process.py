"""The server's operating-system process: launched in its own session (process group) through
``launcher.py``, stopped as a whole group, and never left behind.

A :class:`ServerProcess` is stopped with SIGTERM to the group, then SIGKILL after a grace period,
and at interpreter exit. If the caller dies without running any Python code (SIGKILL, OOM
killer), the launcher's watchdog thread inside the server process sees its pipe to the caller
close and takes the whole group down, so no orphan is left. (``PR_SET_PDEATHSIG`` was not used:
it fires when the *thread* that started the child exits, which would kill servers started from
worker threads.)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: folder (under the temp folder) of server logs given no ``log_path``: not a valid module name, so a
#: script run from the temp folder cannot import it as an empty namespace package named like ours
LOG_FOLDER = "trprompt-dspy-logs"

#: run by its file path in the server process, before vLLM (see its docstring)
LAUNCHER = Path(__file__).with_name("launcher.py")
#: the module the launcher runs as ``__main__``
VLLM_MODULE = "vllm.entrypoints.openai.api_server"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def default_log_path(served_model_name: str, port: int) -> Path:
    """A new server log file under ``<temp folder>/trprompt-dspy-logs``, named by model, time and port."""
    folder = Path(tempfile.gettempdir()) / LOG_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return folder / f"vllm-{served_model_name.replace('/', '_')}-{stamp}-{port}.log"


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` non-blank lines of a server log (weight-loading progress left out)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no server log)"
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith(("Loading safetensors",))]
    return "\n".join(kept[-lines:])


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc (Linux)."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def signal_group(pgid: int | None, sig: int) -> None:
    """Send ``sig`` to a process group; a group that is gone (or None) is no error."""
    if pgid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ServerProcess:
    """One launched server: the launcher's process group and the pipe its watchdog reads.

    Make one with :meth:`launch`. Every live one is stopped at interpreter exit.

    Attributes:
        pgid: the process group (the leader's pid; kept after :meth:`stop`).
        grace_s: default seconds between SIGTERM and SIGKILL in :meth:`stop`.
    """

    def __init__(self, popen: subprocess.Popen, watch_fd: int, grace_s: float):
        self._popen = popen
        self.pgid = popen.pid  # session leader: pgid == pid
        self._watch_fd: int | None = watch_fd
        self.grace_s = grace_s
        self._lock = threading.Lock()
        _LIVE.add(self)

    @classmethod
    def launch(cls, python: str, module_args: Sequence[str], *, env: Mapping[str, str], log_path: Path,
               grace_s: float) -> ServerProcess:
        """Start ``python launcher.py <fd> <grace_s> <vLLM module> *module_args`` in a new
        session, its output appended to ``log_path`` (after a header line with the command)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        argv = [python, str(LAUNCHER), str(read_fd), str(grace_s), VLLM_MODULE, *module_args]
        with open(log_path, "ab") as log:
            log.write(f"\n===== trprompt_dspy: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env),
                    start_new_session=True,  # own process group: stop() signals the whole tree
                    pass_fds=(read_fd,),
                )
            except BaseException:
                os.close(write_fd)
                raise
            finally:
                os.close(read_fd)
        return cls(popen, write_fd, grace_s)

    @property
    def pid(self) -> int:
        """Pid of the launcher (the process-group leader)."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status of the leader, once :meth:`poll` has seen it exit."""
        return self._popen.returncode

    def poll(self) -> int | None:
        """The leader's exit status, or None while it runs."""
        return self._popen.poll()

    def pids(self) -> list[int]:
        """Pids of every live process of the group."""
        return group_pids(self.pgid)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop the whole group: SIGTERM, then SIGKILL after ``grace_s`` (default :attr:`grace_s`).

        Idempotent; returns once no process of the group is left (or after a short extra wait if
        the kernel is slow to reap them).
        """
        with self._lock:
            if self._watch_fd is None:
                return
            proc, pgid = self._popen, self.pgid
            grace_s = self.grace_s if grace_s is None else grace_s
            deadline = time.monotonic() + grace_s
            signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
            # Children (engine core, resource tracker) may outlive the leader; they share its
            # process group, which the kernel keeps reserved while any member lives.
            while group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if group_pids(pgid) or proc.poll() is None:
                logger.warning("vLLM server %s did not stop in %.0f s; killing it", proc.pid, grace_s)
                signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            deadline = time.monotonic() + 5
            while group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(OSError):
                os.close(self._watch_fd)
            self._watch_fd = None
            _LIVE.discard(self)


_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop every server process still running when the interpreter exits."""
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.stop()
