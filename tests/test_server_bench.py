"""`flover bench --url`: the same trace over HTTP gives the in-process tokens, the same table, JSON and plots,
and vLLM's figures (ITL, goodput); failures are reported, not averaged in."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flover.cli import main
from flover.runner import PolicyConfig
from flover.server.local import serve_in_thread
from flover.slo import parse_goodput

ROOT = Path(__file__).resolve().parent.parent
TRACE = ["--requests", "12", "--rate", "200", "--prompt-len", "4:12", "--output-len", "4:16", "--seed", "3", "--quiet"]


def test_bench_over_http_gives_the_in_process_tokens_table_json_and_plots(tmp_path, capsys):
    with serve_in_thread(policy=PolicyConfig("fused", slots=8)) as server:
        assert main(["bench", *TRACE, "--url", server.url, "--goodput", "ttft:60000", "tpot:60000",
                     "--json", str(tmp_path / "http.json"), "--plot", str(tmp_path / "plots")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "fused (slots 8) over HTTP" in out and "x fused" in out, "the in-process table"
    assert "inter-token latency" in out and "12 of 12 met ttft <= 60000 ms, tpot <= 60000 ms" in out
    assert main(["bench", *TRACE, "--slots", "8", "--json", str(tmp_path / "one.json")]) == 0
    http, one = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("http", "one"))
    assert [r["tokens"] for r in http["requests"]] == [r["tokens"] for r in one["requests"]]
    metrics = http["metrics"]
    assert metrics["failed"] == 0 and metrics["good_requests"] == 12 and metrics["itl_s"]["mean"] > 0
    assert metrics["mean_batch"] >= 1, "the server's fused batch, from its /metrics"
    assert http["config"]["policy"] == "fused" and http["config"]["url"] == server.url
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"timeline_0_fused.png", "latency_cdf.png"}


def test_bench_over_http_reports_refused_requests_apart_and_exits_1(capsys):
    with serve_in_thread(policy=PolicyConfig("fused", slots=1), max_waiting=1) as server:
        assert main(["bench", *TRACE, "--output-len", "200", "--rate", "10000", "--url", server.url]) == 1
    out = capsys.readouterr().out
    served, failed = map(int, re.search(r"(\d+) requests served, (\d+) failed", out).groups())
    assert served >= 1 and failed >= 1 and served + failed == 12
    assert out.count("failed: HTTP 429: the server is full") == min(failed, 5), "the first five failures, named"


def test_bench_over_http_names_an_unreachable_server_or_a_policy_flag_in_one_line(capsys):
    assert main(["bench", *TRACE, "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach http://127.0.0.1:9" in err
    assert main(["bench", *TRACE, "--url", "http://127.0.0.1:9", "--policy", "all"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the server's policy" in err and "drop --policy all" in err


@pytest.mark.parametrize("items, words", [(["ttft:500", "tpot:50"], None), (["itl:5"], "one of ttft, tpot, e2el"),
                                          (["ttft:fast"], "not a number"), (["e2el:0"], "> 0"),
                                          (["ttft:inf"], "finite")])  # fmt: skip
def test_goodput_objectives_are_checked(items, words):
    if words is None:
        assert parse_goodput(items) == {"ttft": 0.5, "tpot": 0.05}
        return
    with pytest.raises(ValueError, match=words):
        parse_goodput(items)


def test_the_serving_http_benchmark_runs_quick():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving_http.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| fused (slots 8) over HTTP |" in done.stdout
    assert "token-identical, every run against the in-process one: yes" in done.stdout
