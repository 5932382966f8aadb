"""Pictures of a run: a timeline of every request with the fused batch size, and latency curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flover.runner import RunResult  # noqa: E402

PHASES = (("waiting", "#d0d0d0"), ("prefill", "#f28e2b"), ("decoding", "#4e79a7"))


def timeline(run: RunResult, path: Path, note: str = "") -> Path:
    """One bar per request (waiting, prefill, decoding) above the batch size of every decode step.
    ``note`` heads the title (a simulated run says so there)."""
    results = sorted(run.results, key=lambda r: (r.arrival_s, str(r.id)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[3, 1])
    for y, r in enumerate(results):
        spans = ((r.arrival_s, r.admitted_s), (r.admitted_s, r.first_token_s), (r.first_token_s, r.finish_s))
        for (start, end), (_, color) in zip(spans, PHASES):
            top.barh(y, end - start, left=start, color=color, height=0.8, linewidth=0)
    top.set_ylabel("request (by arrival)")
    top.set_title((f"{note}\n" if note else "") + f"{run.config.label}: {len(results)} requests")
    top.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for _, c in PHASES],
               labels=[name for name, _ in PHASES], loc="upper left", fontsize=8)  # fmt: skip
    steps = sorted((s for s in run.stats.steps if s.rows > s.prefill_rows + s.idle_rows), key=lambda s: s.start_s)
    if steps:  # the decode steps: a prompt alone is a step of one request and would read as a dip
        times = [s.start_s for s in steps] + [steps[-1].end_s]
        decoding = [s.rows - s.prefill_rows - s.idle_rows for s in steps]
        bottom.step(times, decoding + decoding[-1:], where="post", color="#4e79a7", label="requests decoding")
        if any(s.idle_rows for s in steps):
            lanes = [d + s.idle_rows for d, s in zip(decoding, steps)]
            bottom.step(times, lanes + lanes[-1:], where="post", color="#e15759", alpha=0.6,
                        label="lanes computed, idle ones too")  # fmt: skip
            bottom.legend(fontsize=8, loc="upper right")
    bottom.set_ylabel("decode batch")
    bottom.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(runs: Sequence[RunResult], path: Path, note: str = "") -> Path:
    """Cumulative distributions of end-to-end latency and time to first token, one curve per policy."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for metric, ax, title in (("latency", axes[0], "end-to-end latency"), ("ttft", axes[1], "time to first token")):
        for run in runs:
            v = np.sort([(r.finish_s if metric == "latency" else r.first_token_s) - r.arrival_s for r in run.results])
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=run.config.label)
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title}, {note}" if note else title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_curves(rates: Sequence[float], table: dict[str, list[dict]], path: Path) -> Path:
    """Mean latency and throughput against offered load, one curve per policy."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, metrics in table.items():
        left.plot(rates, [m["latency_s"]["mean"] for m in metrics], marker="o", label=label)
        right.plot(rates, [m["throughput_tok_s"] for m in metrics], marker="o", label=label)
    left.set(xlabel="arrival rate (requests/s)", ylabel="mean latency (s)", yscale="log", title="latency vs load")
    right.set(xlabel="arrival rate (requests/s)", ylabel="tokens/s", title="throughput vs load")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
