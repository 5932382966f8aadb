"""The API fuzzed from its own OpenAPI document: valid and invalid requests alike, no 500 and no hang.

Bounded: a few hundred cases on the loopback port of a server in this process, each allowed 20 s.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, settings

from flover.runner import PolicyConfig
from flover.server.local import serve_in_thread
from flover.server.openapi import document

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

CASES = 200


@pytest.fixture(scope="module")
def server():
    with serve_in_thread(policy=PolicyConfig("fused", slots=16)) as running:
        yield running


schema = schemathesis.openapi.from_dict(document("test"))  # what GET /openapi.json serves (checked below)


def test_the_served_document_is_the_one_fuzzed(server):
    assert httpx.get(f"{server.url}/openapi.json").json()["paths"] == schema.raw_schema["paths"]


@schema.parametrize()
@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_request_makes_the_server_fail_or_hang(case, server):
    response = case.call(base_url=server.url, timeout=20)  # a hang raises here
    case.validate_response(response, checks=[not_a_server_error])


def test_after_the_fuzz_the_server_is_idle_and_healthy(server):
    health = httpx.get(f"{server.url}/health", timeout=5).json()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    assert server.service.live.error is None and not server.service.open
