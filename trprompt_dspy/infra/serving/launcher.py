"""Runs inside the server process, then runs the vLLM module exactly as ``python -m`` would::

    python .../launcher.py <pipe fd> <grace seconds> <module> <module's arguments...>

Started by its file path, not with ``-m``: it imports nothing but the standard library before
vLLM (``-m`` would first import this package's ``__init__`` files, and needs the package
installed in the interpreter that runs vLLM, which may be another one). It does two things
vLLM's own entry point does not:

1. Watches a pipe whose only write end is held by the caller: EOF means the caller is gone,
   however it died. It then stops its own process group (vLLM's API server and its engine-core
   child), hard after the grace period.
2. Makes /v1/unload_lora_adapter also remove the adapter from the engine. vLLM 0.32 only drops
   the name, so unloaded adapters keep their LoRA slot until LRU eviction, and all slots fill
   up as adapters come and go. On CPU that triggers a vLLM bug: the torch LoRA ops index the
   slot tensors with -1 for base-model rows, i.e. they read the LAST slot, so once it holds an
   adapter, base requests batched with adapter requests get that adapter's output. Slots are
   taken lowest-first, so keeping at most max_loras - 1 adapters in the engine keeps the last
   slot empty (all zeros) and base rows exact. Skipped (with a message) where the vLLM
   internals differ; GPU kernels skip base rows and are not affected.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time


def watch_caller(fd: int, grace: float) -> None:
    """Block until the pipe ``fd`` closes (the caller is gone), then stop this process group."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    group = os.getpgid(0)
    sys.stderr.write("trprompt launcher: caller is gone, stopping the server\n")
    try:
        os.killpg(group, signal.SIGTERM)
        time.sleep(grace)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def patch_unload() -> None:
    """Make vLLM's unload route free the adapter's engine slot too (see the module docstring)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.unload_lora_adapter

    async def unload_lora_adapter(self, request, *args, **kwargs):
        lora = self.lora_requests.get(request.lora_name)
        result = await original(self, request, *args, **kwargs)
        if lora is not None and isinstance(result, str):
            await self.engine_client.remove_lora(lora.lora_int_id)
        return result

    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter


def main(argv: list[str]) -> None:
    """Start the watchdog, patch vLLM, and run ``argv[3]`` as ``__main__`` with ``argv[4:]``."""
    fd, grace, module = int(argv[1]), float(argv[2]), argv[3]
    threading.Thread(target=watch_caller, args=(fd, grace), name="trprompt-caller-watch", daemon=True).start()
    try:
        patch_unload()
    except Exception as error:
        sys.stderr.write(f"trprompt launcher: unload patch not applied ({error!r})\n")
    sys.argv = [module] + argv[4:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    # Run by its path, Python put this folder first on sys.path, where its siblings (config.py,
    # server.py...) would shadow top-level modules of those names for vLLM; put back what
    # `python -c` puts there (the working folder).
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
        sys.path[0] = ""
    main(sys.argv)
