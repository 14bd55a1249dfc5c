"""Every validation rule: the bad input, the error type, and a message naming expected and actual."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch

from prompt_store import (
    AmbiguousKind,
    BodyTooLarge,
    ConfigMismatch,
    InvalidKind,
    InvalidTaskName,
    KindMismatch,
    MalformedFile,
    MissingTensor,
    ModelGeometry,
    NonFiniteValues,
    PromptError,
    PromptRegistry,
    RegistryLimits,
    UnsupportedDtype,
    UnsupportedPeftType,
    UnsupportedSubmodules,
    VirtualTokenCountOutOfRange,
    WidthMismatch,
    WrongRank,
)


@pytest.fixture
def registry(tiny_geometry):
    return PromptRegistry(tiny_geometry, limits=RegistryLimits(max_virtual_tokens=16, max_bytes=1 << 16))


def raises(exc_type, *fragments, param=None):
    """pytest.raises that also checks the message names each fragment and the error's param."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(exc_type)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self._ctx.__exit__(*exc)
            err = self.info.value
            assert isinstance(err, PromptError) and isinstance(err, ValueError)
            for fragment in fragments:
                assert str(fragment) in err.message, (fragment, err.message)
            if param is not None:
                assert err.param == param, (err.param, param)
            return suppressed

    return _Check()


# -- task names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "a" * 65, "a..b", "a/b", "a b", "é", "a\n", None, 3])
def test_invalid_task_names(registry, make_file, name):
    with raises(InvalidTaskName, "^[A-Za-z0-9]", repr(name), param="task"):
        registry.put(name, make_file(torch.randn(2, 64)))


@pytest.mark.parametrize("name", ["a", "a" * 64, "Sentiment_v2.1-final", "0"])
def test_valid_task_names(registry, make_file, name):
    snap, created = registry.put(name, make_file(torch.randn(2, 64)))
    assert created and snap.task == name and name in registry


# -- size and structure ------------------------------------------------------------------------


def test_body_too_large(registry, make_file):
    data = make_file(torch.randn(16, 64)) + b""
    small = PromptRegistry(registry.geometry, limits=RegistryLimits(max_bytes=len(data) - 1))
    with raises(BodyTooLarge, str(len(data)), str(len(data) - 1), param="weights") as info:
        small.put("t", data)
    assert info.value.expected == len(data) - 1  # its HTTP status (413) is tests/api/test_errors.py's


def _with_header(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (b"", ["at least 8 bytes", "got 0"]),
        (b"\x01\x02", ["at least 8 bytes", "got 2"]),
        (struct.pack("<Q", 1000) + b"{}", ["says 1000 bytes", "2 bytes follow"]),
        (struct.pack("<Q", 0), ["says 0 bytes"]),
        (struct.pack("<Q", 4) + b"{{{{", ["not valid UTF-8 JSON"]),
        (struct.pack("<Q", 2) + b"\xff\xfe", ["not valid UTF-8 JSON"]),
        (_with_header([1, 2]), ["JSON object", "list"]),  # type: ignore[arg-type]
        (_with_header({"__metadata__": {"kind": 1}}), ["strings to strings"]),
        (_with_header({"prompt_embeddings": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}),
         ["data_offsets", "within the 0 data bytes"]),
        (_with_header({"prompt_embeddings": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
         ["needs 16 bytes", "span 8"]),
        (_with_header({"prompt_embeddings": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}}),
         ["non-negative ints"]),
        (_with_header({"prompt_embeddings": "nope"}), ["not an object"]),
    ],
)
def test_malformed_headers(registry, data, fragments):
    with raises(MalformedFile, *fragments, param="weights"):
        registry.put("t", data)


def test_truncated_file_is_malformed(registry, make_file):
    data = make_file(torch.randn(4, 64))
    for cut in (1, 100, len(data) - 9):
        with raises(MalformedFile, param="weights"):
            registry.put("t", data[: len(data) - cut])
    assert "t" not in registry


def test_trailing_bytes_not_covered_by_tensors(registry, make_file):
    # The offsets pass our header check; safetensors itself refuses a body its tensors do not cover.
    with raises(MalformedFile, "safetensors could not read"):
        registry.put("t", make_file(torch.randn(4, 64)) + b"junk")


def test_missing_tensor(registry):
    from safetensors.torch import save

    with raises(MissingTensor, "prompt_embeddings", "'lora_A'", param="weights"):
        registry.put("t", save({"lora_A": torch.randn(2, 64)}))
    with raises(MissingTensor, "prompt_embeddings", "no tensors"):
        registry.put("t", save({}))


@pytest.mark.parametrize("shape", [(64,), (1, 4, 64), ()])
def test_wrong_rank(registry, make_file, shape):
    with raises(WrongRank, "2-D", f"{len(shape)}-D", str(list(shape)), param="weights"):
        registry.put("t", make_file(torch.randn(shape)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool])
def test_unsupported_dtype(registry, make_file, dtype):
    tensor = torch.zeros(2, 64, dtype=dtype)
    with raises(UnsupportedDtype, "float16, bfloat16 or float32", str(dtype).removeprefix("torch."), param="weights"):
        registry.put("t", make_file(tensor))


def test_unsupported_dtype_in_legacy_bin(registry, tmp_path):
    torch.save({"prompt_embeddings": torch.zeros(2, 64, dtype=torch.float64)}, tmp_path / "w.bin")
    with raises(UnsupportedDtype, "float64"):
        registry.put_path("t", tmp_path / "w.bin")


def test_legacy_bin_garbage_and_non_dict(registry, tmp_path):
    (tmp_path / "g.bin").write_bytes(b"not a pickle at all")
    with raises(MalformedFile, "adapter_model.bin could not be read"):
        registry.put_path("t", tmp_path / "g.bin")
    torch.save([torch.zeros(2, 64)], tmp_path / "l.bin")
    with raises(MalformedFile, "state dict", "list"):
        registry.put_path("t", tmp_path / "l.bin")
    torch.save({"other": torch.zeros(2, 64)}, tmp_path / "o.bin")
    with raises(MissingTensor, "prompt_embeddings", "'other'"):
        registry.put_path("t", tmp_path / "o.bin")


def test_legacy_bin_refuses_code(registry, tmp_path):
    # weights_only=True: a pickle that would run code on load is refused, not executed.
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"prompt_embeddings": Evil()}, buf, _use_new_zipfile_serialization=True)
    (tmp_path / "e.bin").write_bytes(buf.getvalue())
    with raises(MalformedFile, "could not be read"):
        registry.put_path("t", tmp_path / "e.bin")


# -- shape against the base model --------------------------------------------------------------


def test_prompt_width_mismatch(registry, make_file):
    with raises(WidthMismatch, "64 wide", "hidden_size=64", "63 wide", param="weights") as info:
        registry.put("t", make_file(torch.randn(3, 63)), kind="prompt")
    assert (info.value.expected, info.value.actual) == (64, 63)


def test_prefix_width_mismatch(registry, make_file):
    with raises(WidthMismatch, "128 wide", "2*2*32", "64 wide"):
        registry.put("t", make_file(torch.randn(3, 64)), kind="prefix")


def test_width_fitting_neither_kind(registry, make_file):
    with raises(WidthMismatch, "100 wide", "64 (prompt", "128 (prefix"):
        registry.put("t", make_file(torch.randn(3, 100)))


def test_kind_inferred_from_an_unambiguous_shape(registry, make_file):
    assert registry.put("p", make_file(torch.randn(3, 64)))[0].kind == "prompt"
    assert registry.put("x", make_file(torch.randn(3, 128)))[0].kind == "prefix"


def test_ambiguous_kind(make_file):
    # 1 layer * 2 * (2 heads * 16) = 64 = hidden_size: the shape fits both kinds.
    geometry = ModelGeometry(hidden_size=64, num_layers=1, num_kv_heads=2, head_dim=16)
    registry = PromptRegistry(geometry)
    with raises(AmbiguousKind, "fits both", "kind='prompt'", param="kind"):
        registry.put("t", make_file(torch.randn(3, 64)))
    assert registry.put("t", make_file(torch.randn(3, 64)), kind="prefix")[0].kind == "prefix"
    assert registry.put("u", make_file(torch.randn(3, 64), kind="prompt"))[0].kind == "prompt"


@pytest.mark.parametrize("n", [0, 17, 100])
def test_virtual_token_count_out_of_range(registry, make_file, n):
    with raises(VirtualTokenCountOutOfRange, "1..16", f"got {n}", param="weights"):
        registry.put("t", make_file(torch.randn(n, 64)), kind="prompt")


def test_virtual_token_count_at_the_limits(registry, make_file):
    assert registry.put("one", make_file(torch.randn(1, 64)))[0].num_virtual_tokens == 1
    assert registry.put("max", make_file(torch.randn(16, 64)))[0].num_virtual_tokens == 16


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(registry, make_file, bad):
    tensor = torch.randn(3, 64)
    tensor[1, 5] = bad
    with raises(NonFiniteValues, "1 value(s)", "row 1, column 5", "float32"):
        registry.put("t", make_file(tensor))


def test_values_that_overflow_the_served_dtype(tiny_geometry, make_file):
    registry = PromptRegistry(tiny_geometry, dtype=torch.float16)
    tensor = torch.randn(3, 64)
    tensor[2, 0] = 1e6  # finite in float32, inf in float16
    with raises(NonFiniteValues, "float16", "row 2, column 0", "overflows"):
        registry.put("t", make_file(tensor))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("served", [torch.float16, torch.bfloat16, torch.float32])
def test_accepted_dtypes_are_converted(tiny_geometry, make_file, stored, served):
    tensor = torch.randn(3, 64).to(stored)
    snap, _ = PromptRegistry(tiny_geometry, dtype=served).put("t", make_file(tensor))
    assert snap.embeddings.dtype == served
    assert torch.equal(snap.embeddings, tensor.to(served))


# -- PEFT configs ------------------------------------------------------------------------------


def test_unsupported_submodules(registry, make_file, prompt_config):
    with raises(UnsupportedSubmodules, "must be 1", "got 2", "encoder-decoder", param="config"):
        registry.put("t", make_file(torch.randn(8, 64)), config=prompt_config(n=4, num_transformer_submodules=2))
    cfg = prompt_config(n=4, task_type="SEQ_2_SEQ_LM")
    del cfg["num_transformer_submodules"]  # PEFT's default for encoder-decoder is 2
    with raises(UnsupportedSubmodules, "got 2"):
        registry.put("t", make_file(torch.randn(8, 64)), config=cfg)


@pytest.mark.parametrize("peft_type", ["LORA", "IA3", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT"])
def test_unsupported_peft_type(registry, make_file, prompt_config, peft_type):
    with raises(UnsupportedPeftType, "PROMPT_TUNING, P_TUNING, PREFIX_TUNING", repr(peft_type), param="config"):
        registry.put("t", make_file(torch.randn(4, 64)), config=prompt_config(peft_type=peft_type))


@pytest.mark.parametrize(
    ("kind", "shape", "overrides", "fragments"),
    [
        ("prompt", (4, 64), {"num_virtual_tokens": 5}, ["num_virtual_tokens=5", "4 rows"]),
        ("prompt", (4, 64), {"token_dim": 48}, ["token_dim=48", "64 wide"]),
        ("prefix", (4, 128), {"num_layers": 3}, ["num_layers=3", "token_dim=32", "=192", "128 wide"]),
        ("prefix", (4, 128), {"token_dim": 16}, ["num_layers*2*token_dim=64", "128 wide"]),
        # Same width, different split: 4 layers of 16 is not this model's 2 layers of 32.
        ("prefix", (4, 128), {"num_layers": 4, "token_dim": 16}, ["num_layers=4", "num_layers=2"]),
        ("prefix", (4, 128), {"num_attention_heads": 4}, ["num_attention_heads=4", "num_attention_heads=2"]),
    ],
)
def test_config_mismatch(registry, make_file, prompt_config, kind, shape, overrides, fragments):
    with raises(ConfigMismatch, *fragments, param="config"):
        registry.put("t", make_file(torch.randn(shape)), config=prompt_config(kind, n=4, **overrides))


def test_metadata_count_mismatch(registry, make_file):
    with raises(ConfigMismatch, "num_virtual_tokens=5", "4 rows", param="weights"):
        registry.put("t", make_file(torch.randn(4, 64), kind="prompt", num_virtual_tokens="5"))


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        (b"{not json", ["not valid JSON"]),
        (b"[1, 2]", ["JSON object", "list"]),
        ({"num_virtual_tokens": 4}, ["no peft_type"]),
        ({"peft_type": "PROMPT_TUNING"}, ["no num_virtual_tokens"]),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": "4"}, ["num_virtual_tokens", "'4'"]),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": -1}, ["token_dim", "-1"]),
    ],
)
def test_malformed_config(registry, make_file, config, fragments):
    with raises(MalformedFile, *fragments, param="config"):
        registry.put("t", make_file(torch.randn(4, 64)), config=config)


def test_config_as_json_bytes_and_dict(registry, make_file, prompt_config):
    cfg = prompt_config("prefix", n=4)
    a, _ = registry.put("a", make_file(torch.randn(4, 128)), config=cfg)
    b, _ = registry.put("b", make_file(torch.randn(4, 128)), config=json.dumps(cfg).encode())
    assert a.kind == b.kind == "prefix" and a.source == b.source == "peft"


# -- kinds -------------------------------------------------------------------------------------


def test_explicit_kind_contradicting_metadata(registry, make_file):
    with raises(KindMismatch, "'prefix' was given", "file metadata says 'prompt'", param="kind"):
        registry.put("t", make_file(torch.randn(4, 64), kind="prompt"), kind="prefix")


def test_explicit_kind_contradicting_config(registry, make_file, prompt_config):
    with raises(KindMismatch, "'prefix' was given", "PROMPT_TUNING", "'prompt'", param="kind"):
        registry.put("t", make_file(torch.randn(4, 64)), kind="prefix", config=prompt_config("prompt"))


def test_metadata_contradicting_config(registry, make_file, prompt_config):
    with raises(KindMismatch, "metadata says kind 'prefix'", "PROMPT_TUNING"):
        registry.put("t", make_file(torch.randn(4, 64), kind="prefix"), config=prompt_config("prompt"))


def test_explicit_kind_agreeing_with_metadata(registry, make_file):
    assert registry.put("t", make_file(torch.randn(4, 64), kind="prompt"), kind="prompt")[0].kind == "prompt"


def test_invalid_kind(registry, make_file):
    with raises(InvalidKind, "'prompt' or 'prefix'", "'lora'", param="kind"):
        registry.put("t", make_file(torch.randn(4, 64)), kind="lora")
    with raises(InvalidKind, "'prompt' or 'prefix'", "'soft'", param="weights"):
        registry.put("t", make_file(torch.randn(4, 64), kind="soft"))


def test_nothing_bad_was_stored(registry):
    # After all the refusals above in other tests, a fresh registry is empty; here: refusals leave no trace.
    with pytest.raises(PromptError):
        registry.put("t", b"garbage!")
    assert len(registry) == 0 and registry.list() == []
