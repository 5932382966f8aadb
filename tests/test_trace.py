"""Trace files: round trips, and every bad number named by line, key, value and limit before anything runs."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from flover.cli import main
from flover.engine.request import Request
from flover.trace import MAX_ARRIVAL_S, TraceError, poisson_trace, read_trace, write_trace
from reference import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
GOOD = '{"id": 0, "arrival_s": 0, "prompt_ids": [1, 2], "max_new_tokens": 2}'
FINITE = "must be a finite number (|x| <= 1.8e308, no NaN or Infinity)"
BAD = {  # a line's text -> what its error names: key, limit, value as written
    "nan": ('{"id": 1, "arrival_s": NaN, "prompt_ids": [1], "max_new_tokens": 2}', f"arrival_s {FINITE}, got NaN"),
    "inf": ('{"id": 1, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2, "top_p": Infinity}',
            f"top_p {FINITE}, got Infinity"),
    "-inf": ('{"id": 1, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2, "temperature": -Infinity}',
             f"temperature {FINITE}, got -Infinity"),
    "overflow": ('{"id": 1, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2, "temperature": 1e309}',
                 f"temperature {FINITE}, got 1e309"),
    "in a list": ('{"id": 1, "arrival_s": 0, "prompt_ids": [1, NaN], "max_new_tokens": 2}',
                  f"prompt_ids[1] {FINITE}, got NaN"),
    "big int": ('{"id": 1, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2, "temperature": 1' + "0" * 400 + "}",
                f"temperature {FINITE}, got 1000"),
    "far arrival": ('{"id": 1, "arrival_s": 1e308, "prompt_ids": [1], "max_new_tokens": 2}',
                    f"arrival_s must be a number >= 0 and <= {MAX_ARRIVAL_S} (MAX_ARRIVAL_S, a week), got 1e+308"),
    "text number": ('{"id": 1, "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 2, "temperature": "hot"}',
                    "temperature must be a number, got 'hot'"),
    "key twice": ('{"id": 1, "arrival_s": 0, "arrival_s": 5, "prompt_ids": [1], "max_new_tokens": 2}',
                  "key 'arrival_s' appears twice"),
}  # fmt: skip


def bad_trace(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + BAD[case][0] + "\n")
    return path


def test_written_trace_reads_back_equal(tmp_path):
    requests = poisson_trace(50.0, 5, (2, 6), (1, 4), seed=3)
    requests.append(Request("x", 0.5, (3,), 2, SamplingParams(0.7, 40, 0.9, 11), stop_ids=(5,)))
    out = io.StringIO()
    write_trace(requests, out)
    path = tmp_path / "t.jsonl"
    path.write_text(out.getvalue())
    assert read_trace(path) == requests


def test_absurd_but_finite_temperature_is_accepted(tmp_path):
    path = tmp_path / "hot.jsonl"
    path.write_text(GOOD.replace("}", ', "temperature": 1e300}') + "\n")
    assert read_trace(path)[0].sampling.temperature == 1e300


def test_arrival_at_the_limit_is_accepted_and_poisson_stays_within_it(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text(GOOD.replace('"arrival_s": 0', f'"arrival_s": {MAX_ARRIVAL_S}') + "\n")
    assert read_trace(path)[0].arrival_s == MAX_ARRIVAL_S
    with pytest.raises(ValueError, match="MAX_ARRIVAL_S"):
        poisson_trace(1e-9, 3, (1, 2), (1, 2))


@pytest.mark.parametrize("case", BAD)
def test_bad_number_is_named_by_line_key_value_and_limit(tmp_path, case):
    with pytest.raises(TraceError) as error:
        read_trace(bad_trace(tmp_path, case))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'bad.jsonl'}:2: {BAD[case][1]}") and "\n" not in message


@pytest.mark.parametrize("case", ["nan", "overflow", "far arrival"])
def test_bench_reports_bad_trace_in_one_line_with_status_2(tmp_path, capsys, case):
    status = main(["bench", "--trace", str(bad_trace(tmp_path, case)), "--model", "tiny", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("flover: error: ") and err.count("\n") == 1 and BAD[case][1] in err


def test_far_arrival_from_the_command_line_is_one_line_not_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flover.cli", "bench", "--trace", str(bad_trace(tmp_path, "far arrival")),
                           "--model", "tiny", "--quiet"], capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("flover: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
