"""`flover simulate` and `flover calibrate`: labelled output, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from flover.cli import main
from flover.sim.device import DEVICES

ROOT = Path(__file__).resolve().parent.parent
TRACE = ["--requests", "6", "--rate", "40", "--prompt-len", "4:8", "--output-len", "3:9"]


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_simulate_says_simulated_on_the_device_in_table_json_and_plots(tmp_path, capsys):
    status, out, _ = run(capsys, "simulate", "--device", "h100-sxm", "--model", "gptj-6b", "--policy", "all",
                         "--slots", "4", "--max-batch", "4", *TRACE, "--json", tmp_path / "runs.json", "--quiet",
                         "--plot", tmp_path / "plots")  # fmt: skip
    assert status == 0
    assert out.splitlines()[0].startswith("simulated on h100-sxm (gptj-6b, fp16)")
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [r["policy"] for r in runs] == ["fused", "fused", "serial", "dynamic", "instances"]
    assert all(r["simulated_on"] == "h100-sxm" and r["simulation"].startswith("simulated on") for r in runs)
    asked = {r["id"]: r for r in runs[0]["requests"]}
    for r in runs:  # every request once, with the tokens the trace asks for, the same under every policy
        assert {q["id"]: q["tokens"] for q in r["requests"]} == {i: q["tokens"] for i, q in asked.items()}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir())[0] == "latency_cdf.png"


@pytest.mark.parametrize("argv, message", [
    (["--model", "gptj-6b", "--tp", "3"], "--tp 3 must divide gptj-6b's 16 heads"),
    (["--model", "llama-65b"], "more than a100-40gb's 40 GB"),
    (["--model", "gptj-6b", "--slots", "64"], "raise --tp or lower --slots"),
    (["--model", "gptj-6b", "--tp", "16"], "puts 16 ranks on a node"),
    (["--model", "gptj-6b", "--tp", "4", "--nodes", "3"], "do not spread evenly"),
    (["--model", "gptj-7b"], "unknown model shape"),
    (["--model", "gpt2", "--prompt-len", "1000:1000", "--output-len", "100"], "request 0"),
])  # fmt: skip
def test_impossible_settings_are_one_line_and_exit_2(capsys, argv, message):
    status, out, err = run(capsys, "simulate", "--device", "a100-40gb", *argv, *TRACE[:4], "--quiet")
    assert status == 2 and out == ""
    assert message in err and err.count("\n") == 1, err


def test_tp_on_a_device_without_links_is_refused(tmp_path, capsys):
    record = json.loads((DEVICES / "a100-80gb.json").read_text())
    del record["figures"]["nvlink_gb_s"]
    (tmp_path / "solo.json").write_text(json.dumps(record))
    status, _, err = run(capsys, "simulate", "--device", tmp_path / "solo.json", "--tp", "2", *TRACE, "--quiet")
    assert status == 2 and "no NVLink figures" in err and err.count("\n") == 1


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("figures"), "'figures' must be"),
    (lambda r: r["figures"].pop("memory_bandwidth_gb_s"), "missing figure 'memory_bandwidth_gb_s'"),
    (lambda r: r["figures"]["overlap"].update(value=1.5), "'overlap' = 1.5 is outside 0..1"),
    (lambda r: r["figures"]["memory_gb"].update(value="80"), "must be a finite number"),
    (lambda r: r["figures"]["memory_gb"].update(source=" "), "needs a source"),
    (lambda r: r["figures"].update(hbm_gb={"value": 1, "source": "x"}), "unknown figure 'hbm_gb'"),
    (lambda r: r.update(kind="tpu"), "kind must be gpu or cpu"),
    (lambda r: r.update(dtype="fp8"), "dtype must be one of"),
])  # fmt: skip
def test_bad_device_files_are_one_line_and_exit_2(tmp_path, capsys, change, message):
    record = json.loads((DEVICES / "a100-80gb.json").read_text())
    change(record)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    status, out, err = run(capsys, "simulate", "--device", path, *TRACE, "--quiet")
    assert status == 2 and out == "" and message in err and str(path) in err and err.count("\n") == 1, err


def test_unreadable_and_unknown_devices_are_one_line(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{not json")
    for device, message in ((tmp_path / "broken.json", "not JSON"), ("b200", "unknown device 'b200'"),
                            (tmp_path / "gone.json", "does not exist")):  # fmt: skip
        status, _, err = run(capsys, "simulate", "--device", device, *TRACE, "--quiet")
        assert status == 2 and message in err and err.count("\n") == 1, err


def test_calibrate_writes_a_device_file_that_simulate_runs_on(tmp_path, capsys):
    status, out, _ = run(capsys, "calibrate", "--model", "tiny", "--quick", "--output", tmp_path / "cpu.json",
                         "--name", "this-cpu", "--quiet")  # fmt: skip
    assert status == 0 and "fit error: median" in out
    record = json.loads((tmp_path / "cpu.json").read_text())
    assert record["kind"] == "cpu" and len(record["measurements"]) == 12
    assert all("flover calibrate" in f["source"] or "MemTotal" in f["source"] or "fitted bandwidth" in f["source"]
               for f in record["figures"].values())  # fmt: skip
    status, out, _ = run(capsys, "simulate", "--device", tmp_path / "cpu.json", "--model", "tiny", *TRACE, "--quiet")
    assert status == 0 and out.startswith("simulated on this-cpu (tiny, fp32)")


def test_calibrate_on_several_cores_also_fits_one_thread_for_instances(tmp_path, capsys, monkeypatch):
    """Where steps use several threads, calibration also times them on one: what each of N instances gets."""
    from flover.sim import calibration

    monkeypatch.setattr(calibration, "times_one_thread", lambda config: True)
    threads = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads)  # a tiny model's backend keeps to one thread
    status, out, _ = run(capsys, "calibrate", "--model", "tiny", "--quick", "--output", tmp_path / "cpu.json", "--quiet")
    assert status == 0 and "on one thread" in out
    record = json.loads((tmp_path / "cpu.json").read_text())
    for setting in ("_one_thread", "_one_thread_alone"):  # beside busy neighbour processes, and alone
        assert len(record[f"measurements{setting}"]) == 2 * 3 + 2  # decode batches x positions, prefills
        assert f"matmul_tflops{setting}" in record["figures"]
    assert f"beside {threads - 1} busy neighbour process" in record["figures"]["overlap_one_thread"]["source"]
    assert "One-thread fit error" in " ".join(record["notes"])
    status, out, _ = run(capsys, "simulate", "--device", tmp_path / "cpu.json", "--model", "tiny", *TRACE,
                         "--policy", "instances", "--quiet")  # fmt: skip
    assert status == 0 and "instances (2)" in out


def test_a_calibration_can_be_taken_from_some_of_its_rounds():
    """Rounds taken between a benchmark's runs: a run is priced by the rounds either side of it."""
    from flover.sim.calibration import Measurement
    from flover.sim.shapes import model_shape

    measurement = Measurement(model_shape("tiny"), "quick", repeats=2)
    for _ in range(3):
        measurement.round()
    calls = next(iter(measurement.times.values()))  # the first point's, a decode step: the first measured
    assert len(calls) == 3 * 2
    for rounds in (range(0, 1), range(1, 3), range(0, 3)):
        first = measurement.result(rounds).measured[0]
        assert first.seconds == float(np.median(calls[2 * rounds.start : 2 * rounds.stop]))
    assert measurement.result().measured == measurement.result(range(0, 3)).measured
    with pytest.raises(ValueError, match=r"rounds range\(2, 4\) of the 3 taken"):
        measurement.result(range(2, 4))


def test_paper_experiments_quick_run(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_experiments.py"), "--quick", "--no-write"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 20 ms |" in done.stdout and "simulated in" in done.stdout
