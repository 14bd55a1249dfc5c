"""Turn measured summaries into the printed table, the JSON file and the PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = (
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("requests_per_s", "req/s", "{:.2f}"),
    ("p50_latency_s", "p50 lat s", "{:.2f}"),
    ("p99_latency_s", "p99 lat s", "{:.2f}"),
    ("p50_ttft_s", "p50 TTFT s", "{:.2f}"),
    ("cpu_cores_used", "cores", "{:.2f}"),
)


def _fmt(value: float, pattern: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def table(summaries: dict[str, dict], ratios: dict[str, dict] | None, ours: str) -> str:
    """A fixed-width table: one row per system, then `ours`'s ratio to it (tokens/s and p50 latency)."""
    name_w = max(len(n) for n in summaries) + 2
    head = "system".ljust(name_w) + "".join(label.rjust(12) for _, label, _ in COLUMNS)
    ratio_w = max(24, len(ours) + 10)
    head += f"{ours + ' tok/s x':>{ratio_w}}{'p50 lat x':>12}"
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        row = name.ljust(name_w) + "".join(_fmt(s.get(k), p).rjust(12) for k, _, p in COLUMNS)
        r = (ratios or {}).get(name)
        if r is not None:
            row += _fmt(r["tokens_per_s"], "{:.2f}x").rjust(ratio_w) + _fmt(r["p50_latency_s"], "{:.2f}x").rjust(12)
        lines.append(row)
    return "\n".join(lines)


def ttft_table(rows: list[dict]) -> str:
    systems = sorted({k for r in rows for k in r["ttft_s"]})
    head = f"{'virtual':>8}" + "".join(f"{s + ' TTFT s':>28}" for s in systems)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['num_virtual']:>8}" + "".join(_fmt(r["ttft_s"].get(s), "{:.4f}").rjust(28)
                                                         for s in systems))
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def plot_throughput(path: Path, by_concurrency: dict[int, dict[str, dict]], title: str) -> None:
    """Generated tokens/s against concurrent requests, one line per system."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    xs = sorted(by_concurrency)
    systems = list(dict.fromkeys(name for c in xs for name in by_concurrency[c]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in systems:
        points = [(c, by_concurrency[c][name]["tokens_per_s"]) for c in xs if name in by_concurrency[c]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(c) for c in xs])
    ax.set_xlabel("concurrent requests (max running / batch size)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = sorted({k for r in rows for k in r["ttft_s"]})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in systems:
        ax.plot([r["num_virtual"] for r in rows], [r["ttft_s"][name] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    sizes = [r["num_virtual"] for r in rows]
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("num_virtual_tokens")
    ax.set_ylabel("time to first token, s (median of warm runs; first use: one run)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(path: Path, panels: dict[str, dict[str, float]], title: str) -> None:
    """Side-by-side bar charts: one panel per figure (its name is the y label), one bar per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (label, bars) in zip(axes[0], panels.items(), strict=True):
        names = list(bars)
        ax.bar(range(len(names)), [bars[n] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=10)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        for i, n in enumerate(names):
            ax.annotate(f"{bars[n]:.4g}", (i, bars[n]), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
