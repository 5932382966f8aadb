"""Service-level objectives: goodput, inter-token latency, and the figures vLLM's serving benchmark prints.

Goodput (DistServe's measure, vLLM's ``--goodput``) counts only the requests
that met every objective given: ``ttft:MS`` (time to first token),
``tpot:MS`` (time per output token after the first) and ``e2el:MS``
(end-to-end latency), per second of the run. Inter-token latency is the gap
between two chunks of new tokens as a streaming client receives them, so
only an HTTP run (``flover bench --url``) has it; an in-process run records
no per-token times.
"""

from __future__ import annotations

from collections.abc import Sequence

from flover.metrics import distribution

OBJECTIVES = {"ttft": "time to first token", "tpot": "time per output token", "e2el": "end-to-end latency"}


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` (milliseconds) -> ``{"ttft": 0.5, "tpot": 0.05}`` (seconds)."""
    slo = {}
    for item in items:
        key, _, ms = item.partition(":")
        if key not in OBJECTIVES:
            raise ValueError(f"--goodput {item!r}: the objective must be one of {', '.join(OBJECTIVES)}, as KEY:MS")
        try:
            value = float(ms)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {ms!r} is not a number of milliseconds") from None
        if not value > 0 or value == float("inf"):
            raise ValueError(f"--goodput {item!r}: the limit must be a finite number of milliseconds > 0")
        slo[key] = value / 1e3
    return slo


def figures(result) -> dict[str, float]:
    """A request's ttft, tpot (0 for a one-token answer, as vLLM counts it) and e2el, in seconds."""
    n = len(result.tokens)
    tpot = (result.finish_s - result.first_token_s) / (n - 1) if n > 1 else 0.0
    return {"ttft": result.first_token_s - result.arrival_s, "tpot": tpot, "e2el": result.finish_s - result.arrival_s}


def serving_metrics(results: Sequence, failed: int, makespan_s: float, slo: dict[str, float]) -> dict:
    """What vLLM's benchmark adds to ``flover.metrics.summarize``: request rate, failures, ITL, goodput."""
    gaps = [b - a for r in results for a, b in zip(getattr(r, "token_times", ())[:-1], getattr(r, "token_times", ())[1:])]
    good = sum(all(figures(r)[k] <= limit for k, limit in slo.items()) for r in results)
    return {
        "failed": failed,
        "request_throughput_req_s": len(results) / makespan_s if makespan_s > 0 else float("nan"),
        "itl_s": distribution(gaps) if any(hasattr(r, "token_times") for r in results) else None,
        "slo_s": slo,
        "good_requests": good if slo else None,
        "goodput_req_s": good / makespan_s if slo and makespan_s > 0 else None,
    }


def summary(label: str, m: dict) -> str:
    """vLLM's figures for one run: throughput, goodput, and TTFT, TPOT, ITL, E2EL as mean, median, p99."""
    lines = [f"{label}: {m['requests']} requests served, {m.get('failed', 0)} failed, in {m['makespan_s']:.2f} s; "
             f"{m.get('request_throughput_req_s', float('nan')):.2f} requests/s, {m['throughput_tok_s']:.1f} output tokens/s"]
    if m.get("goodput_req_s") is not None:
        limits = ", ".join(f"{k} <= {v * 1e3:g} ms" for k, v in m["slo_s"].items())
        lines.append(f"  goodput {m['goodput_req_s']:.2f} requests/s ({m['good_requests']} of {m['requests']} met "
                     f"{limits})")  # fmt: skip
    lines.append(f"  {'ms':<22}{'mean':>10}{'median':>10}{'p99':>10}")
    rows = (("time to first token", m["ttft_s"]), ("time per output token", m["tpot_s"]),
            ("inter-token latency", m.get("itl_s")), ("end-to-end latency", m["latency_s"]))  # fmt: skip
    for name, d in rows:
        if d is not None:
            lines.append(f"  {name:<22}" + "".join(f"{d[k] * 1e3:>10.1f}" for k in ("mean", "p50", "p99")))
    return "\n".join(lines)
