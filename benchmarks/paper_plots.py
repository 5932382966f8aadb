"""The pictures of ``paper_experiments.py``: each experiment drawn as the paper would, each title saying
that its figures are simulated."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def arrivals(rows: list[dict], paper: dict[int, float], label: str, path: Path) -> Path:
    """Speedup of fused over each baseline (total time) against the mean gap between arrivals."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    gaps = [r["gap_ms"] for r in rows]
    for name, marker in (("serial", "o"), ("instances", "s"), ("dynamic", "^")):
        ax.plot(gaps, [r[f"{name}_s"] / r["fused_s"] for r in rows], marker=marker, label=f"{name} / fused (simulated)")
    ax.plot(list(paper), list(paper.values()), "k*", markersize=12, label="paper: Flover over FasterTransformer")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="mean gap between arrivals (ms)", ylabel="total time over fused's",
           title=f"Temporal fusion's speedup, {label}")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def shuffle(rows: list[dict], label: str, path: Path) -> Path:
    """Speedup of the memory shuffle against the longest output length U."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    uppers = [r["upper"] for r in rows]
    ax.plot(uppers, [r["without_s"] / r["with_s"] for r in rows], marker="o", label="total time (simulated)")
    ax.plot(uppers, [r["decode_without_s"] / r["decode_with_s"] for r in rows], marker="s", label="decode time (simulated)")
    ax.axhspan(1.29, 1.93, color="k", alpha=0.1, label="paper: 1.29x to 1.93x")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(xlabel="output lengths uniform in [128, U]: U", ylabel="without the shuffle over with it",
           title=f"The memory shuffle, {label}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def parallel(rows: list[dict], label: str, path: Path) -> Path:
    """Speedup over TP 1 against the TP degree, in one node and over two."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    base = next(r for r in rows if r["tp"] == 1)
    for nodes, style in ((1, "-"), (2, "--")):
        mine = [r for r in rows if r["nodes"] == nodes]
        where = "one node" if nodes == 1 else "two nodes"
        ax.plot([r["tp"] for r in mine], [base["alone_s"] / r["alone_s"] for r in mine], style, marker="o",
                label=f"one request alone, {where} (simulated)")  # fmt: skip
        ax.plot([r["tp"] for r in mine], [base["fused_s"] / r["fused_s"] for r in mine], style, marker="s",
                label=f"32 requests fused, {where} (simulated)")  # fmt: skip
    ax.set(xscale="log", xlabel="tensor-parallel ranks", ylabel="speedup over TP 1",
           title=f"Tensor parallelism, {label.replace(')', ', TP varies)')}")  # fmt: skip
    ax.set_xticks([r["tp"] for r in rows if r["nodes"] == 1], labels=[str(r["tp"]) for r in rows if r["nodes"] == 1])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def decode_steps(curves: dict[str, list[tuple[int, float]]], measured: list[tuple[int, float]], path: Path) -> Path:
    """Decode-step time over batch 1's against the batch size: where fusion is nearly free and where it is not."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        one = dict(points)[1]
        ax.plot([b for b, _ in points], [t / one for _, t in points], marker=".", label=f"{name}, simulated (cost model)")
    if measured:
        one = dict(measured)[1]
        ax.plot([b for b, _ in measured], [t / one for _, t in measured], "ko", label="cpu, gpt2, measured")
    top = max(b for points in curves.values() for b, _ in points)
    ax.plot([1, top], [1, top], color="grey", lw=0.8, ls=":", label="B separate steps (no gain from fusion)")
    ax.set(xscale="log", yscale="log", xlabel="requests in the step (batch)", ylabel="step time over batch 1's",
           title="A decode step against its batch:\nthis CPU measured and simulated, an H100 simulated")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)
