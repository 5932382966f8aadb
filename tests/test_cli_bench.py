"""`flover trace` and `flover bench`: outputs, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from flover.cli import main
from flover.trace import read_trace

TRACE_FLAGS = ["--requests", "6", "--rate", "50", "--prompt-len", "3:6", "--output-len", "2:5"]


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def trace_file(tmp_path, capsys):
    status, out, _ = run(capsys, "trace", *TRACE_FLAGS, "--seed", "3")
    assert status == 0
    path = tmp_path / "trace.jsonl"
    path.write_text(out)
    return path


def test_trace_is_jsonl_with_the_documented_keys(trace_file):
    lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert len(lines) == 6
    assert set(lines[0]) == {"id", "arrival_s", "prompt_ids", "max_new_tokens", "temperature", "top_k", "top_p",
                             "seed", "stop_ids"}  # fmt: skip
    assert [r.arrival_s for r in read_trace(trace_file)] == sorted(r["arrival_s"] for r in lines)


def test_bench_json_has_every_request_with_its_tokens(trace_file, tmp_path, capsys):
    out_json = tmp_path / "run.json"
    status, out, _ = run(capsys, "bench", "--model", "tiny", "--policy", "fused", "--slots", "3",
                         "--trace", trace_file, "--json", out_json, "--quiet")  # fmt: skip
    assert status == 0 and "fused (slots 3)" in out
    record = json.loads(out_json.read_text())
    assert record["policy"] == "fused" and record["config"]["slots"] == 3
    requests = {r["id"]: r for r in record["requests"]}
    trace = {r.id: r for r in read_trace(trace_file)}
    assert set(requests) == set(trace)
    for rid, r in requests.items():
        assert len(r["tokens"]) == trace[rid].max_new_tokens
        assert r["arrival_s"] <= r["first_token_s"] <= r["finish_s"]
    assert {"ttft_s", "tpot_s", "latency_s", "throughput_tok_s", "makespan_s", "mean_batch"} <= set(record["metrics"])


def test_bench_all_runs_every_policy_with_same_tokens_and_plots(trace_file, tmp_path, capsys):
    status, out, _ = run(capsys, "bench", "--model", "tiny", "--policy", "all", "--slots", "3", "--max-batch", "3",
                         "--trace", trace_file, "--json", tmp_path / "all.json", "--plot", tmp_path / "plots", "--quiet")
    assert status == 0
    runs = json.loads((tmp_path / "all.json").read_text())
    assert [r["policy"] for r in runs] == ["fused", "fused", "serial", "dynamic", "instances"]
    tokens = [{r["id"]: r["tokens"] for r in run["requests"]} for run in runs]
    assert all(t == tokens[0] for t in tokens)
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "latency_cdf.png" in pngs and len(pngs) == 6
    assert all((tmp_path / "plots" / name).stat().st_size > 10_000 for name in pngs)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "trace.jsonl:2: Expecting property name"),
        ('{"id": 9, "arrival_s": 0, "prompt_ids": [1]}', "trace.jsonl:2: missing key 'max_new_tokens'"),
        ('{"id": 9, "arrival_s": -1, "prompt_ids": [1], "max_new_tokens": 2}', "trace.jsonl:2: arrival_s must be a number >= 0"),
        ('{"id": 9, "arrival_s": 0, "prompt_ids": [1, "a"], "max_new_tokens": 2}', "trace.jsonl:2: prompt_ids must be a list"),
        ('{"id": 9, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2, "colour": 1}', "trace.jsonl:2: unknown key 'colour'"),
        ('{"id": 9, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2, "top_p": 2}', "top_p must be in (0, 1]"),
        ('{"id": 0, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2}', "trace.jsonl:2: duplicate id 0"),
    ],
)
def test_malformed_trace_line_is_named(tmp_path, capsys, line, message):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"id": 0, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2}\n' + line + "\n")
    status, _, err = run(capsys, "bench", "--model", "tiny", "--trace", path, "--quiet")
    assert status == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-len", "300:300"], "request 0: prompt of 300 tokens + max_new_tokens"),
        (["--output-len", "250:250", "--prompt-len", "10:10"], "prompt of 10 tokens + max_new_tokens 250 = 260"),
        (["--slots", "0"], "slots must be >= 1, got 0"),
        (["--policy", "fastest"], "unknown policy 'fastest'"),
        (["--max-batch", "0", "--policy", "dynamic"], "max-batch must be >= 1, got 0"),
        (["--rate", "0"], "rate must be > 0 requests per second, got 0.0"),
        (["--prompt-len", "5:2"], "--prompt-len must be A:B with 1 <= A <= B, got '5:2'"),
        (["--trace", "/nonexistent.jsonl"], "trace file '/nonexistent.jsonl' does not exist"),
        (["--kv", "pages"], "argument --kv: invalid choice: 'pages'"),
        (["--block-size", "0", "--kv", "paged"], "block-size must be >= 1, got 0"),
        (["--chunk-tokens", "0", "--prefill", "chunked"], "chunk-tokens must be >= 1, got 0"),
        (["--kv-memory", "0.0001"], "--kv-memory 0.0001 GiB holds no slot of 256 positions"),
        (["--kv-memory", "-1"], "kv-memory must be > 0 GiB, got -1"),
        (["--queue-delay-ms", "-5", "--policy", "dynamic"], "queue delay must be >= 0 ms, got -5"),
    ],
)
def test_bad_bench_input_gets_one_line_and_status_2(capsys, argv, message):
    status, _, err = run(capsys, "bench", "--model", "tiny", "--requests", "2", "--quiet", *argv)
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_demo_runs_every_policy_and_writes_plots(tmp_path, capsys):
    status, out, _ = run(capsys, "demo", "--out", tmp_path / "demo")
    assert status == 0 and "fused (slots 16)" in out and "instances (2)" in out
    assert len(json.loads((tmp_path / "demo" / "runs.json").read_text())) == 5
    assert (tmp_path / "demo" / "latency_cdf.png").is_file()


def test_bench_paged_and_chunked_rows_are_labelled_and_return_the_same_tokens(trace_file, tmp_path, capsys):
    status, out, _ = run(capsys, "bench", "--model", "tiny", "--policy", "all", "--kv", "paged", "--block-size", "8",
                         "--prefill", "chunked", "--chunk-tokens", "4", "--trace", trace_file, "--json",
                         tmp_path / "paged.json", "--quiet")  # fmt: skip
    assert status == 0 and "fused (paged 8, chunked 4)" in out, out
    runs = json.loads((tmp_path / "paged.json").read_text())
    assert [r["policy"] for r in runs] == ["fused", "serial", "dynamic", "instances"]
    assert runs[0]["config"]["kv"] == "paged" and runs[0]["config"]["prefill"] == "chunked"
    tokens = [{r["id"]: r["tokens"] for r in run["requests"]} for run in runs]
    assert all(t == tokens[0] for t in tokens)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--slots", "5000"], "GiB), more than the"),
        (["--policy", "instances", "--instances", "1000"], "1000 instance copies"),
    ],
)
def test_a_run_larger_than_the_machine_is_refused_before_allocating(capsys, argv, message):
    status, _, err = run(capsys, "bench", "--model", "gpt2", "--requests", "2", "--quiet", *argv)
    assert status == 2 and err.count("\n") == 1 and message in err and "available; lower" in err, err
