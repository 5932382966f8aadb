"""The summary table printed at the end of a benchmark."""

from __future__ import annotations

from collections.abc import Sequence

from flover.runner import RunResult

COLUMNS = ("policy", "tok/s", "x fused", "lat mean", "lat p50", "lat p99", "returned", "ttft mean", "tpot mean",
           "makespan", "batch", "idle rows")  # fmt: skip


def table(runs: Sequence[RunResult], title: str = "") -> str:
    """One row per run; 'x fused' is fused throughput / this run's (so fused is 1.00).

    'returned' is the mean latency until a response is handed back: later than
    its last token only for dynamic batching without streaming (the batch
    returns whole). 'idle rows' is the share of computed rows that served no
    request: holes without the shuffle, finished members carried as padding.
    ``title`` is a line above the table (a simulated run says so there).
    """
    fused = next((r for r in runs if r.config.policy == "fused"), None)
    rows = [COLUMNS]
    for run in runs:
        m = run.metrics
        ratio = fused.metrics["throughput_tok_s"] / m["throughput_tok_s"] if fused else float("nan")
        rows.append((run.config.label, f"{m['throughput_tok_s']:.1f}", f"{ratio:.2f}",
                     f"{m['latency_s']['mean']:.3f}s", f"{m['latency_s']['p50']:.3f}s",
                     f"{m['latency_s']['p99']:.3f}s", f"{m['returned_latency_s']['mean']:.3f}s",
                     f"{m['ttft_s']['mean']:.3f}s", f"{m['tpot_s']['mean'] * 1e3:.1f}ms", f"{m['makespan_s']:.2f}s",
                     f"{m['mean_batch']:.1f}", f"{m['idle_rows'] / max(m['rows'], 1):.0%}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(([title] if title else []) + lines)
