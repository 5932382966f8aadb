"""Our loader and forward pass against Hugging Face transformers on checkpoints made here."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reference import NumpyBackend, forward, generate, load_checkpoint, save_checkpoint  # noqa: E402

CONFIGS = [  # (n_layer, n_head, n_embd, vocab, n_ctx): odd head counts included
    (2, 4, 64, 256, 96),
    (3, 3, 48, 101, 80),
    (1, 5, 40, 311, 64),
    (2, 7, 56, 50, 72),
]


def hf_model(n_layer, n_head, n_embd, vocab, n_ctx, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=n_ctx,
        initializer_range=0.3,  # large weights, so greedy decoding does not repeat one token
        bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # the default init zeroes biases and sets unit gains: perturb them too
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("shape", CONFIGS, ids=lambda s: "L{}H{}C{}V{}".format(*s[:4]))
def test_loaded_logits_equal_torch(tmp_path, shape):
    model = hf_model(*shape)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, weights = load_checkpoint(tmp_path)
    tokens = np.random.default_rng(0).integers(0, shape[3], size=shape[4])
    with torch.no_grad():
        expected = model(torch.tensor(tokens[None])).logits[0].numpy()
    assert relative_error(forward(weights, config, tokens), expected) < 1e-4


@pytest.mark.parametrize("shape", CONFIGS[:3], ids=lambda s: "L{}H{}C{}V{}".format(*s[:4]))
def test_greedy_tokens_equal_hf_generate(tmp_path, shape):
    model = hf_model(*shape, seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, weights = load_checkpoint(tmp_path)
    prompt = np.random.default_rng(1).integers(1, shape[3], size=8)
    with torch.no_grad():
        hf = model.generate(torch.tensor(prompt[None]), max_new_tokens=40, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    expected = hf[0, len(prompt):].tolist()
    ours = list(generate(NumpyBackend(config, weights), prompt, 40))
    assert len(set(expected)) > 4, "the test model must not just repeat one token"
    assert ours == expected


def test_saved_checkpoint_loads_in_transformers(tmp_path, small_model):
    config, weights = small_model
    save_checkpoint(tmp_path, config, weights)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = np.arange(20) % config.vocab_size
    with torch.no_grad():
        expected = model(torch.tensor(tokens[None])).logits[0].numpy()
    assert relative_error(forward(weights, config, tokens), expected) < 1e-4
    again_config, again = load_checkpoint(tmp_path)
    assert again_config == config and np.array_equal(again.blocks[1].c_fc.w, weights.blocks[1].c_fc.w)
