"""What `promptswap serve` checks before the model loads, so a mistake costs a second, not minutes.

Each check raises StartupError with one line that names the cause and the fix: the prompt directory
is writable, the port can be bound (the bound socket is handed to uvicorn, so nothing can take it
meanwhile), and the model can be found (a local path exists, a hub id is cached or the hub answers)
and is of an architecture promptswap serves (read from its config, without its weights).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from server.config import Settings


class StartupError(Exception):
    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}; {fix}")


def check_readable_prompt_dir(directory: Path) -> None:
    """With --read-only-prompts: the directory exists and can be listed (nothing is written to it)."""
    if not directory.is_dir() or not os.access(directory, os.R_OK | os.X_OK):
        raise StartupError(f"the prompt directory {directory} does not exist or cannot be read",
                           "give --prompt-dir a readable directory of prompt files")


def check_prompt_dir(directory: Path) -> list[Path]:
    """The directory exists (made if missing) and a file can be written in it. Returns the directories it
    made, deepest first: a start that fails gives them to `remove_if_empty`."""
    fix = (f"make it writable by this user (uid {os.getuid()}), e.g. `chown {os.getuid()} {directory}`, "
           "or choose another with --prompt-dir")
    made = []
    for parent in (directory, *directory.parents):
        if parent.exists() or parent.is_symlink():
            break
        made.append(parent)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".promptswap-write-check-"):
            pass
    except OSError as exc:
        remove_if_empty(made)
        raise StartupError(f"the prompt directory {directory} is not writable ({exc.strerror or exc})", fix) from None
    return made


def remove_if_empty(made: Iterable[Path]) -> None:
    """Take back the directories a failed start made (deepest first), each only while it is empty: a failed
    start leaves no empty prompt directory behind, and a directory that holds a file is never removed."""
    for directory in made:
        try:
            directory.rmdir()  # refused for a directory that is not empty
        except FileNotFoundError:
            continue
        except OSError:
            return  # not empty: neither are the directories above it


def check_object_store_client() -> None:
    """boto3 is installed (the store itself may be down: then the server starts and /ready waits for it)."""
    import importlib.util

    if importlib.util.find_spec("boto3") is None:
        raise StartupError("--prompt-store s3://... needs boto3, which is not installed",
                           'install the extra: pip install "promptswap[s3]"')


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound as uvicorn binds (IPv6 for an address with a colon), or
    StartupError if the address is taken or not this machine's. Listening at once, so a second server
    started meanwhile fails here too, not after loading its model."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                           "stop what uses that port, or choose another with --port (and --host)") from None
    return sock


def check_model(settings: Settings) -> None:
    """The configured model can be found and is served (the demos need no check)."""
    if settings.demo:
        return
    gguf = settings.gguf_path()
    if gguf is not None:
        if not gguf.is_file():
            raise StartupError(f"the GGUF file {gguf} does not exist", "pass the path of an existing .gguf file")
        return  # its architecture is known once it is converted
    model = settings.model
    assert model is not None  # not a demo
    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file():
            raise StartupError(f"the model directory {path} has no config.json",
                               "pass a directory saved with save_pretrained(), or a hub id")
        source = str(path)
    elif _looks_like_a_path(model):
        tilde = " (a ~ in PROMPTSWAP_MODEL is not expanded: give the full path)" if model.startswith("~") else ""
        raise StartupError(f"the model directory {model} does not exist{tilde}",
                           "pass an existing directory, or a hub id such as HuggingFaceTB/SmolLM2-135M")
    else:
        _check_hub_id(model)
        source = model
    from server.engine.errors import ModelNotSupported
    from server.model.model_loader import check_architecture

    try:
        check_architecture(source)
    except ModelNotSupported as exc:
        raise StartupError(str(exc), "choose a decoder-only causal LM such as Llama, Mistral, Qwen2, Gemma or "
                                     "GPT-2") from None
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read the config of {model} ({exc})", "check the model's files") from None


def _looks_like_a_path(model: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (./x, /x, ~/x, a/b/c, x.gguf) is a path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf")


def _check_hub_id(model: str) -> None:
    """Cached, or the hub answers for it: otherwise loading would retry for a long time and then fail."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    with contextlib.suppress(Exception):
        if isinstance(huggingface_hub.try_to_load_from_cache(model, "config.json"), str):
            return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise StartupError(f"{model} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                           "download it once with network access, or pass a local directory")
    try:
        huggingface_hub.HfApi().model_info(model, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise StartupError(f"the Hugging Face hub has no model {model} that this machine may read "
                           f"({type(exc).__name__})", "check the id, or log in (HF_TOKEN) for a gated model") from None
    except Exception as exc:  # network errors come in many classes (DNS, TLS, proxy, timeout)
        raise StartupError(f"cannot reach the Hugging Face hub to download {model} ({exc})",
                           "check the network or proxy, or pass a local directory with the model") from None
