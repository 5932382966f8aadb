"""`flover serve` on a free loopback port in this process: OpenAI's client, concurrency, errors, metrics, stops."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flover.backends import make_backend
from flover.engine import Request
from flover.loadgen import replay
from flover.loading import resolve
from flover.runner import PolicyConfig
from flover.server.local import serve_in_thread
from reference import SamplingParams, generate

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def model():
    return resolve(None)  # the shipped model: config, weights, tokenizer


@pytest.fixture(scope="module")
def server():
    with serve_in_thread(policy=PolicyConfig("fused", slots=16)) as running:
        yield running


def serial(model, prompt_ids, max_new_tokens: int, sampling: SamplingParams = SamplingParams(), stop_ids=()) -> list[int]:
    config, weights, _ = model
    return [int(t) for t in generate(make_backend("numpy", config, weights, 1), prompt_ids, max_new_tokens, sampling,
                                     stop_ids)]  # fmt: skip


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def wait_for(condition, within_s: float) -> float:
    """Seconds until ``condition()`` held; fails if it did not within ``within_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within_s, f"not within {within_s} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_the_openai_client_streams_exactly_the_tokens_of_flover_generate(server, capsys):
    openai = pytest.importorskip("openai")
    from flover.cli import main

    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "48", "--json"]) == 0
    truth = json.loads(capsys.readouterr().out)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    chunks = list(client.completions.create(model=server.service.name, prompt=PROMPT, max_tokens=48, temperature=0,
                                            stream=True, extra_body={"return_token_ids": True}))  # fmt: skip
    ids = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
    assert ids == truth["tokens"] and "".join(c.choices[0].text for c in chunks) == truth["text"]
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 47 + ["length"]
    assert chunks[-1].usage.completion_tokens == 48 and chunks[-1].usage.prompt_tokens == len(truth["prompt_ids"])
    whole = client.completions.create(model=server.service.name, prompt=PROMPT, max_tokens=48, temperature=0)
    assert whole.choices[0].text == truth["text"] and whole.usage.total_tokens == 48 + len(truth["prompt_ids"])


def test_64_concurrent_streams_each_equal_serial_decoding(server, model):
    rng = np.random.default_rng(7)
    trace = [Request(i, 0.0, tuple(int(t) for t in rng.integers(0, 256, rng.integers(2, 24))), int(rng.integers(4, 24)),
                     SamplingParams(0.8, 20, 0.95, seed=i) if i % 2 else SamplingParams(seed=i)) for i in range(64)]  # fmt: skip
    steps_before = metric(server, "flover_batch_size_count")
    batch_before = metric(server, "flover_batch_size_sum")
    results = asyncio.run(replay(server.url, trace, server.service.name))
    assert [r.error for r in results] == [None] * 64
    for request, result in zip(trace, results):
        assert result.tokens == serial(model, request.prompt_ids, request.max_new_tokens, request.sampling), request.id
    steps = metric(server, "flover_batch_size_count") - steps_before
    assert (metric(server, "flover_batch_size_sum") - batch_before) / steps > 4, "the streams were fused"


def test_a_full_queue_answers_429_at_once_and_loses_nothing(model, monkeypatch):
    with serve_in_thread(policy=PolicyConfig("fused", slots=2), max_waiting=2) as server:
        slow_down(server, monkeypatch)
        trace = [Request(i, 0.0, (10 + i, 32, 97), 64, SamplingParams(seed=i)) for i in range(12)]
        results = asyncio.run(replay(server.url, trace, server.service.name))
        refused, served = [r for r in results if r.status == 429], [r for r in results if r.ok]
        assert refused and len(refused) + len(served) == 12, [r.error for r in results]
        assert all("--max-waiting is 2" in r.error for r in refused)
        assert max(r.finish_s for r in refused) < min(r.finish_s for r in served), "refused before any finished"
        for result in served:
            request = trace[result.id]
            assert result.tokens == serial(model, request.prompt_ids, 64, request.sampling)
        assert metric(server, "flover_requests_total", outcome="rejected") == len(refused)
        assert metric(server, "flover_requests_total", outcome="length") == len(served)


def slow_down(server, monkeypatch) -> None:
    """Each step of the server's engine takes 5 ms more, so a long request still runs when the test acts."""
    backend = server.service.engine.backend
    step = backend.step

    def slow_step(lanes):
        time.sleep(0.005)
        return step(lanes)

    monkeypatch.setattr(backend, "step", slow_step)


@pytest.fixture
def slow_steps(server, monkeypatch):
    slow_down(server, monkeypatch)


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "waiting-for-the-whole-answer"])
def test_a_client_that_disconnects_frees_its_memory_within_a_second(server, slow_steps, stream):
    cancelled = metric(server, "flover_requests_total", outcome="cancelled")
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "x", "max_tokens": 250, "stream": stream}).encode()
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        if stream:
            received = b""
            while received.count(b"data: ") < 3:  # three tokens have come
                received += client.recv(4096)
        wait_for(lambda: metric(server, "flover_requests_running") == 1, within_s=5.0)
    assert wait_for(lambda: metric(server, "flover_requests_running") == 0, within_s=1.0) < 1.0
    assert wait_for(lambda: metric(server, "flover_requests_total", outcome="cancelled") == cancelled + 1, 1.0) < 1.0


BAD = [  # (raw body, the field named, words the message must hold)
    ('{"prompt": "a", ', None, "not valid JSON"),
    ("[1, 2]", None, "must be a JSON object"),
    ('{"prompt": "a", "prompt": "b"}', None, "appears twice"),
    ('{"prompt": "a", "max_tokens": NaN}', None, "NaN"),
    ('{"max_tokens": 4}', "prompt", "is required"),
    ('{"prompt": "a", "max_tokens": "5"}', "max_tokens", "an integer >= 1, got '5'"),
    ('{"prompt": "a", "temperature": "hot"}', "temperature", "from 0 to 2"),
    ('{"prompt": "a", "stream": "yes"}', "stream", "true or false"),
    ('{"prompt": "a", "best_of": 2}', "best_of", "unknown field"),
    ('{"prompt": "a", "stream_options": {"include_usage": 1}}', "stream_options", "include_usage"),
    (json.dumps({"prompt": "x" * 300}), "prompt", "n_ctx is 256"),
    ('{"prompt": "a", "max_tokens": 0}', "max_tokens", ">= 1, got 0"),
    (json.dumps({"prompt": "a" * 100, "max_tokens": 200}), "max_tokens", "exceeds the context n_ctx 256; at most 156"),
    ('{"prompt": [1, 2, 256]}', "prompt", "prompt[2] = 256 is outside the vocabulary 0..255"),
    ('{"prompt": [1, -2]}', "prompt", "token ids"),
    ('{"prompt": []}', "prompt", "non-empty"),
    ('{"prompt": [1], "stop_token_ids": [999]}', "stop_token_ids", "outside the vocabulary 0..255"),
    ('{"prompt": "a", "n": 2}', "n", "1 (this server returns one choice per request), got 2"),
    ('{"prompt": "a", "logprobs": 9}', "logprobs", "from 0 to 5"),
    ('{"prompt": "a", "top_p": 0}', "top_p", "(0, 1]"),
    ('{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', "stop", "at most 4"),
    ('{"prompt": "\\ud800"}', "prompt", "not valid Unicode"),
]  # fmt: skip


@pytest.mark.parametrize("raw, param, words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_a_bad_request_gets_400_naming_the_field_and_its_limit(server, raw, param, words):
    invalid = metric(server, "flover_requests_total", outcome="invalid")
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"] and (param is None or param in error["message"]), error["message"]
    assert "Traceback" not in r.text and metric(server, "flover_requests_total", outcome="invalid") == invalid + 1


def test_an_unknown_model_is_404_and_a_huge_body_413(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "tiny-py" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_an_internal_error_is_a_500_without_a_traceback_and_the_server_keeps_serving(server, monkeypatch):
    from flover.server.text import TextStream

    def broken(self, token):
        raise RuntimeError("a secret detail")

    errors = metric(server, "flover_requests_total", outcome="error")
    monkeypatch.setattr(type(server.service.tokenizer), "encode", lambda self, text: broken(self, 0))
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    monkeypatch.undo()
    monkeypatch.setattr(TextStream, "add", broken)  # now the stream has begun when it fails
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 50, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and json.loads(events[0])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
    assert "secret" not in r.text
    monkeypatch.undo()
    wait_for(lambda: metric(server, "flover_requests_running") == 0, within_s=1.0)
    assert metric(server, "flover_requests_total", outcome="error") == errors + 2
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_stop_strings_and_stop_token_ids_end_the_text_before_them(server, model):
    tokenizer = model[2]
    truth = serial(model, tokenizer.encode(PROMPT), 48)
    text = tokenizer.decode(truth)
    stop = text[20:23]
    for stream in (False, True):
        body = {"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stop": [stop, "never"], "stream": stream}
        got = complete(server, body)
        assert got["text"] == text[: text.index(stop)] and got["finish_reason"] == "stop"
        cut = truth.index(truth[9])
        got = complete(server, {**body, "stop": None, "stop_token_ids": [truth[9]]})
        assert got["text"] == tokenizer.decode(truth[:cut]) and got["finish_reason"] == "stop"
        assert got["usage"]["completion_tokens"] == cut + 1
    wait_for(lambda: metric(server, "flover_requests_running") == 0, within_s=1.0)


def complete(server, body: dict) -> dict:
    """A completion's text, finish reason and usage, from a whole answer or a stream."""
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        choice = r.json()["choices"][0]
        return {"text": choice["text"], "finish_reason": choice["finish_reason"], "usage": r.json()["usage"]}
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    return {"text": "".join(e["choices"][0]["text"] for e in events), "usage": events[-1]["usage"],
            "finish_reason": events[-1]["choices"][0]["finish_reason"]}  # fmt: skip


def test_logprobs_name_the_sampled_token_and_the_likeliest(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 3})
    logprobs = r.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 5 and all(len(top) == 3 for top in logprobs["top_logprobs"])
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert lp == max(top.values()) == top[token] and lp <= 0, "greedy takes the likeliest"


def test_models_health_metrics_and_the_openapi_document(server):
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny-py"] and models[0]["max_model_len"] == 256
    assert httpx.get(f"{server.url}/health").json()["policy"] == "fused (slots 16)"
    names = {f.name for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    assert {"flover_requests_running", "flover_requests_waiting", "flover_requests", "flover_time_to_first_token_seconds",
            "flover_time_per_output_token_seconds", "flover_e2e_request_latency_seconds", "flover_batch_size"} <= names
    assert "/v1/completions" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    r = httpx.get(f"{server.url}/nowhere")
    assert r.status_code == 404 and "error" in r.json()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine's thread dies
def test_an_engine_that_fails_answers_its_streams_and_later_requests_with_an_error(monkeypatch):
    with serve_in_thread(policy=PolicyConfig("fused", slots=2)) as server:
        backend = server.service.engine.backend
        step, steps = backend.step, iter(range(10**9))

        def failing_step(lanes):
            if next(steps) == 5:
                raise RuntimeError("a secret detail")
            return step(lanes)

        monkeypatch.setattr(backend, "step", failing_step)
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 50, "stream": True})
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "engine_failed" and events[-1] == "[DONE]"
        assert "secret" not in r.text
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        assert httpx.get(f"{server.url}/health").status_code == 503
