"""Linear layers whose weights stay 8-bit or 4-bit, on torch's own weight-only kernels.

`Int8Linear`: int8 weights, one scale per output row (`torch._weight_int8pack_mm`). `Int4Linear`: 4-bit codes in
groups of `group_size` consecutive inputs, a scale and a zero per group, weight = (code - 8) * scale + zero
(`torch._weight_int4pack_mm_for_cpu`, its codes packed once by `torch._convert_weight_to_int4pack_for_cpu`). Both
read the packed weights directly, never a dequantized copy.

The kernels take their activations and scales in one dtype, the layer's `compute_dtype`: the served dtype, or
bfloat16 under a float32 model (the layer's input rounded to bfloat16, its output back to float32; the residual
stream, norms, attention and the KV cache stay float32). Measured on torch 2.13 (AVX512, benchmarks/quant_kernels.py):
only bfloat16 has the vectorised paths; float32 and float16 run reference loops 5-12x slower than a float32
`F.linear` (docs/performance.md, "Quantized weights").

`kernel_missing` probes an op on the device and dtype before any layer is replaced, so a missing kernel is one
clear line at load rather than an error in the first request.
"""

from __future__ import annotations

import torch

from server.model.quantize import GROUP_SIZES as INT4_GROUPS

KERNELS = {"int8": "torch._weight_int8pack_mm", "int4": "torch._weight_int4pack_mm_for_cpu"}


def kernel_missing(kind: str, device: torch.device, dtype: torch.dtype, group_size: int = 32) -> str | None:
    """Why `kind`'s ("int8" or "int4") kernel cannot run on `device` with `dtype` activations; None when a probe runs
    and agrees with F.linear."""
    op = KERNELS[kind]
    if kind == "int4" and device.type != "cpu":
        return f"{op} runs on the CPU only; this model is on {device.type}"
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 2 * group_size, generator=g)
        x = torch.randn(3, 2 * group_size, generator=g).to(device, dtype)
        layer = (Int8Linear.quantize(w, None, dtype) if kind == "int8"
                 else Int4Linear.quantize(w, None, group_size, dtype)).to(device)
        with torch.inference_mode():
            got = layer(x).float()
            want = torch.nn.functional.linear(x.float(), layer.dequantized().to(device))
    except (AttributeError, RuntimeError, NotImplementedError, ValueError) as exc:
        return f"torch {torch.__version__} has no usable {op} for {dtype} on {device.type} " \
               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if not torch.allclose(got, want, atol=tol * 10, rtol=tol):
        return f"{op} disagrees with F.linear on a probe ({dtype} on {device.type})"
    return None


class _WeightOnly(torch.nn.Module):
    """What both kinds share: the input's dtype in and out, the kernel's in between; an optional bias."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype)  # [tokens, in]
        out = self._matmul(rows).to(x.dtype)  # [tokens, out]
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The weight values the layer holds, float32 [out, in] (computed as the kernel does, for checks)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}")


class Int8Linear(_WeightOnly):
    """int8 weights [out, in] with one scale per output row: weight = code * scale."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__(codes.shape[1], codes.shape[0], bias, compute_dtype)
        self.register_buffer("weight_int8", codes.contiguous(), persistent=False)  # [out, in] int8
        self.register_buffer("scales", scales.to(compute_dtype).contiguous(), persistent=False)  # [out]

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> Int8Linear:
        """Symmetric per-row int8 of `weight` [out, in]."""
        w = weight.detach().float()
        scales = (w.abs().amax(1) / 127).clamp(min=1e-12)  # [out]
        if compute_dtype != torch.float32:  # the codes are made against the scale the kernel will read
            scales = scales.to(compute_dtype).float()
        codes = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        return cls(codes.to(weight.device), scales.to(weight.device), bias, compute_dtype)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.weight_int8, self.scales)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float().cpu() * self.scales.float().cpu()[:, None]


class Int4Linear(_WeightOnly):
    """4-bit codes in groups of `group_size` inputs: weight = (code - 8) * scale + zero, per group."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        out_features, in_features = codes.shape
        if group_size not in INT4_GROUPS or in_features % group_size:
            raise ValueError(f"a 4-bit group must be one of {', '.join(map(str, INT4_GROUPS))} inputs and divide the "
                             f"layer's {in_features}; got {group_size}")
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.group_size = group_size
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("weight_int4", packed, persistent=False)  # [out, in/2] uint8
        # [in/group, out, 2]: (scale, zero), the kernel's layout
        pair = torch.stack([scales.t(), zeros.t()], -1).to(compute_dtype).contiguous()
        self.register_buffer("scales_and_zeros", pair, persistent=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                 compute_dtype: torch.dtype) -> Int4Linear:
        """Asymmetric 4-bit groups of `weight` [out, in]: each group's minimum to maximum in 15 steps."""
        out_features, in_features = weight.shape
        if group_size not in INT4_GROUPS or in_features % group_size:
            raise ValueError(f"a 4-bit group must be one of {', '.join(map(str, INT4_GROUPS))} inputs and divide the "
                             f"layer's {in_features}; got {group_size}")
        blocks = weight.detach().float().view(out_features, in_features // group_size, group_size)
        low, high = blocks.amin(-1), blocks.amax(-1)  # [out, groups]
        scales = ((high - low) / 15).clamp(min=1e-12)
        zeros = low + 8 * scales
        if compute_dtype != torch.float32:  # codes against the scale and zero the kernel will read
            scales, zeros = scales.to(compute_dtype).float(), zeros.to(compute_dtype).float()
        codes = torch.round((blocks - (zeros - 8 * scales)[..., None]) / scales[..., None]).clamp(0, 15)
        return cls(codes.view(out_features, in_features).to(torch.int32), scales, zeros, group_size, bias,
                   compute_dtype)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(rows, self.weight_int4, self.group_size, self.scales_and_zeros)

    def dequantized(self) -> torch.Tensor:
        """Through the kernel itself: the identity's rows times the weight (in float32 whatever the compute
        dtype, where each product has one nonzero term, so the result is the kernel's own weight value)."""
        eye = torch.eye(self.in_features, device=self.weight_int4.device)  # [in, in]
        with torch.inference_mode():
            return torch._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size,
                                                     self.scales_and_zeros.float()).t().cpu()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored, shared tensors once (a oneDNN-packed weight: its
    packed copy)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total
