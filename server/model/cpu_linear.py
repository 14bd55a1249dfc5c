"""The base model's Linear layers on oneDNN with weights packed once, on the CPU (`--cpu-linear onednn`).

torch's float32 `F.linear` on an x86 CPU goes through MKL's sgemm with the weight as stored: measured on
a 2-core AMD EPYC (torch 2.13), a decode step's matrix-vector products read the weights at ~16-20 GB/s
where the memory gives ~50, and 64-row products ran at ~140 GFLOP/s. oneDNN, with each weight reordered
once into its blocked layout (the same ops torch's own compiler uses for frozen CPU models:
`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`), did the same products 2.2x faster at 1 row
and at 64. It is the same arithmetic in the same dtype, summed in another order: results differ from
MKL's in the last bits, as two MKL calls of different batch shapes already do, never in precision.

These ops are torch internals, so nothing is assumed: `pack_linears` first checks, on a probe layer, that
they exist and agree with `F.linear`, and leaves the model as it is (logging why) when they do not; then
it runs one forward pass of the packed model, and puts torch's Linear layers back if that fails (a model
whose own code reads a layer's `.weight`, which a packed layer does not have).
Inference only, after the model has its device and dtype: a packed weight is a oneDNN-layout tensor that
autograd, `.to()`, `copy.deepcopy` and `state_dict()` do not carry. `promptswap train` never loads here.

Memory. oneDNN builds one primitive per problem shape, JIT code included, and torch's op keeps it in two
caches: oneDNN's primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep's per-thread cache
(`LRU_CACHE_CAPACITY`), 1,024 entries each by default. A step's row count (its tokens; the head's, its sampled
rows) changes from step to step, and each new count of each weight shape cost ~600 KiB of heap (measured on
torch 2.13, oneDNN 3.12: 580-660 KiB from a 64x128 weight to a 576x49152 one, from 3 rows to 500). Under a
steady load of varied requests that grew without end in sight: a tiny Qwen2 went from 456 to 594 MB in 180 s,
and a loop over 600 row counts on three weights from 294 to 1,400 MB (malloc_trim gave back a third of it:
evicted primitives leave the heap fragmented). So the rows are padded up to a few sizes (`padded_rows`:
exact up to 16, then 8 sizes per doubling, at most 12.5% more rows, ~4% on average), which bounds the
primitives by the model's weight shapes times 56 sizes (1 to 512 rows), and both caches are capped
(`CACHE_CAPACITY`) as a backstop for any other oneDNN shape. The padding rows are zeros and their outputs are
dropped; every row is computed on its own, so the rows kept are what an unpadded call gives, up to the
summation order that any change of row count may bring.
"""

from __future__ import annotations

import logging
import os

import torch

from server.engine.one_row import ONE_ROW

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16)  # oneDNN's CPU matmuls the probe was measured on
_BATCH_HINT = 1  # the rows a packed layout is tuned for: decode steps are the most frequent calls
SIZES_PER_DOUBLING = 8  # a power of two: the row counts a packed layer computes, between n and 2n (n >= 8)

# Entries of oneDNN's primitive cache and of ideep's. Each reads its variable once, when the process creates its
# first oneDNN primitive (not when torch is imported; set later, it changes nothing, and torch has no setter for
# either), so this module sets them when it is imported: before the model is loaded and packed. 512 holds the
# padded shapes of a model with up to 9 weight shapes at 512 tokens a step (56 sizes each) and keeps the worst
# case, if something else keeps making new shapes, near 300 MB instead of the defaults' 600 MB and more. A value
# the environment sets already (oneDNN's older DNNL_ name too) is kept.
CACHE_CAPACITY = 512
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def cap_primitive_caches(capacity: int = CACHE_CAPACITY, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set each cache's capacity variable to `capacity` where the environment sets none; returns the values in
    effect (they count only if this runs before the process's first oneDNN primitive)."""
    env = os.environ if environ is None else environ
    found = {}
    for name in CACHE_VARIABLES:
        names = (name, "DNNL_" + name.removeprefix("ONEDNN_")) if name.startswith("ONEDNN_") else (name,)
        given = next((env[n] for n in names if n in env), None)
        if given is None:
            env[name] = given = str(capacity)
        found[name] = given
    return found


cap_primitive_caches()


def padded_rows(rows: int) -> int:
    """The row count a packed layer computes for `rows` rows: `rows` itself up to 16, then rounded up to a multiple
    of 2**(floor(log2(rows)) - 3), one of 8 evenly spaced sizes per doubling (17 -> 18, 33 -> 36, 100 -> 104,
    300 -> 320): at most 12.5% more rows. 56 sizes cover 1 to 512 rows, 64 cover 1 to 1,024."""
    step = 1 << max(0, rows.bit_length() - SIZES_PER_DOUBLING.bit_length())
    return -(-rows // step) * step


@torch.library.custom_op("promptswap::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` on a weight packed by `mkldnn._reorder_linear_weight`, its rows padded (see the module's
    docstring). One opaque op, so a compiled forward pass calls it as it is: the compiler's own oneDNN lowering
    wants weights it froze itself."""
    out_features, in_features = packed_weight.shape
    rows = x.numel() // in_features if in_features else 0
    padded = padded_rows(rows)
    if padded == rows:
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")
    # One of a few shapes: zero rows below, their outputs dropped.
    flat = torch.nn.functional.pad(x.reshape(rows, in_features), (0, 0, 0, padded - rows))
    out = torch.ops.mkldnn._linear_pointwise(flat, packed_weight, bias, "none", [], "")
    return out[:rows].reshape(*x.shape[:-1], out_features)


@packed_linear.register_fake
def _(x, packed_weight, bias):
    return x.new_empty(*x.shape[:-1], packed_weight.shape[0])


class PackedLinear(torch.nn.Module):
    """`torch.nn.Linear`'s forward on a weight packed once for oneDNN (and, for the one-row graph, kept plain)."""

    plain_weight: torch.Tensor | None  # a buffer: the weight in torch's layout, for the one-row graph (keep_plain)

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("plain_weight", None, persistent=False)  # keep_plain()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The compiled step's one-row graph (server/engine/one_row.py says why): one reduction reading the weight.
        if ONE_ROW[0] and self.plain_weight is not None:
            out = (self.plain_weight * x.reshape(-1, 1, self.in_features)).sum(-1)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        return torch.ops.promptswap.packed_linear(x, self.packed_weight, self.bias)

    def keep_plain(self) -> int:
        """Keep the weight in torch's layout too, for the one-row graph; returns the bytes that adds."""
        if self.plain_weight is None:
            self.plain_weight = self.packed_weight.to_dense()
        return self.plain_weight.numel() * self.plain_weight.element_size()

    def unpacked(self) -> torch.nn.Linear:
        """A torch Linear holding the same weight (in torch's own layout again)."""
        weight = self.packed_weight.to_dense()
        linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                 device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def unusable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why packed oneDNN linears cannot serve this model, or None when a probe shows they can."""
    if device.type != "cpu":
        return f"the model is on {device.type}"
    if dtype not in DTYPES:
        return f"{dtype} is not one of {', '.join(str(d) for d in DTYPES)}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    try:
        g = torch.Generator().manual_seed(0)  # not the process's seed
        probe = torch.nn.Linear(64, 48, dtype=dtype)
        with torch.no_grad():
            probe.weight.copy_(torch.randn(48, 64, generator=g))
            probe.bias.copy_(torch.randn(48, generator=g))
        x = torch.randn(3, 5, 64, generator=g).to(dtype)
        with torch.inference_mode():
            got, want = PackedLinear(probe)(x), probe(x)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:  # an op missing or refusing this input
        return f"oneDNN's packed linear is not usable here ({type(exc).__name__}: {exc})"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
        return "oneDNN's packed linear disagrees with torch's on a probe"
    return None


def pack_linears(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Replace every `torch.nn.Linear` of `model` by a PackedLinear; the number replaced (0, logged, when
    `unusable_reason` finds one, or when the packed model cannot run a forward pass). A head tied to the
    input embeddings is packed too: a copy of the table in oneDNN's layout (its largest matrix, read every
    step), while the embeddings keep theirs."""
    reason = unusable_reason(device, dtype)
    if reason is not None:
        log.info("Linear layers on torch's own kernels: %s", reason)
        return 0
    names = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    for name in names:  # one at a time: each original weight is freed as its packed copy is made
        model.set_submodule(name, PackedLinear(model.get_submodule(name)))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[0, 1]], device=device))
    except Exception as exc:  # any failure of the model's own code: put torch's layers back
        for name in names:
            model.set_submodule(name, model.get_submodule(name).unpacked())
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()  # the head reads the embeddings' table again, not a copy
        log.info("Linear layers on torch's own kernels: this model's code does not run on packed layers "
                 "(%s: %s)", type(exc).__name__, exc)
        return 0
    log.info("%d Linear layers on oneDNN with packed weights (--cpu-linear onednn)", len(names))
    return len(names)
