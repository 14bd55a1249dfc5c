"""benchmarks/quant_kernels.py times like for like: every kernel it times computes the same product as float32's
F.linear, to its quantization's error (no timing is asserted)."""

from __future__ import annotations

import torch

from benchmarks.quant_kernels import REFERENCE, _int4, kernels, table


def test_every_kernel_computes_the_float32_product_to_its_quantizations_error():
    calls = kernels(96, 128, 3, compiled=False)
    assert {"f32-mkl", REFERENCE, "int8-pack", "int8-pack-bf16", "int4-pack-g32", "int4-pack-g64-bf16"} <= set(calls)
    with torch.inference_mode():
        want = calls["f32-mkl"][0]()
        for name, (fn, nbytes) in calls.items():
            got = fn()
            assert got.shape == want.shape and got.dtype == torch.float32, name
            tol = 1e-4 if name.startswith("f32") else 0.15  # 4-bit groups: a few percent of the products' range
            assert (got - want).abs().max() <= tol * want.abs().max(), name
            assert nbytes <= 96 * 128 * 4, name


def test_int4_groups_span_each_groups_range():
    w = torch.randn(8, 64)
    codes, sz = _int4(w, 32)
    assert codes.min() >= 0 and codes.max() <= 15 and sz.shape == (2, 8, 2)
    held = (codes.float() - 8).view(8, 2, 32) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
    assert (held.view(8, 64) - w).abs().max() <= sz[..., 0].max() / 2 + 1e-6


def test_the_table_prints_each_kernels_bound():
    step = {name: {"step_ms": ms, "layers_ms": ms / 2, "head_ms": ms / 2, "weight_mb": 1.0, "gb_per_s": 1.0,
                   "speedup_bound": 20 / ms, "tok_s_bound": 1e3 / ms, "with_f32_head_ms": ms,
                   "with_f32_head_speedup_bound": 20 / ms, "with_f32_head_tok_s_bound": 1e3 / ms}
            for name, ms in (("f32-onednn", 20.0), ("int8-pack-bf16", 10.0))}
    text = table({"rows": {1: step}})
    assert "int8-pack-bf16" in text and "2.00x" in text and "100" in text
