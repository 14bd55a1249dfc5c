"""The server's log lines: one format for every logger (ours, uvicorn's, the libraries'), as text or JSON.

    2026-11-29T14:03:07.123Z INFO promptswap.requests: request ok request_id=3f2a... task=sentiment ...
    {"time": "2026-11-29T14:03:07.123Z", "level": "INFO", "logger": "promptswap.requests", ...}

A record's `fields` (a dict, see server/api/request_log.py) become `key=value` pairs or JSON keys.
Progress bars (model downloads, loading, GGUF conversion) are turned off and Python warnings go through
the same handler: a line of neither format would break a JSON log's one-object-per-line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from server.config import LogFormat


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in _fields(record).items())
        if pairs:
            line = f"{line} {pairs}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _timestamp(record), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage(), **_fields(record)}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _text_value(value: object) -> str:
    """A field's value on a text line: quoted and escaped (JSON) unless it is plain printable text."""
    text = "-" if value is None else str(value)
    plain = text and text.isprintable() and not any(c.isspace() or c in "\"=" for c in text)
    return text if plain else json.dumps(text)


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Send every logger through one handler on stderr, in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # through the root handler, not their own
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)  # warnings.warn (torch's, transformers') as log records, not bare stderr text
    quiet_progress_bars()
    quiet_optional_libraries()
    adopt_library_loggers()


# Once installed (--quantize no longer needs it), torchao is imported by transformers' own import, and it
# logs warnings no user can act on: its CUDA kernels that a CPU-only torch cannot load, no triton, and torch's
# deprecation of how it registers two enums (through torch's own handler, in torch's format: a JSON log would
# get a line that is not JSON). Errors still pass.
OPTIONAL_LIBRARY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_optional_libraries() -> None:
    """Only errors from the loggers above; set before they are imported (torch keeps a child logger's level)."""
    for name in OPTIONAL_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_progress_bars() -> None:
    """No tqdm bars from huggingface_hub, transformers or plain tqdm (downloads, loading weights, GGUF conversion).

    Set before any of them is imported: transformers takes its setting from huggingface_hub's at import,
    and tqdm reads TQDM_* variables when it is imported. transformers' GGUF reader uses plain tqdm
    ("Converting and de-quantizing GGUF tensors"), which only TQDM_DISABLE reaches.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    import sys

    if "huggingface_hub" in sys.modules:  # already imported (a test process): tell it directly
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def adopt_library_loggers() -> None:
    """transformers logs through a handler of its own (`[transformers] message`, not propagated): through ours.

    Called again once transformers is imported (`promptswap serve` imports it after the startup checks).
    """
    import sys

    if "transformers" in sys.modules:
        hf_logging = sys.modules["transformers"].utils.logging
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
