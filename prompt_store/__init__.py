"""prompt_store: the only code that reads and writes task prompts (soft prompts and prefixes).

    registry = PromptRegistry(ModelGeometry.from_config(model.config), "prompts/")
    registry.load_all()
    snapshot, created = registry.put("sentiment", safetensors_bytes)
    registry.get("sentiment").embeddings   # [n, hidden] or [n, num_layers*2*kv_dim]
"""

from prompt_store.errors import (
    AmbiguousKind,
    BodyTooLarge,
    ConfigMismatch,
    InvalidKind,
    InvalidTaskName,
    KindMismatch,
    MalformedFile,
    MissingTensor,
    NonFiniteValues,
    OutsidePromptDirectory,
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
from prompt_store.format import PromptFile, peft_adapter_config, read_peft_dir, read_prompt, write_prompt
from prompt_store.geometry import ModelGeometry
from prompt_store.registry import PromptDescriptor, PromptRegistry, PromptSnapshot
from prompt_store.validate import RegistryLimits

__all__ = [
    "AmbiguousKind",
    "BodyTooLarge",
    "ConfigMismatch",
    "InvalidKind",
    "InvalidTaskName",
    "KindMismatch",
    "MalformedFile",
    "MissingTensor",
    "ModelGeometry",
    "NonFiniteValues",
    "OutsidePromptDirectory",
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
