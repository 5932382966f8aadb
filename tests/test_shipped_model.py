"""The demo model shipped in flover/models/tiny-py, and the script that trains it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flover.loading import SHIPPED_MODEL
from reference import ByteTokenizer, NumpyBackend, forward, generate, init_weights, load_checkpoint, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 10 * 2**20
PYTHON_SNIPPET = '''import os


class Config:
    """Settings read from the environment."""

    def __init__(self, name, default=None):
        self.name = name
        self.default = default

    def get(self):
        return os.environ.get(self.name, self.default)
'''


def greedy_text(config, weights, prompt: str, max_new_tokens: int = 120) -> str:
    tokenizer = ByteTokenizer()
    return tokenizer.decode(list(generate(NumpyBackend(config, weights), tokenizer.encode(prompt), max_new_tokens)))


def printable(text: str) -> bool:
    return all(c in string.printable and c not in "\x0b\x0c" for c in text)


def looks_like_python(text: str) -> bool:
    """Printable ASCII with at least two of: a call or definition, a colon, an indented line."""
    structure = ["(" in text, ":" in text, "\n    " in text]
    return printable(text) and sum(structure) >= 2


FIRST_LINES = {  # what a greedy continuation of each prompt must open with
    "def ": r"def \w+\(",
    "class ": r"class \w+[(:]",
    "import ": r"import \w+(\.\w+)*( as \w+)?(, \w+)*\n",
}


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(SHIPPED_MODEL)


def test_shipped_model_loads_with_reference_loader(shipped):
    config, weights = shipped
    assert config.vocab_size == 256 and len(weights.blocks) == config.n_layer
    assert weights.lm_head is None  # tied to wte
    assert isinstance(load_tokenizer(SHIPPED_MODEL), ByteTokenizer)


def test_shipped_model_is_small(shipped):
    config, _ = shipped
    assert (SHIPPED_MODEL / "model.safetensors").stat().st_size < MAX_BYTES
    assert config.n_layer <= 6 and config.n_embd <= 256 and config.n_ctx <= 512


def test_shipped_greedy_text_is_deterministic_python(shipped):
    config, weights = shipped
    for prompt, first_line in FIRST_LINES.items():
        text = prompt + greedy_text(config, weights, prompt)
        assert text == prompt + greedy_text(config, weights, prompt)
        assert printable(text) and re.match(first_line, text), repr(text)
    assert looks_like_python("def " + greedy_text(config, weights, "def "))


def test_python_checks_reject_random_weights(shipped):
    config, _ = shipped
    for seed in range(3):
        weights = init_weights(config, seed=seed, std=0.3)
        for prompt, first_line in FIRST_LINES.items():
            text = prompt + greedy_text(config, weights, prompt)
            assert not (printable(text) and re.match(first_line, text)), repr(text)
        assert not looks_like_python("def " + greedy_text(config, weights, "def "))


def test_shipped_model_predicts_unseen_python(shipped):
    """Under 3 bits per byte on code it never saw; a uniform guess costs 8."""
    config, weights = shipped
    tokens = np.frombuffer(PYTHON_SNIPPET.encode(), np.uint8).astype(np.int64)  # [T]
    logits = forward(weights, config, tokens[:-1]).astype(np.float64)  # [T - 1, 256]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nats = -log_probs[np.arange(len(tokens) - 1), tokens[1:]].mean()
    assert nats / np.log(2) < 3.0


def test_training_record_has_final_losses():
    record = json.loads((SHIPPED_MODEL / "training.json").read_text())
    for split in ("train", "validation"):
        loss = record["loss"][split]
        assert 0 < loss["nats_per_byte"] < np.log(256)
        assert loss["bits_per_byte"] == pytest.approx(loss["nats_per_byte"] / np.log(2), abs=1e-3)
    assert record["steps"] >= 1 and record["train_seconds"] > 0
    assert record["command"].startswith("python tools/train_tiny.py")
    assert "validation" in (SHIPPED_MODEL / "TRAINING.md").read_text()


def test_shipped_logits_equal_torch(shipped):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, weights = shipped
    model = transformers.GPT2LMHeadModel.from_pretrained(SHIPPED_MODEL).eval()
    tokens = np.frombuffer(PYTHON_SNIPPET.encode(), np.uint8).astype(np.int64)[: config.n_ctx]
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)[None]).logits[0].numpy()
    ours = forward(weights, config, tokens)
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4


@pytest.fixture(scope="module")
def train_tiny():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "tools" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_strip_prose_keeps_code_and_drops_comments_and_docstrings(train_tiny):
    stripped = train_tiny.strip_prose(PYTHON_SNIPPET.encode() + b"x = 1  # one\n").decode()
    assert "Settings" not in stripped and "# one" not in stripped
    assert "    def get(self):\n        return os.environ.get(self.name, self.default)\n" in stripped
    assert stripped.endswith("x = 1\n")
    compile(stripped, "<stripped>", "exec")
    only_docstring = train_tiny.strip_prose(b'class E(Exception):\n    """An error."""\n').decode()
    assert only_docstring == "class E(Exception):\n    pass\n"


def test_train_tiny_writes_a_loadable_checkpoint(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    stdlib = tmp_path / "stdlib"  # a few files stand in for the standard library, so the run takes seconds
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "test").mkdir()
    for i in range(4):
        (stdlib / "pkg" / f"mod{i}.py").write_text(PYTHON_SNIPPET * (i + 1))
    (stdlib / "test" / "test_skipped.py").write_text("assert False\n")
    out = tmp_path / "tiny"
    command = [
        sys.executable, str(ROOT / "tools" / "train_tiny.py"), "--out", str(out), "--stdlib", str(stdlib),
        "--steps", "3", "--warmup", "1", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--n-positions", "32", "--context", "32", "--batch-size", "2", "--eval-batches", "1",
        "--sample-tokens", "4", "--val-fraction", "0.25", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True, timeout=120)
    config, weights = load_checkpoint(out)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_ctx) == (1, 2, 16, 32)
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["loss"]["validation"]["nats_per_byte"] > 0
    assert (record["data"]["train_files"], record["data"]["val_files"]) == (3, 1)
