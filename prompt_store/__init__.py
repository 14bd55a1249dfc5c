"""prompt_store: the only code that reads and writes task prompts (soft prompts and prefixes).

    registry = PromptRegistry(ModelGeometry.from_config(model.config), "prompts/")
    registry.load_all()
    snapshot, created = registry.put("sentiment", safetensors_bytes)
    registry.get("sentiment").embeddings   # [n, hidden] or [n, num_layers*2*kv_dim]
"""

from typing import TYPE_CHECKING

from prompt_store.errors import (
    AmbiguousKind,
    BaseModelMismatch,
    BodyTooLarge,
    ConfigMismatch,
    InvalidChoices,
    InvalidDefaults,
    InvalidKind,
    InvalidTaskName,
    InvalidTemplate,
    KindMismatch,
    MalformedFile,
    MissingTensor,
    NonFiniteValues,
    OutsidePromptDirectory,
    PreconditionFailed,
    PromptError,
    StorageError,
    StorageFull,
    StorageUnavailable,
    UnknownTask,
    UnsupportedDtype,
    UnsupportedPeftType,
    UnsupportedSubmodules,
    VirtualTokenCountOutOfRange,
    WidthMismatch,
    WrongRank,
)
from prompt_store.geometry import ModelGeometry
from prompt_store.preconditions import ANY, Preconditions

if TYPE_CHECKING:
    from prompt_store.format import PromptFile, peft_adapter_config, read_peft_dir, read_prompt, write_prompt
    from prompt_store.registry import PromptDescriptor, PromptRegistry, PromptSnapshot
    from prompt_store.validate import RegistryLimits

# These need torch: imported on first use, so that `import prompt_store.dtypes` (settings, every
# `--help`) does not take seconds.
_LAZY = {
    "prompt_store.format": ("PromptFile", "peft_adapter_config", "read_peft_dir", "read_prompt", "write_prompt"),
    "prompt_store.registry": ("PromptDescriptor", "PromptRegistry", "PromptSnapshot"),
    "prompt_store.validate": ("RegistryLimits",),
}


def __getattr__(name: str) -> object:
    import importlib

    for module, names in _LAZY.items():
        if name in names:
            value = getattr(importlib.import_module(module), name)
            globals()[name] = value
            return value
    raise AttributeError(f"module 'prompt_store' has no attribute {name!r}")


__all__ = [
    "ANY",
    "AmbiguousKind",
    "BaseModelMismatch",
    "BodyTooLarge",
    "ConfigMismatch",
    "InvalidChoices",
    "InvalidDefaults",
    "InvalidKind",
    "InvalidTaskName",
    "InvalidTemplate",
    "KindMismatch",
    "MalformedFile",
    "MissingTensor",
    "ModelGeometry",
    "NonFiniteValues",
    "OutsidePromptDirectory",
    "PreconditionFailed",
    "Preconditions",
    "PromptDescriptor",
    "PromptError",
    "PromptFile",
    "PromptRegistry",
    "PromptSnapshot",
    "RegistryLimits",
    "StorageError",
    "StorageFull",
    "StorageUnavailable",
    "UnknownTask",
    "UnsupportedDtype",
    "UnsupportedPeftType",
    "UnsupportedSubmodules",
    "VirtualTokenCountOutOfRange",
    "WidthMismatch",
    "WrongRank",
    "peft_adapter_config",
    "read_peft_dir",
    "read_prompt",
    "write_prompt",
]
