"""How a --model argument becomes a config, weights and a tokenizer."""

from __future__ import annotations

from pathlib import Path

from reference import GPT2Weights, GPTConfig, load_model, load_tokenizer

SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "tiny-py"


def default_model() -> str:
    """The small trained model shipped with flover, or the random ``tiny`` preset without it."""
    return str(SHIPPED_MODEL) if (SHIPPED_MODEL / "model.safetensors").is_file() else "tiny"


def resolve(model: str | None, weights_seed: int = 0):
    """-> (config, weights, tokenizer) for a preset name or a checkpoint directory."""
    model = model or default_model()
    config, weights = load_model(model, weights_seed=weights_seed)
    tokenizer = load_tokenizer(model if Path(model).is_dir() else None)
    return config, weights, tokenizer


__all__ = ["GPTConfig", "GPT2Weights", "SHIPPED_MODEL", "default_model", "resolve"]
