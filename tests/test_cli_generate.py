"""`flover generate`: streaming, --json, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from flover.cli import main
from reference import save_checkpoint


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_json_prints_generated_ids_only(capsys):
    status, out, _ = run(capsys, "generate", "--model", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json")
    record = json.loads(out)
    assert status == 0
    assert record["prompt_ids"] == [1, 2, 3] and len(record["tokens"]) == 5
    assert isinstance(record["text"], str)


def test_streamed_text_equals_json_text(capsys):
    args = ["generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "3"]
    _, streamed, _ = run(capsys, *args)
    _, out, _ = run(capsys, *args, "--json")
    assert streamed == json.loads(out)["text"] + "\n"


def test_checkpoint_directory_as_model(capsys, tmp_path, small_model):
    config, weights = small_model
    save_checkpoint(tmp_path, config, weights)
    status, out, _ = run(capsys, "generate", "--model", str(tmp_path), "--prompt-ids", "4,5", "--max-new-tokens", "3", "--json")
    assert status == 0 and len(json.loads(out)["tokens"]) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt3", "--prompt", "x"], "model 'gpt3' is neither a preset"),
        (["--model", "tiny", "--prompt", "x" * 300],
         "prompt of 300 tokens + max_new_tokens 64 = 364 exceeds the context n_ctx 256"),
        (["--model", "tiny", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
        (["--model", "tiny", "--prompt-ids", "1,256"], "token id 256 is outside the vocabulary 0..255"),
        (["--model", "tiny", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
        (["--model", "tiny", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--model", "tiny", "--prompt", "x", "--top-p", "1.01"], "top_p must be in (0, 1], got 1.01"),
        (["--model", "tiny", "--prompt", "x", "--stop-ids", "999"], "stop id 999 is outside the vocabulary 0..255"),
        (["--model", "tiny", "--prompt-ids", "1,a"], "expected comma-separated integers, got '1,a'"),
        (["--model", "tiny", "--prompt", "x", "--backend", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_bad_arguments_get_one_line_and_status_2(capsys, argv, message):
    status, out, err = run(capsys, "generate", *argv)
    assert status == 2
    assert err.count("\n") == 1 and message in err, err


def test_numba_backend_without_gpu_or_simulator_is_one_line():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-m", "flover.cli", "generate", "--model", "tiny", "--prompt", "x",
                           "--backend", "numba"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    probe = subprocess.run([sys.executable, "-c", "import numba.cuda; print(numba.cuda.is_available())"],
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    if probe.stdout.strip() == "True":  # a real GPU
        assert done.returncode == 0
    else:
        assert done.returncode == 2
        assert done.stderr == "flover: error: backend 'numba': no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set\n"
