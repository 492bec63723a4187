"""The ``trprompt`` command: ``demo``, ``compile``, ``evaluate`` and ``serve``.

Mistakes a user makes (an unknown dataset, a missing file, a model that does not exist, an API
role without its key, a port in use, a bad config file) print one ``trprompt: error:`` line and
exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import TRPromptError
from .parser import FILE_FIELDS, LOCAL, build_parser  # noqa: F401 (build_parser: the public face)

logger = logging.getLogger(__name__)

class UserError(TRPromptError, ValueError):
    """A mistake in the command line or its inputs: one message, exit status 2, no traceback."""


# --------------------------------------------------------------------------- shared checks


def _check_port(host: str, port: int | None) -> None:
    if port is None:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is in use; pick another with --port") from None


def role_lm(role: str, model: str, lm_kwargs: dict[str, Any], servers: "RoleServers | None" = None) -> Any:
    """``None`` for ``"local"`` (the role runs on the prompter's server); a running server for
    another local model (an embedded name, a folder, a ``.gguf``; needs ``servers``); else a
    ``dspy.LM`` for an API model (any litellm name, e.g. ``openai/gpt-4o-mini``) whose key must be
    in the environment."""
    from ..infra.models import is_local_model

    if model == LOCAL:
        return None
    if is_local_model(model):
        if servers is None:
            raise UserError(f"--{role}-model {model!r}: a local model other than the prompter's is not supported here")
        return servers.get(role, model)
    import dspy
    import litellm

    try:
        check = litellm.validate_environment(model=model)
    except Exception as exc:
        raise UserError(f"--{role}-model {model!r}: litellm does not know this model ({exc})") from None
    if not check.get("keys_in_environment", False):
        missing = ", ".join(check.get("missing_keys") or []) or "its API key"
        raise UserError(f"--{role}-model {model!r} needs {missing} in the environment")
    return dspy.LM(model, **{k: v for k, v in lm_kwargs.items() if k != "max_string_length"})


def _load_examples(args: argparse.Namespace, *, split: str, limit: int | None) -> list:
    from ..data.loaders import load_dataset, load_file

    if getattr(args, "file", None):
        return load_file(args.file, limit=limit, **_file_fields(args))
    return load_dataset(args.dataset, split, data_dir=args.data_dir, limit=limit)


#: the --file columns the user can rename, and their defaults
def _file_fields(args: argparse.Namespace) -> dict[str, str]:
    """The column names of ``--file``/``--val-file`` (``--question-field`` etc., else the defaults)."""
    given = [f"--{f.replace('_', '-')}" for f in FILE_FIELDS if getattr(args, f, None) is not None]
    if given and not getattr(args, "file", None):
        raise UserError(f"{', '.join(given)} name columns of your own --file; a built-in --dataset has its own")
    return {f: getattr(args, f, None) or default for f, default in FILE_FIELDS.items()}


def _metric(args: argparse.Namespace):
    from ..metrics import METRICS, metric_for

    # a file says nothing about how its answers are compared: the user names the metric
    if getattr(args, "file", None) and not args.metric:
        raise UserError(f"--file needs --metric NAME to say how answers are compared (one of: {', '.join(sorted(METRICS))})")
    name = args.metric or args.dataset
    try:
        return metric_for(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _start_server(config: Any) -> Any:
    from ..infra.serving import VLLMServer

    _check_port(config.host, config.port)
    return VLLMServer(config).start()


class RoleServers:
    """One local vLLM server per distinct base model of the roles, started on first use and
    stopped together (a context manager). The prompter's server is given; a role that names the
    prompter's model shares it. Role servers load no adapters (no LoRA slots, less memory)."""

    def __init__(self, prompter_server: Any, log_dir: Path | None = None):
        self.log_dir = log_dir
        self.servers: dict[str, Any] = {prompter_server.model_path: prompter_server}
        self._started: list[Any] = []

    def get(self, role: str, model: str) -> Any:
        from ..infra.models import resolve_model
        from ..infra.serving import ServerConfig

        path = resolve_model(model)
        if path not in self.servers:
            log = self.log_dir / f"vllm-{role}.log" if self.log_dir else None
            print(f"trprompt: starting a local server for the {role} ({model})", flush=True)
            server = _start_server(ServerConfig(model=model, enable_lora=False, log_path=log))
            self._started.append(server)
            self.servers[path] = server
        return self.servers[path]

    def __enter__(self) -> "RoleServers":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for server in self._started:
            server.stop()


# --------------------------------------------------------------------------- commands


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    try:
        settings = DemoSettings(
            dataset=args.dataset, model=args.model, tiny=args.tiny, train=args.train, val=args.val, test=args.test,
            rounds=args.rounds, data_dir=args.data_dir, log_dir=args.log_dir, num_threads=args.num_threads,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.tiny and args.train == 16 and args.test == 40:  # the defaults: the smallest sizes that run every stage
        settings.train, settings.val, settings.test, settings.rounds = 4, 2, 3, min(args.rounds, 2)
    run_demo(settings)
    return 0


def compile_config(args: argparse.Namespace) -> Any:
    """The ``TRPromptConfig`` of ``trprompt compile``: ``--config``'s file (or the defaults), with
    ``--rounds``, the caps (``--max-lm-calls``, ``--max-cost-usd``, ``--max-wall-s``) and the
    tracking (``--track``, ``--track-uri``) over it."""
    from .config_file import config_from_dict, load_config

    overrides = {"rounds": args.rounds, "max_lm_calls": args.max_lm_calls, "max_cost_usd": args.max_cost_usd,
                 "max_wall_s": args.max_wall_s, "track": args.track, "track_uri": args.track_uri}
    if args.config:
        return load_config(args.config, **overrides)
    return config_from_dict({k: v for k, v in overrides.items() if v is not None})


def _compile(args: argparse.Namespace) -> int:
    from ..infra.serving import ServerConfig
    from ..modules.program import TRPromptProgram
    from ..teleprompter import TRPromptTeleprompter

    if args.val_size < 0:
        raise UserError(f"--val-size must be >= 0, got {args.val_size}")
    if args.probe < 0:
        raise UserError(f"--probe must be >= 0, got {args.probe}")
    if args.estimate_out and not args.dry_run:
        raise UserError("--estimate-out goes with --dry-run (the estimate is made before a compile, not during one)")
    config = compile_config(args)
    if args.file:
        from ..data.loaders import split_examples

        everything = _load_examples(args, split="train", limit=None)
        if args.train_size + args.val_size > len(everything):
            raise UserError(f"{args.file} has {len(everything)} examples; asked for {args.train_size} + {args.val_size}")
        train, val = split_examples(everything, [args.train_size, args.val_size], seed=0)
        if args.val_file:
            from ..data.loaders import load_file

            val = load_file(args.val_file, **_file_fields(args))[: args.val_size]
    else:
        from ..data.loaders import train_val_test

        train, val, _ = train_val_test(args.dataset, args.train_size, args.val_size, 0, data_dir=args.data_dir)
    log_dir = Path(args.log_dir or f"runs/compile-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.dry_run and not args.probe:  # the counts alone need no model
        from ..teleprompter.estimate import CompileEstimate, count_calls

        stages = count_calls(config, len(train), len(val), cached=True)  # the CLI's LMs use DSPy's cache
        _report_estimate(CompileEstimate(stages=stages, per_call={}, probe={"questions": 0}, wall_s=None), args)
        return 0
    if (log_dir / "stages.json").is_file() and not args.resume and not args.dry_run:
        raise UserError(f"{log_dir} holds an earlier run; pass --resume to continue it or choose another --log-dir")
    if args.resume and not (log_dir / "stages.json").is_file():
        raise UserError(f"--resume: {log_dir} holds no run to continue")
    lm_kwargs = {"max_tokens": args.max_tokens}
    role_models = {role: getattr(args, f"{role}_model") for role in ("target", "critic", "optimizer")}
    # API roles are checked (keys, names) before any server starts
    roles = {role: role_lm(role, model, lm_kwargs) for role, model in role_models.items() if not _is_local(model)}
    metric = _metric(args)
    print(f"trprompt compile: {len(train)} training / {len(val)} validation examples, {config.rounds} round(s), "
          f"prompter {args.model}; run folder {log_dir}", flush=True)
    server = _start_server(ServerConfig(model=args.model, port=args.port, log_path=log_dir / "vllm.log"))
    with server, RoleServers(server, log_dir) as servers:
        for role, model in role_models.items():
            if _is_local(model):
                roles[role] = role_lm(role, model, lm_kwargs, servers)
        tele = TRPromptTeleprompter(
            server=server, metric=metric, config=config, log_dir=log_dir, lm_kwargs=lm_kwargs,
            target_lm=roles["target"], critic_lm=roles["critic"], optimizer_lm=roles["optimizer"],
        )
        if args.dry_run:
            _report_estimate(tele.estimate(TRPromptProgram(), trainset=train, valset=val or None, probe=args.probe), args)
            return 0
        compiled = tele.compile(TRPromptProgram(), trainset=train, valset=val or None)
        out = Path(args.out or log_dir / "program")
        compiled.save(out)
    report = json.loads((log_dir / "report.json").read_text())
    for row in report["rounds"]:
        val_acc = row.get("validation", {}).get("accuracy")
        print(f"round {row['round']}: validation accuracy {'n/a' if val_acc is None else f'{val_acc:.1%}'}")
    if report.get("stopped_by"):
        stop = report["stopped_by"]
        print(f"stopped: {stop['message']} after {stop['rounds_completed']} of {config.rounds} round(s); saved round "
              f"{report['selected_round']}, the best completed. To go on: the same command with --resume and a "
              "larger cap", flush=True)
    print(f"compiled program: {out}\nreport: {log_dir / 'report.json'} (plot: report.png)")
    return 0


def _report_estimate(estimate: Any, args: argparse.Namespace) -> None:
    """Print a dry run's estimate, and write it as JSON where ``--estimate-out`` asks."""
    print(estimate.table())
    if args.estimate_out:
        from ..infra.runs import atomic_write_json

        atomic_write_json(Path(args.estimate_out), estimate.to_dict())
        print(f"estimate written to {args.estimate_out}")


def _is_local(model: str) -> bool:
    from ..infra.models import is_local_model

    return model == LOCAL or is_local_model(model)


def _load_program(folder: str):
    from ..modules.compiled import read_manifest
    from ..modules.program import TRPromptProgram

    path = Path(folder)
    if not (path / "manifest.json").is_file():
        raise UserError(f"{path} is not a saved TRPrompt program (no manifest.json); save one with compiled.save(dir)")
    program = TRPromptProgram()
    program.load(path)
    return program, read_manifest(path)


def _saved_role(manifest: dict[str, Any], role: str) -> str:
    """The model a saved program's role ran on in its compile: ``local`` (the prompter's base
    model) for programs saved before roles were recorded."""
    entry = (manifest.get("roles") or {}).get(role)
    if not entry or not entry.get("model") or entry.get("shares_prompter"):
        return LOCAL
    return entry["model"]


def _base_model(manifest: dict[str, Any]) -> str:
    bases = {p.get("adapter", {}).get("base_model") for p in manifest.get("prompters", {}).values() if p.get("adapter")}
    bases.discard(None)
    prompter = (manifest.get("roles") or {}).get("prompter") or {}
    if not bases and prompter.get("model"):
        return prompter["model"]  # the untrained prompter was the best round: no adapter names it
    if len(bases) != 1:
        raise UserError(f"the program's prompters name {len(bases)} base models ({', '.join(map(str, bases)) or 'none'}); expected one")
    return bases.pop()


def _evaluate(args: argparse.Namespace) -> int:
    import dspy

    from ..infra.evaluation import evaluate
    from ..infra.serving import ServerConfig
    from ..modules.compiled import serve_prompters

    program, manifest = _load_program(args.program)
    examples = _load_examples(args, split=args.split, limit=args.n)
    metric = _metric(args)
    lm_kwargs = {"max_tokens": args.max_tokens}
    target_model = args.target_model or _saved_role(manifest, "target")
    target = None if _is_local(target_model) else role_lm("target", target_model, lm_kwargs)
    server = _start_server(ServerConfig(model=_base_model(manifest), port=args.port))
    with server, RoleServers(server) as servers:
        if _is_local(target_model):
            target = role_lm("target", target_model, lm_kwargs, servers)
        serve_prompters(program, server, **lm_kwargs)
        if not isinstance(target, dspy.BaseLM):  # None (the prompter's server) or a role server
            target = (target or server).lm(structured=True, temperature=0.0, **lm_kwargs)
        program.solver.set_lm(target)
        # each local role talks in its own model's wire format (its StructuredLM picks it)
        report = evaluate(program, examples, metric, num_threads=args.num_threads)
    source = args.file or f"{args.dataset} {args.split}"
    print(f"{source}: accuracy {report.accuracy:.1%} ({report.n_correct}/{report.n}, {report.n_errors} unparsed), 1 run")
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"per-question results: {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..infra.serving import ServerConfig
    from ..modules.compiled import serve_prompters

    serving, stop_requested = threading.Event(), threading.Event()

    def stop(signum, frame):
        # While the server starts, a Ctrl-C aborts the start (exit 130). Once the endpoint is
        # printed it only asks the loop below to stop: raising there could land between the
        # print and the loop (seen in CI: a Ctrl-C sent right after the line exited with 130).
        if stop_requested.is_set() or not serving.is_set():
            raise KeyboardInterrupt
        stop_requested.set()

    # "Ctrl-C stops the server" must hold even when SIGINT was ignored by whoever started us
    # (a background job of a script), and SIGTERM (systemd, docker stop) stops it the same way
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    program, manifest = _load_program(args.program)
    server = _start_server(ServerConfig(model=_base_model(manifest), host=args.host, port=args.port))
    with server, RoleServers(server) as servers:
        serve_prompters(program, server)
        names = sorted(server.adapters)
        target_model = _saved_role(manifest, "target")
        # the solver's own local model, when it ran on another one than the prompter's
        target = servers.get("target", target_model) if target_model != LOCAL and _is_local(target_model) else None
        serving.set()
        model = names[0] if names else server.served_model_name  # no adapter: the untrained prompter won
        print(f"serving on {server.api_base} (OpenAI-compatible)\n  base model: {server.served_model_name}\n"
              f"  prompter adapter(s): {', '.join(names) or 'none (the compile returned the untrained prompter)'}\n"
              f"  reward t*: {program.prompter.reward}\n"
              f"use it: dspy.LM('hosted_vllm/{model}', api_base='{server.api_base}', api_key='local')", flush=True)
        if target is not None and target is not server:
            print(f"target (solver) model: {target_model} on {target.api_base} as hosted_vllm/{target.served_model_name}")
        elif target_model != LOCAL:
            print(f"target (solver) model of the compile: {target_model} (an API model; not served here)")
        print("Ctrl-C stops the server.", flush=True)
        while all(s.running for s in servers.servers.values()) and not stop_requested.wait(1.0):
            pass
        if not stop_requested.is_set():
            raise UserError(f"the server stopped; see its log {server.log_path}")
    return 0


# --------------------------------------------------------------------------- parser


def _configure_logging(verbose: bool) -> None:
    """Log records above the compile's progress line (one console, ``infra/progress.py``):
    warnings of every library, and the teleprompter's INFO lines (each round's summary); with -v
    everything at INFO."""
    from rich.logging import RichHandler

    from ..infra.progress import OncePerMessage, console

    if console().is_terminal:
        handler: logging.Handler = RichHandler(console=console(), show_time=False, show_path=False, markup=False)
        fmt = "%(name)s: %(message)s"
    else:  # a log file: plain lines, never wrapped
        handler, fmt = logging.StreamHandler(), "%(levelname)s %(name)s: %(message)s"
    if not verbose:  # a warning DSPy repeats on every call appears once; other libraries' INFO is dropped
        handler.addFilter(OncePerMessage())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=fmt, handlers=[handler])
    logging.getLogger("trprompt_dspy.teleprompter").setLevel(logging.INFO)
    # DSPy logs through a handler of its own, which would write through the progress line
    dspy_logger = logging.getLogger("dspy")
    for own in list(dspy_logger.handlers):
        dspy_logger.removeHandler(own)
    dspy_logger.propagate = True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trprompt`` console script."""
    # --help and argument errors exit here, before the heavy imports below
    args = build_parser().parse_args(argv)

    summaries = logging.getLogger("trprompt_dspy.teleprompter")
    level_before = summaries.level  # restored at the end: main() may run inside a longer process
    _configure_logging(args.verbose)
    os.environ.setdefault("TEXTGRAD_DISABLE_LOGGING", "1")
    if not args.verbose:
        # textgrad sets its logger to INFO and logs every prompt it builds; the console gets
        # our progress bars and summaries instead
        logging.getLogger("textgrad").setLevel(logging.WARNING)
    try:
        _file_fields(args)  # column flags without --file: refused before anything starts
        # looked up at call time (not a table built at import): tests replace a command
        command = {"demo": _demo, "compile": _compile, "evaluate": _evaluate, "serve": _serve}[args.command_name]
        return command(args)
    except (TRPromptError, FileNotFoundError) as exc:
        # every library error is one line; -v also logs where it came from
        logger.debug("trprompt failed", exc_info=True)
        print(f"trprompt: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trprompt: interrupted (a compile resumes with --resume and the same --log-dir)", file=sys.stderr)
        return 130
    finally:
        summaries.setLevel(level_before)


if __name__ == "__main__":
    sys.exit(main())
