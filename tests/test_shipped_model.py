"""The demo model shipped in flover/models/tiny-py, and the script that trains it."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flover.models import DEFAULT_MODEL
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


def looks_like_python(text: str) -> bool:
    """Printable ASCII with at least two of: a call or definition, a colon, an indented line."""
    printable = all(c in string.printable and c not in "\x0b\x0c" for c in text)
    structure = ["(" in text, ":" in text, "\n    " in text]
    return printable and sum(structure) >= 2


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(DEFAULT_MODEL)


def test_shipped_model_loads_with_reference_loader(shipped):
    config, weights = shipped
    assert config.vocab_size == 256 and len(weights.blocks) == config.n_layer
    assert weights.lm_head is None  # tied to wte
    assert isinstance(load_tokenizer(DEFAULT_MODEL), ByteTokenizer)


def test_shipped_model_is_small(shipped):
    config, _ = shipped
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size < MAX_BYTES
    assert config.n_layer <= 6 and config.n_embd <= 256 and config.n_ctx <= 512


def test_shipped_greedy_text_is_deterministic_python(shipped):
    config, weights = shipped
    for prompt in ("def ", "import ", "class "):
        first, second = greedy_text(config, weights, prompt), greedy_text(config, weights, prompt)
        assert first == second
        assert looks_like_python(prompt + first), repr(prompt + first)


def test_python_check_rejects_random_weights(shipped):
    config, _ = shipped
    for seed in range(3):
        text = greedy_text(config, init_weights(config, seed=seed, std=0.3), "def ")
        assert not looks_like_python("def " + text), repr(text)


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
    record = json.loads((DEFAULT_MODEL / "training.json").read_text())
    for split in ("train", "validation"):
        loss = record["loss"][split]
        assert 0 < loss["nats_per_byte"] < np.log(256)
        assert loss["bits_per_byte"] == pytest.approx(loss["nats_per_byte"] / np.log(2), abs=1e-3)
    assert record["steps"] >= 1 and record["train_seconds"] > 0
    assert record["command"].startswith("python tools/train_tiny.py")
    assert "validation" in (DEFAULT_MODEL / "TRAINING.md").read_text()


def test_shipped_logits_equal_torch(shipped):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, weights = shipped
    model = transformers.GPT2LMHeadModel.from_pretrained(DEFAULT_MODEL).eval()
    tokens = np.frombuffer(PYTHON_SNIPPET.encode(), np.uint8).astype(np.int64)[: config.n_ctx]
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)[None]).logits[0].numpy()
    ours = forward(weights, config, tokens)
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4


def test_train_tiny_writes_a_loadable_checkpoint(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "tiny"
    command = [
        sys.executable, str(ROOT / "tools" / "train_tiny.py"), "--out", str(out), "--steps", "3", "--warmup", "1",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-positions", "32", "--context", "32",
        "--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "4", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True, timeout=120)
    config, weights = load_checkpoint(out)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_ctx) == (1, 2, 16, 32)
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["loss"]["validation"]["nats_per_byte"] > 0
