"""What ``GET /metrics`` shows, in the Prometheus text format.

Names follow Prometheus' conventions (``_total`` counters, ``_seconds``
histograms) and vLLM's choice of figures: requests running and waiting,
requests by outcome, time to first token, time per output token, end-to-end
latency, and the fused batch of every decode step. Each server has its own
registry, so one process (a test) can run several.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from flover.engine import LiveEngine, RequestResult, Step

OUTCOMES = ("length", "stop", "cancelled", "rejected", "invalid", "error")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # a *_created sample per series says only when the server started


class ServerMetrics:
    def __init__(self, live: LiveEngine) -> None:
        self.registry = r = CollectorRegistry()
        Gauge("flover_requests_running", "requests in KV memory, being computed", registry=r).set_function(
            lambda: live.running)
        Gauge("flover_requests_waiting", "accepted requests waiting for KV memory", registry=r).set_function(
            lambda: live.waiting)
        self.requests = Counter("flover_requests", "requests by outcome: length, stop (finished); cancelled (the "
                                "client went away); rejected (queue full, shutting down); invalid (4xx); error (500)",
                                ["outcome"], registry=r)  # fmt: skip
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome shows, at 0 until it happens
        self.prompt_tokens = Counter("flover_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("flover_generation_tokens", "tokens generated", registry=r)
        self.queue_time = Histogram("flover_request_queue_time_seconds", "arrival to admission into KV memory",
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("flover_time_to_first_token_seconds", "arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("flover_time_per_output_token_seconds", "first to last token, per token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("flover_e2e_request_latency_seconds", "arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch = Histogram("flover_batch_size", "requests decoded in each step: the fused batch",
                               buckets=BATCH_BUCKETS, registry=r)  # fmt: skip

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def finished(self, result: RequestResult, outcome: str) -> None:
        """A request the engine handed back (on the engine's thread)."""
        self.count(outcome)
        for histogram, start, end in ((self.queue_time, result.arrival_s, result.admitted_s),
                                      (self.ttft, result.arrival_s, result.first_token_s),
                                      (self.latency, result.arrival_s, result.finish_s)):  # fmt: skip
            if outcome != "cancelled" and math.isfinite(end - start):
                histogram.observe(end - start)
        if outcome != "cancelled" and len(result.tokens) > 1 and math.isfinite(result.finish_s - result.first_token_s):
            self.tpot.observe((result.finish_s - result.first_token_s) / (len(result.tokens) - 1))

    def steps(self, steps: list[Step]) -> None:
        for step in steps:
            decodes = step.rows - step.prefill_rows - step.idle_rows
            if decodes > 0:
                self.batch.observe(decodes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
