"""Serving metrics: time to first token, time per output token, latency, throughput."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flover.engine import Step
from flover.request import RequestResult


def distribution(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    v = np.asarray(values, np.float64)
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: Sequence[RequestResult], steps: Sequence[Step] = ()) -> dict:
    """Per-run summary; times in seconds, throughput in generated tokens per second."""
    if not results:
        return {"requests": 0, "tokens": 0}
    tokens = sum(len(r.tokens) for r in results)
    makespan = max(r.finish_s for r in results) - min(r.arrival_s for r in results)
    tpot = [(r.finish_s - r.first_token_s) / (len(r.tokens) - 1) for r in results if len(r.tokens) > 1]
    batch = [s.batch for s in steps]
    return {
        "requests": len(results),
        "tokens": tokens,
        "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan if makespan > 0 else float("inf"),
        "ttft_s": distribution([r.first_token_s - r.arrival_s for r in results]),
        "tpot_s": distribution(tpot),
        "latency_s": distribution([r.finish_s - r.arrival_s for r in results]),
        "returned_latency_s": distribution([r.returned - r.arrival_s for r in results]),  # differs for dynamic only
        "decode_steps": len(steps),
        "decode_s": float(sum(s.end_s - s.start_s for s in steps)),
        "mean_batch": float(np.mean(batch)) if batch else float("nan"),
        "wasted_lanes": int(sum(s.width - s.batch for s in steps)),  # rows computed for no request: holes, padding
        "lanes": int(sum(s.width for s in steps)),
    }
