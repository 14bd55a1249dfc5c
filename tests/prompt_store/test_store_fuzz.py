"""Hypothesis over the prompt file parser and the registry's upload path: truncated and malformed
headers, odd dtypes and shapes, NaN/Inf, huge declared sizes, random PEFT configs and metadata.
Whatever the bytes, the answer is a prompt or one of the store's own errors (never another
exception), memory stays proportional to the input, and what is accepted reads back the same."""

from __future__ import annotations

import json
import math
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prompt_store import PromptError, PromptRegistry
from prompt_store.format import read_prompt
from tests.prompt_store.conftest import TINY

pytestmark = pytest.mark.slow  # fuzzing: hypothesis

FLOAT_CODES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
ODD_CODES = ["F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "C64", "", "f32", "F32 "]
SPECIAL = [0.0, 1.0, -2.5, 1e30, -1e30, math.nan, math.inf, -math.inf, 65504.0, 1e-45]
CONFIG_KEYS = ["peft_type", "num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
               "num_transformer_submodules", "prefix_projection", "task_type", "base_model_name_or_path"]
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                | st.sampled_from(["PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "LORA", "CAUSAL_LM", ""]))


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A safetensors file that is mostly right, then damaged in one of many ways."""
    rows = draw(st.integers(0, 6))
    width = draw(st.sampled_from([64, 64, 128, 128, 32, 1, 0, 65]))
    code = draw(st.sampled_from(list(FLOAT_CODES)))
    dtype, size = FLOAT_CODES[code]
    values = draw(st.lists(st.floats(-10, 10), min_size=rows * width, max_size=rows * width))
    if values and draw(st.booleans()):  # one special value: NaN, an infinity, or one that overflows float16
        values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(SPECIAL))
    data = torch.tensor(values, dtype=torch.float32).to(dtype).reshape(rows, width).contiguous()
    body = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    entry: dict = {"dtype": code, "shape": [rows, width], "data_offsets": [0, len(body)]}
    header: dict = {draw(st.sampled_from(["prompt_embeddings"] * 4 + ["other"])): entry}
    metadata = draw(st.dictionaries(st.sampled_from(["kind", "version", "num_virtual_tokens", "task", "format"]),
                                    st.text(max_size=8) | st.integers(-3, 300).map(str), max_size=3))
    if metadata and draw(st.booleans()):
        header["__metadata__"] = metadata
    damage = draw(st.sampled_from(["none"] * 6 + ["dtype", "shape", "offsets", "huge", "metadata", "truncate",
                                   "length", "json", "flip"]))
    if damage == "dtype":
        entry["dtype"] = draw(st.sampled_from(ODD_CODES))
    elif damage == "shape":
        entry["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4) | st.just("2x2") | st.none())
    elif damage == "offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(-5, 2**64), max_size=3))
    elif damage == "huge":  # a declared size far beyond the bytes that follow
        entry["shape"] = [2**31, 2**31]
        entry["data_offsets"] = [0, 2**62 * size]
    elif damage == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), JSON_SCALARS, max_size=3) | JSON_SCALARS)
    raw_header = json.dumps(header).encode()
    if damage == "json":
        raw_header = draw(st.binary(max_size=64))
    blob = struct.pack("<Q", len(raw_header)) + raw_header + body
    if damage == "length":
        blob = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + blob[8:]
    elif damage == "truncate":
        blob = blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
    elif damage == "flip" and blob:
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([blob[at] ^ draw(st.integers(1, 255))]) + blob[at + 1:]
    return blob


configs = (st.none() | st.none() | st.none()
           | st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_SCALARS, max_size=6) | st.binary(max_size=40))


def _bounded(call, data: bytes):
    """Run call(); its Python allocations must stay proportional to the input, whatever the header declares."""
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(data) + (1 << 20), f"peak {peak} bytes for {len(data)} input bytes"
    return result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=safetensors_bytes())
def test_the_parser_answers_a_prompt_or_its_own_error(data):
    try:
        prompt = _bounded(lambda: read_prompt(data), data)
    except PromptError as exc:
        assert exc.message and exc.param
        event(type(exc).__name__)  # pytest --hypothesis-show-statistics shows what was refused, and why
        return
    event("accepted")
    assert prompt.embeddings.dim() == 2 and prompt.embeddings.nbytes <= len(data)


_DIRECTORY = Path(tempfile.mkdtemp(prefix="promptswap-fuzz-"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=safetensors_bytes(), config=configs, kind=st.none() | st.sampled_from(["prompt", "prefix", "lora", ""]))
def test_an_upload_is_stored_whole_or_refused_with_a_store_error(data, config, kind):
    registry = PromptRegistry(TINY, _DIRECTORY)
    try:
        snap, _ = _bounded(lambda: registry.put("fuzzed", data, kind=kind, config=config), data)
    except PromptError as exc:
        assert exc.message and exc.param in ("weights", "config", "kind", "task")
        event(type(exc).__name__)
        return
    event(f"stored {snap.kind}")
    assert torch.isfinite(snap.embeddings).all()  # NaN/Inf never get in
    assert snap.embeddings.shape == (snap.num_virtual_tokens, 64 if snap.kind == "prompt" else 128)
    reread = PromptRegistry(TINY, _DIRECTORY)
    reread.load_all()
    assert reread.get("fuzzed").sha256 == snap.sha256 and reread.get("fuzzed").kind == snap.kind
