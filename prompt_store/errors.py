"""Why a prompt was refused. One class per failure, so callers (HTTP, CLI, tests) can tell them apart.

Every message names the expected and the actual value. `param` is the request field at fault
("task", "weights", "kind", "config"), so the HTTP layer can point the client at it.
prompt_store knows no HTTP: the service maps each class to a status in `server/api/errors.py`.
"""

from __future__ import annotations

import errno


class PromptError(ValueError):
    """Base of every refusal of a prompt or task name."""

    default_param: str | None = "weights"

    def __init__(
        self, message: str, *, param: str | None = None, expected: object = None, actual: object = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param if param is not None else self.default_param
        self.expected = expected
        self.actual = actual

    def __str__(self) -> str:
        return self.message


class InvalidTaskName(PromptError):
    """The task name is not `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$` or contains `..`."""

    default_param = "task"


class UnknownTask(PromptError, LookupError):
    """get/delete/describe of a task the registry does not serve."""

    default_param = "task"


class OutsidePromptDirectory(PromptError):
    """A file in the prompt directory is a symbolic link to a place outside it: never served."""

    default_param = "task"


class BodyTooLarge(PromptError):
    """The upload (or file) is larger than `RegistryLimits.max_bytes`."""



class MalformedFile(PromptError):
    """Not a readable safetensors file / PEFT adapter: truncated, bad header, bad JSON."""


class MissingTensor(PromptError):
    """The file has no `prompt_embeddings` tensor."""


class WrongRank(PromptError):
    """`prompt_embeddings` is not 2-D."""


class UnsupportedDtype(PromptError):
    """`prompt_embeddings` is not float16, bfloat16 or float32."""


class WidthMismatch(PromptError):
    """The tensor's width is not hidden_size (prompt) or num_layers*2*kv_dim (prefix) of the base model."""


class VirtualTokenCountOutOfRange(PromptError):
    """The number of virtual tokens (rows) is outside 1..max_virtual_tokens."""


class NonFiniteValues(PromptError):
    """A NaN or infinity, possibly produced by converting to the served dtype."""


class UnsupportedSubmodules(PromptError):
    """PEFT num_transformer_submodules != 1: an encoder-decoder adapter, which is not served."""

    default_param = "config"


class UnsupportedPeftType(PromptError):
    """A PEFT method other than PROMPT_TUNING, P_TUNING or PREFIX_TUNING (LoRA, ...)."""

    default_param = "config"


class BaseModelMismatch(PromptError):
    """The adapter records a base model (base_model_name_or_path) that is plainly not the one served;
    refused only with strict base-model checking, otherwise stored with a warning."""

    default_param = "config"


class ConfigMismatch(PromptError):
    """The PEFT config (or the file's own metadata) disagrees with the tensor or the base model."""

    default_param = "config"


class InvalidKind(PromptError):
    """A kind other than "prompt" or "prefix"."""

    default_param = "kind"


class KindMismatch(PromptError):
    """An explicit kind contradicts the file's metadata or its PEFT config."""

    default_param = "kind"


class AmbiguousKind(PromptError):
    """No metadata, no argument, and the shape fits both kinds: the caller must say which."""

    default_param = "kind"


class InvalidTemplate(PromptError):
    """A task's text template without `{text}` exactly once (or too long)."""

    default_param = "template"


class InvalidChoices(PromptError):
    """A task's stored choices are not 1..32 distinct non-empty strings."""

    default_param = "choices"


class InvalidDefaults(PromptError):
    """A task's generation defaults are not sampling parameters in their ranges."""

    default_param = "defaults"


class StorageError(Exception):
    """The prompt was fine but the prompt store (directory or object store) could not be changed or read.
    Nothing was changed here: the registry still serves what it served before. Not a PromptError: the
    client's upload is not at fault."""

    param = "task"

    def __init__(self, message: str, *, cause: Exception) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause

    def __str__(self) -> str:
        return self.message


class StorageFull(StorageError):
    """The prompt directory's filesystem has no space (or quota) left. A delete still works."""


class StorageUnavailable(StorageError):
    """The prompt directory is read-only, not writable (permissions, an immutable directory) or failing;
    or the object store cannot be reached, refuses access, or kept changing under a write."""


_FULL = {errno.ENOSPC, errno.EDQUOT}
_REASONS = {
    errno.ENOSPC: "is full",
    errno.EDQUOT: "is over its disk quota",
    errno.EROFS: "is on a read-only filesystem",
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted; an immutable directory?)",
}


def storage_error(exc: OSError, *, action: str, task: str, directory: object) -> StorageError:
    """The one translation of an OSError from the prompt directory into what callers are told."""
    reason = _REASONS.get(exc.errno or 0, "is unavailable")
    message = f"could not {action} task {task!r}: the prompt directory {directory} {reason} ({exc.strerror or exc})"
    if exc.errno in _FULL:
        return StorageFull(message + "; delete tasks or free space", cause=exc)
    return StorageUnavailable(message, cause=exc)


class PreconditionFailed(PromptError):
    """A conditional write (If-Match / If-None-Match) whose condition does not hold: nothing was written.
    `current_version` is the task's version now (None: no such task)."""

    default_param = "If-Match"

    def __init__(self, message: str, *, param: str, current_version: int | None) -> None:
        super().__init__(message, param=param, expected="the condition to hold", actual=current_version)
        self.current_version = current_version
