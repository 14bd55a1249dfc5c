"""Do weight-only int8 / int4 kernels pay at one row here? `python -m benchmarks.quant_kernels`.

One decode step at one request reads every weight once, so its Linear layers' time is set by how fast each
kernel gets through the weights at 1 row. This measures, side by side in one process and in interleaved rounds
(other processes on the cores then slow every kernel alike), each kernel on a decoder's Linear shapes (SmolLM2-135M
by default: per layer q, o 576x576, k, v 192x576, gate, up 1536x576, down 576x1536, times 30 layers, plus the
49152x576 head), and prints the step's Linear time per kernel and its ratio to float32:

    f32-mkl              torch's F.linear (MKL sgemm)
    f32-onednn           the weight packed once for oneDNN (server/model/cpu_linear.py; what the engine serves)
    int8-pack            torch._weight_int8pack_mm (int8 per output channel, one scale a row)
    int4-pack-gN         torch._weight_int4pack_mm_for_cpu, N weights a group (scale and zero a group)
    ...-bf16             the same with bfloat16 activations and scales (the input rounded to bfloat16, the output
                         back to float32: --quantize-compute bfloat16); torch 2.13's CPU kernels are vectorised for
                         bfloat16 only, float32 runs a reference loop
    int8-compiled        torch.compile of F.linear(x, w_int8.to(x.dtype) * scale) (--compile)
    int4-compiled-g32    torch.compile of the same with 4-bit nibbles, a scale and zero per 32 (--compile)

From the ratios it derives the bound a mode's decode step cannot beat: even if everything but the Linear layers
took no time, a step is at most (float32's Linear time / the kernel's) times faster than float32's. The
engine's own step has more than its Linear layers (attention, norms, sampling, the host's work), which only
moves a mode's speedup towards 1.0x.

    python -m benchmarks.quant_kernels                 # eager kernels, ~1 minute on 2 cores
    python -m benchmarks.quant_kernels --compile       # + the compiled dequantize-and-matmul (~2-4 minutes more)
    python -m benchmarks.quant_kernels --rows 1,16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quant_kernels.json"
# (out_features, in_features) -> how many a step reads: SmolLM2-135M's
SMOLLM2_SHAPES: dict[tuple[int, int], int] = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30,
                                              (49152, 576): 1}
GROUPS = (32, 64, 128, 256)
REFERENCE = "f32-onednn"


def kernels(n: int, k: int, rows: int, compiled: bool) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (a call computing x @ W^T for one random [n, k] weight, the bytes its weights take)."""
    import torch

    from server.model.cpu_linear import PackedLinear

    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(rows, k, generator=g)
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    packed = PackedLinear(linear)
    out: dict[str, tuple[Callable[[], object], int]] = {
        "f32-mkl": (lambda: torch.nn.functional.linear(x, w), w.nbytes),
        "f32-onednn": (lambda: packed(x), w.nbytes),
    }
    scale = w.abs().amax(1) / 127  # [n]
    w8 = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)  # [n, k]
    out["int8-pack"] = (lambda: torch._weight_int8pack_mm(x, w8, scale), w8.nbytes + scale.nbytes)
    # bfloat16 activations and scales, the input rounded on the way in and the output back to float32: what
    # --quantize-compute bfloat16 runs under a float32 model
    s8 = scale.bfloat16()
    out["int8-pack-bf16"] = (lambda: torch._weight_int8pack_mm(x.bfloat16(), w8, s8).float(), w8.nbytes + s8.nbytes)
    for group in GROUPS:
        if k % group:
            continue
        q, sz = _int4(w, group)
        p4 = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        out[f"int4-pack-g{group}"] = (
            lambda p4=p4, group=group, sz=sz: torch._weight_int4pack_mm_for_cpu(x, p4, group, sz),
            p4.nbytes + sz.nbytes)
        sz16 = sz.bfloat16()
        out[f"int4-pack-g{group}-bf16"] = (
            lambda p4=p4, group=group, sz16=sz16: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), p4, group,
                                                                                      sz16).float(),
            p4.nbytes + sz16.nbytes)
    if compiled:
        f8 = torch.compile(lambda x, w8, s: torch.nn.functional.linear(x, w8.to(x.dtype) * s[:, None]),
                           dynamic=False, fullgraph=True)
        out["int8-compiled"] = (lambda: f8(x, w8, scale), w8.nbytes + scale.nbytes)
        q, sz = _int4(w, 32)
        nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # [n, k/2]: two weights a byte
        s32, z32 = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()  # [n, k/32]

        def dq4(x, nibbles, s, z):
            lo, hi = (nibbles & 15).to(x.dtype), (nibbles >> 4).to(x.dtype)
            q = torch.stack([lo, hi], -1).view(n, k // 32, 32)
            wd = (q - 8) * s[..., None] + z[..., None]
            return torch.nn.functional.linear(x, wd.view(n, k))

        f4 = torch.compile(dq4, dynamic=False, fullgraph=True)
        out["int4-compiled-g32"] = (lambda: f4(x, nibbles, s32, z32), nibbles.nbytes + s32.nbytes + z32.nbytes)
    return out


def _int4(w, group: int):
    """Asymmetric 4-bit groups of `w` [n, k]: codes 0..15 [n, k] int32, scales and zeros [k/group, n, 2] with
    w ~ (q - 8) * scale + zero."""
    import torch

    n, k = w.shape
    blocks = w.view(n, k // group, group)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((blocks - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    zero = lo + 8 * scale
    return q, torch.stack([scale.t(), zero.t()], -1).contiguous()


def time_call(fn: Callable[[], object], seconds: float) -> float:
    """Seconds a call, over about `seconds` of calls after a warm-up."""
    import torch

    with torch.inference_mode():
        for _ in range(3):
            fn()
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and n >= 5:
                return elapsed / n


def run(args) -> dict:

    from benchmarks import threads

    threads.configure(args.threads)  # the engine's threads in a worker, as benchmarks/precision.py's matmul check
    return threads.in_worker(_run, args)


def _run(args) -> dict:
    import torch

    out: dict = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "threads": torch.get_num_threads(), "rows": {}}
    for rows in args.rows:
        calls = {shape: kernels(*shape, rows, args.compile) for shape in SMOLLM2_SHAPES}
        names = [m for m in next(iter(calls.values())) if all(m in c for c in calls.values())]  # a group must divide k
        calls = {shape: {m: c[m] for m in names} for shape, c in calls.items()}
        times: dict[str, dict[tuple[int, int], list[float]]] = {m: {s: [] for s in calls} for m in names}
        for _ in range(args.repeats):
            for shape, by_name in calls.items():
                for name, (fn, _) in by_name.items():
                    times[name][shape].append(time_call(fn, args.seconds))
        step: dict[str, dict] = {}
        for name in names:
            per_shape = {s: statistics.median(t) for s, t in times[name].items()}
            total = sum(per_shape[s] * count for s, count in SMOLLM2_SHAPES.items())
            layers = sum(per_shape[s] * count for s, count in SMOLLM2_SHAPES.items() if s != (49152, 576))
            weight_bytes = sum(calls[s][name][1] * count for s, count in SMOLLM2_SHAPES.items())
            step[name] = {"step_ms": total * 1e3, "layers_ms": layers * 1e3, "head_ms": (total - layers) * 1e3,
                          "weight_mb": weight_bytes / 1e6, "gb_per_s": weight_bytes / total / 1e9,
                          "per_shape_us": {f"{n}x{k}": round(t * 1e6, 1) for (n, k), t in per_shape.items()}}
        ref = step[REFERENCE]["step_ms"]
        for name in names:
            r = step[name]
            r["speedup_bound"] = ref / r["step_ms"]  # the step's ceiling if all else were free
            r["tok_s_bound"] = rows * 1e3 / r["step_ms"]
            # the modes keep a tied head in float32 (on oneDNN, as the engine packs it): their Linear time
            r["with_f32_head_ms"] = r["layers_ms"] + step[REFERENCE]["head_ms"]
            r["with_f32_head_speedup_bound"] = ref / r["with_f32_head_ms"]
            r["with_f32_head_tok_s_bound"] = rows * 1e3 / r["with_f32_head_ms"]
        out["rows"][rows] = step
    return out


def table(payload: dict) -> str:
    lines = []
    for rows, step in payload["rows"].items():
        head = (f"{'kernel (' + str(rows) + ' row' + ('s' if rows != 1 else '') + ')':<20}{'step ms':>9}"
                f"{'layers':>9}{'head':>8}{'MB':>6}{'GB/s':>6}{'bound':>8}{'tok/s<=':>9}"
                f"{'| f32 head: ms':>15}{'bound':>8}{'tok/s<=':>9}")
        lines += [head, "-" * len(head)]
        for name, r in step.items():
            lines.append(f"{name:<20}{r['step_ms']:>9.2f}{r['layers_ms']:>9.2f}{r['head_ms']:>8.2f}"
                         f"{r['weight_mb']:>6.0f}{r['gb_per_s']:>6.1f}{r['speedup_bound']:>7.2f}x"
                         f"{r['tok_s_bound']:>9.0f}{r['with_f32_head_ms']:>15.2f}"
                         f"{r['with_f32_head_speedup_bound']:>7.2f}x{r['with_f32_head_tok_s_bound']:>9.0f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=lambda s: [int(r) for r in s.split(",")], default=[1])
    p.add_argument("--compile", action="store_true", help="also the torch.compile'd dequantize-and-matmul")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians reported")
    p.add_argument("--seconds", type=float, default=0.05, help="timed calls per kernel, shape and round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from benchmarks.report import write_json

    payload = run(args)
    print(f"torch {payload['torch']} ({payload['cpu_capability']}), {payload['threads']} threads; a decode step's "
          "Linear layers on SmolLM2-135M's shapes (30 layers + the tied head), medians of "
          f"{args.repeats} interleaved rounds\n")
    print(table(payload))
    print(f"bound: the most a decode step could gain over {REFERENCE} if its Linear layers were all it did (the step's "
          "other work, attention, norms, sampling and the host's, only lowers it); tok/s<=: the step's tokens over its "
          "Linear time alone; f32 head: the same with the tied head kept in float32 on oneDNN, as the modes keep it")
    payload["rows"] = {str(k): v for k, v in payload["rows"].items()}
    write_json(args.json, payload)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
