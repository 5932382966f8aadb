"""Bad checkpoints get an error naming the tensor, the shapes or the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reference import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture
def saved(tmp_path, small_model):
    config, weights = small_model
    return save_checkpoint(tmp_path / "ckpt", config, weights)


def test_round_trip_is_exact(saved, small_model):
    config, weights = small_model
    again_config, again = load_checkpoint(saved)
    assert again_config == config
    assert np.array_equal(again.wte, weights.wte) and np.array_equal(again.blocks[0].c_attn.b, weights.blocks[0].c_attn.b)


def test_missing_tensor_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'h.1.mlp.c_fc.weight' is missing \(expected shape \(32, 128\)\)"):
        load_checkpoint(saved)


def test_wrong_shape_names_both_shapes(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"] = np.zeros((96, 32), np.float32)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'h.0.attn.c_attn.weight' has shape \(96, 32\), expected \(32, 96\)"):
        load_checkpoint(saved)


def test_inconsistent_config_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["n_head"] = 5
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="n_embd 32 is not divisible by n_head 5"):
        load_checkpoint(saved)


def test_config_disagreeing_with_tensors_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["n_embd"] = 48
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'wte.weight' has shape \(97, 32\), expected \(97, 48\)"):
        load_checkpoint(saved)


def test_pickle_checkpoint_is_refused_with_reason(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle.*runs arbitrary code.*save_pretrained"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="runs arbitrary code"):
        load_checkpoint(saved / "pytorch_model.bin")


def test_unsupported_activation_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["activation_function"] = "relu"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="activation_function 'relu' is not supported"):
        load_checkpoint(saved)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(tmp_path)


def test_corrupt_safetensors_is_reported(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(saved)
