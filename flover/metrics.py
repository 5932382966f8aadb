"""Serving metrics: time to first token, time per output token, latency, throughput, and what the steps did."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flover.engine.records import EngineStats
from flover.engine.request import RequestResult


def distribution(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    v = np.asarray(values, np.float64)
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: Sequence[RequestResult], stats: EngineStats | None = None, kv_budget: int = 0) -> dict:
    """Per-run summary; times in seconds, throughput in generated tokens per second.

    A decode step is a step with at least one decode row; its batch is its
    number of decode rows. Idle rows are rows computed for no request.
    """
    if not results:
        return {"requests": 0, "tokens": 0}
    stats = stats or EngineStats()
    tokens = sum(len(r.tokens) for r in results)
    makespan = max(r.finish_s for r in results) - min(r.arrival_s for r in results)
    tpot = [(r.finish_s - r.first_token_s) / (len(r.tokens) - 1) for r in results if len(r.tokens) > 1]
    decoding = [s for s in stats.steps if s.rows - s.prefill_rows - s.idle_rows > 0]
    return {
        "requests": len(results),
        "tokens": tokens,
        "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan if makespan > 0 else float("inf"),
        "ttft_s": distribution([r.first_token_s - r.arrival_s for r in results]),
        "tpot_s": distribution(tpot),
        "latency_s": distribution([r.finish_s - r.arrival_s for r in results]),
        "returned_latency_s": distribution([r.returned - r.arrival_s for r in results]),  # differs for dynamic only
        "steps": len(stats.steps),
        "decode_steps": len(decoding),
        "decode_s": float(sum(s.end_s - s.start_s for s in decoding)),
        "mean_batch": float(np.mean([s.rows - s.prefill_rows - s.idle_rows for s in decoding])) if decoding else 0.0,
        "rows": int(sum(s.rows for s in stats.steps)),
        "idle_rows": int(sum(s.idle_rows for s in stats.steps)),
        "moves": stats.moves,
        "preemptions": stats.preemptions,
        "kv_budget_bytes": int(kv_budget),
        "kv_mean_bytes": float(np.mean([s.kv_bytes for s in stats.steps])) if stats.steps else 0.0,
        "kv_peak_bytes": int(max((s.kv_bytes for s in stats.steps), default=0)),
    }
