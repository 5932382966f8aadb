"""``flover bench --url``: a trace replayed over HTTP, as a ``RunResult`` that the report, JSON and plots take."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from flover.engine.request import Request
from flover.loadgen import ClientResult, replay
from flover.metrics import summarize
from flover.runner import RunResult
from flover.slo import serving_metrics

BATCH = ("flover_batch_size_sum", "flover_batch_size_count")  # a flover server's fused batch, from its /metrics


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Stands where an in-process run has its PolicyConfig: the server, and its policy if it tells."""

    url: str
    policy: str = "server"  # flover's /health names its policy; other servers do not
    policy_label: str = ""

    @property
    def label(self) -> str:
        return f"{self.policy_label or 'server'} over HTTP"


def server_config(url: str, timeout_s: float = 10.0) -> ServerConfig:
    try:
        health = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s).json()
        label = str(health.get("policy") or "")
    except (httpx.HTTPError, ValueError, AttributeError):
        label = ""
    return ServerConfig(url, label.split(" ")[0] if label else "server", label)


def scrape(url: str, names: Sequence[str], timeout_s: float = 10.0) -> dict[str, float]:
    """Unlabelled samples of ``GET /metrics`` (Prometheus text); {} from a server without them."""
    try:
        text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout_s).text
    except httpx.HTTPError:
        return {}
    samples = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            samples[name] = float(value)
    return samples


def http_run(url: str, requests: Sequence[Request], model: str | None, slo: dict[str, float], timeout_s: float = 600.0,
             on_finish: Callable[[ClientResult], None] | None = None) -> tuple[RunResult, list[ClientResult]]:  # fmt: skip
    """The run over the requests the server answered in full, and the ones it did not."""
    config = server_config(url)
    before = scrape(url, BATCH)
    results = asyncio.run(replay(url, requests, model, timeout_s, on_finish))
    after = scrape(url, BATCH)
    served = [r for r in results if r.ok]
    metrics = summarize(served)
    if served:
        metrics.update(serving_metrics(served, len(results) - len(served), metrics["makespan_s"], slo))
        steps = after.get(BATCH[1], 0.0) - before.get(BATCH[1], 0.0)
        if steps > 0:  # the server is flover: its mean fused batch over the run
            metrics["mean_batch"] = (after[BATCH[0]] - before[BATCH[0]]) / steps
            metrics["decode_steps"] = int(steps)
    else:
        metrics["failed"] = len(results)
    return RunResult(config, served, metrics=metrics), [r for r in results if not r.ok]
