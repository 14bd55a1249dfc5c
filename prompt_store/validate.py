"""What makes a prompt servable: task names, PEFT configs, kind, shape and values against a base model.

Nothing here touches the disk. `check_prompt` turns a PromptFile into a CheckedPrompt or raises the
one PromptError that says what is wrong, with the expected and the actual value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from prompt_store.dtypes import dtype_name, served_dtypes
from prompt_store.errors import (
    AmbiguousKind,
    BaseModelMismatch,
    ConfigMismatch,
    InvalidKind,
    InvalidTaskName,
    KindMismatch,
    MalformedFile,
    NonFiniteValues,
    UnsupportedPeftType,
    UnsupportedSubmodules,
    VirtualTokenCountOutOfRange,
    WidthMismatch,
)
from prompt_store.format import TENSOR_NAME, PromptFile, load_config
from prompt_store.geometry import KINDS, Kind, ModelGeometry
from prompt_store.template import check_system, check_template, parse_choices, parse_defaults

SERVED_DTYPES = served_dtypes()
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# PEFT method -> the kind promptswap serves it as (P-tuning's encoder is applied before saving).
PEFT_KINDS: dict[str, Kind] = {"PROMPT_TUNING": "prompt", "P_TUNING": "prompt", "PREFIX_TUNING": "prefix"}


@dataclass(frozen=True, slots=True)
class RegistryLimits:
    max_virtual_tokens: int = 256
    max_bytes: int = 64 * 2**20  # of one upload or file

    def __post_init__(self) -> None:
        for name in ("max_virtual_tokens", "max_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"RegistryLimits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, slots=True)
class PeftInfo:
    """The fields of a PEFT adapter_config.json that decide how its tensor is read."""

    peft_type: str
    kind: Kind
    num_virtual_tokens: int
    token_dim: int | None
    num_layers: int | None
    num_attention_heads: int | None
    base_model: str | None


@dataclass(frozen=True, slots=True)
class CheckedPrompt:
    kind: Kind | None  # None only when checked without a base model and nothing says which
    num_virtual_tokens: int
    embeddings: torch.Tensor = field(repr=False)  # [n, width], a private copy in the served dtype, finite
    stored: torch.Tensor = field(repr=False)  # [n, width] as read, in its own dtype: what the file keeps
    base_model: str | None
    description: str | None
    source: Literal["file", "peft"]
    template: str | None = None  # the text template it was trained with (template.py)
    choices: tuple[str, ...] | None = None  # the answers it was trained to give
    defaults: dict | None = None  # generation defaults (sampling parameters) its requests start from
    system: str | None = None  # the chat system message its conversations get when they bring none

    @property
    def served_kind(self) -> Kind:
        """The kind, which checking against a base model always decides."""
        assert self.kind is not None, "a prompt checked against a base model always has a kind"
        return self.kind


def check_task_name(task: object) -> str:
    if not isinstance(task, str) or not TASK_NAME_RE.fullmatch(task) or ".." in task:
        raise InvalidTaskName(
            f"task name must match {TASK_NAME_RE.pattern} and not contain '..', got {task!r}",
            expected=TASK_NAME_RE.pattern, actual=task,
        )
    return task


def check_kind(kind: object, param: str = "kind") -> Kind | None:
    if kind is None or kind in KINDS:
        return kind
    raise InvalidKind(f"kind must be 'prompt' or 'prefix', got {kind!r}", param=param, expected=KINDS, actual=kind)


def parse_peft_config(config: Mapping | bytes | str) -> PeftInfo:
    """Read the PEFT fields promptswap relies on, refusing methods and layouts it cannot serve."""
    cfg = load_config(config)
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise MalformedFile(
            "the PEFT config has no peft_type", param="config", expected="peft_type", actual=sorted(cfg)[:10]
        )
    if peft_type not in PEFT_KINDS:
        raise UnsupportedPeftType(
            f"peft_type must be one of {', '.join(PEFT_KINDS)}, got {peft_type!r}",
            expected=list(PEFT_KINDS), actual=peft_type,
        )
    submodules = _config_int(cfg, "num_transformer_submodules")
    if submodules is None:  # PEFT's own default (peft_model.py): 2 for encoder-decoder, else 1
        submodules = 2 if cfg.get("task_type") == "SEQ_2_SEQ_LM" else 1
    if submodules != 1:
        raise UnsupportedSubmodules(
            f"num_transformer_submodules must be 1 (decoder-only), got {submodules}: "
            "encoder-decoder adapters are not served",
            expected=1, actual=submodules,
        )
    n = _config_int(cfg, "num_virtual_tokens")
    if n is None:
        raise MalformedFile(
            "the PEFT config has no num_virtual_tokens", param="config", expected="an int", actual=None
        )
    base = cfg.get("base_model_name_or_path")
    return PeftInfo(
        peft_type=peft_type,
        kind=PEFT_KINDS[peft_type],
        num_virtual_tokens=n,
        token_dim=_config_int(cfg, "token_dim"),
        num_layers=_config_int(cfg, "num_layers"),
        num_attention_heads=_config_int(cfg, "num_attention_heads"),
        base_model=base if isinstance(base, str) else None,
    )


def _config_int(cfg: Mapping, name: str) -> int | None:
    value = cfg.get(name)
    if value is None or (type(value) is int and value >= 0):
        return value
    raise MalformedFile(
        f"PEFT config field {name} must be a non-negative int, got {value!r}",
        param="config", expected="int", actual=value,
    )


def check_prompt(
    source: PromptFile,
    *,
    geometry: ModelGeometry | None,
    limits: RegistryLimits,
    dtype: torch.dtype = torch.float32,
    kind: str | None = None,
    config: Mapping | bytes | str | None = None,
) -> CheckedPrompt:
    """Everything a prompt must satisfy to be served, in the order the causes are easiest to read.

    Without `geometry` the checks that need a base model (width, kind from shape) are skipped.
    """
    tensor = source.embeddings
    n, width = tensor.shape
    cfg = config if config is not None else source.config
    peft = parse_peft_config(cfg) if cfg is not None else None
    if peft is not None:
        _check_config_against_tensor(peft, n, width)
    resolved = _resolve_kind(source.metadata, check_kind(kind), peft, n, width, geometry)
    meta_n = source.metadata.get("num_virtual_tokens")
    if meta_n is not None and meta_n != str(n):
        raise ConfigMismatch(
            f"file metadata says num_virtual_tokens={meta_n} but {TENSOR_NAME} has {n} rows",
            param="weights", expected=n, actual=meta_n,
        )
    if not 1 <= n <= limits.max_virtual_tokens:
        raise VirtualTokenCountOutOfRange(
            f"num_virtual_tokens must be in 1..{limits.max_virtual_tokens}, got {n}",
            expected=f"1..{limits.max_virtual_tokens}", actual=n,
        )
    if geometry is not None and resolved is not None:
        _check_geometry(resolved, width, peft, geometry)
    served = tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    _check_finite(tensor, served, dtype)
    source_kind = source.metadata.get("source")
    return CheckedPrompt(
        kind=resolved,
        num_virtual_tokens=n,
        embeddings=served,
        stored=tensor.detach().cpu(),
        base_model=(peft.base_model if peft else None) or source.metadata.get("base_model"),
        description=source.metadata.get("description"),
        source="peft" if peft is not None or source_kind == "peft" else "file",
        template=check_template(source.metadata["template"]) if "template" in source.metadata else None,
        choices=parse_choices(source.metadata["choices"]) if "choices" in source.metadata else None,
        defaults=parse_defaults(source.metadata["defaults"]) if "defaults" in source.metadata else None,
        system=check_system(source.metadata["system"]) if "system" in source.metadata else None,
    )


def _check_config_against_tensor(peft: PeftInfo, n: int, width: int) -> None:
    if peft.num_virtual_tokens != n:
        raise ConfigMismatch(
            f"PEFT config num_virtual_tokens={peft.num_virtual_tokens} but {TENSOR_NAME} has {n} rows",
            expected=n, actual=peft.num_virtual_tokens,
        )
    if peft.token_dim is None:
        return
    if peft.kind == "prompt" and peft.token_dim != width:
        raise ConfigMismatch(
            f"PEFT config token_dim={peft.token_dim} but {TENSOR_NAME} is {width} wide",
            expected=width, actual=peft.token_dim,
        )
    if peft.kind == "prefix" and peft.num_layers is not None and peft.num_layers * 2 * peft.token_dim != width:
        described = peft.num_layers * 2 * peft.token_dim
        raise ConfigMismatch(
            f"PEFT config num_layers={peft.num_layers}, token_dim={peft.token_dim} describe a width of "
            f"num_layers*2*token_dim={described}, but {TENSOR_NAME} is {width} wide",
            expected=width, actual=described,
        )


def _resolve_kind(
    metadata: Mapping[str, str],
    explicit: Kind | None,
    peft: PeftInfo | None,
    n: int,
    width: int,
    geometry: ModelGeometry | None,
) -> Kind | None:
    """Kind from the file's metadata or PEFT config, else the caller, else an unambiguous shape."""
    declared = check_kind(metadata.get("kind"), param="weights")
    if declared is not None and peft is not None and declared != peft.kind:
        raise KindMismatch(
            f"file metadata says kind {declared!r} but the PEFT config ({peft.peft_type}) means {peft.kind!r}",
            param="config", expected=peft.kind, actual=declared,
        )
    declared = declared or (peft.kind if peft else None)
    if explicit is not None and declared is not None and explicit != declared:
        where = f"PEFT config ({peft.peft_type})" if peft else "file metadata"
        raise KindMismatch(
            f"kind {explicit!r} was given but the {where} says {declared!r}", expected=declared, actual=explicit
        )
    resolved = declared or explicit
    if resolved is not None or geometry is None:
        return resolved
    fits = [k for k in KINDS if geometry.width_for(k) == width]
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise AmbiguousKind(
            f"{TENSOR_NAME} [{n}, {width}] fits both a prompt (hidden_size={geometry.hidden_size}) and a "
            f"prefix (num_layers*2*kv_dim={geometry.prefix_width}); say kind='prompt' or kind='prefix'",
            expected="kind", actual=None,
        )
    raise WidthMismatch(
        f"{TENSOR_NAME} is {width} wide, but the base model takes {geometry.hidden_size} (prompt: hidden_size) "
        f"or {geometry.prefix_width} (prefix: num_layers*2*kv_dim)",
        expected=[geometry.hidden_size, geometry.prefix_width], actual=width,
    )


def _check_geometry(kind: Kind, width: int, peft: PeftInfo | None, geometry: ModelGeometry) -> None:
    expected = geometry.width_for(kind)
    if width != expected:
        what = (
            f"hidden_size={geometry.hidden_size}"
            if kind == "prompt"
            else f"num_layers*2*kv_dim = {geometry.num_layers}*2*{geometry.kv_dim} = {expected}"
        )
        raise WidthMismatch(
            f"a {kind} for this base model must be {expected} wide ({what}), but {TENSOR_NAME} is {width} wide",
            expected=expected, actual=width,
        )
    if kind != "prefix" or peft is None:
        return
    # The width can match while the split differs (4 layers x 16 vs 2 layers x 32): the config must
    # describe this model's layers and key/value heads, or the prefix would be cut wrongly.
    for name, actual, want in (
        ("num_layers", peft.num_layers, geometry.num_layers),
        ("token_dim", peft.token_dim, geometry.kv_dim),
        ("num_attention_heads", peft.num_attention_heads, geometry.num_kv_heads),
    ):
        if actual is not None and actual != want:
            raise ConfigMismatch(
                f"PEFT config {name}={actual} but the base model has {name}={want} for a prefix",
                expected=want, actual=actual,
            )


def _check_finite(original: torch.Tensor, served: torch.Tensor, dtype: torch.dtype) -> None:
    bad = ~torch.isfinite(served)
    if not bad.any():
        return
    count = int(bad.sum())
    row, col = (int(i) for i in bad.nonzero()[0])
    overflow = bool(torch.isfinite(original[row, col]))
    why = f" (the value {float(original[row, col])!r} overflows {dtype_name(dtype)})" if overflow else ""
    raise NonFiniteValues(
        f"{TENSOR_NAME} must be finite in {dtype_name(dtype)}, but {count} value(s) are not; "
        f"first at row {row}, column {col}{why}",
        expected="all finite", actual=f"{count} non-finite",
    )


def model_key(name: str) -> str:
    """What names a model for the base-model check: the last path or hub-id component, lowercased."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def base_model_mismatch(recorded: str | None, served_names: frozenset[str]) -> BaseModelMismatch | None:
    """The refusal (or warning) for an adapter recorded for another model; None when it fits or says nothing.

    `served_names` are model_key()s of every name the served model goes by (served name, hub id, path,
    its config's own name); an empty set means the registry was not told, and nothing is checked.
    """
    if not recorded or not served_names or model_key(recorded) in served_names:
        return None
    return BaseModelMismatch(
        f"the adapter was made for base model {recorded!r}, but this server serves "
        f"{' / '.join(sorted(served_names))}; its output would not mean what it was trained to",
        expected=sorted(served_names), actual=recorded,
    )
