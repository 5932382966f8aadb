"""Load and save GPT-2 checkpoints in the Hugging Face layout.

A checkpoint is a directory with ``config.json`` and ``model.safetensors``;
tensor names and the ``Conv1D`` (in, out) orientation are exactly those
``transformers`` writes, with the LM head tied to ``wte``. Pickle checkpoints
are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reference.config import GPTConfig
from reference.weights import Block, GPT2Weights, LayerNorm, Linear


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason."""


PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.bin")
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

_BLOCK_TENSORS = {  # our field -> the Hugging Face name inside "h.{i}."
    ("ln_1", "g"): "ln_1.weight",
    ("ln_1", "b"): "ln_1.bias",
    ("c_attn", "w"): "attn.c_attn.weight",
    ("c_attn", "b"): "attn.c_attn.bias",
    ("attn_proj", "w"): "attn.c_proj.weight",
    ("attn_proj", "b"): "attn.c_proj.bias",
    ("ln_2", "g"): "ln_2.weight",
    ("ln_2", "b"): "ln_2.bias",
    ("c_fc", "w"): "mlp.c_fc.weight",
    ("c_fc", "b"): "mlp.c_fc.bias",
    ("mlp_proj", "w"): "mlp.c_proj.weight",
    ("mlp_proj", "b"): "mlp.c_proj.bias",
}


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a GPT-2 checkpoint and its shape."""
    c, m = config.n_embd, config.d_mlp
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, c),
        "wpe.weight": (config.n_ctx, c),
        "ln_f.weight": (c,),
        "ln_f.bias": (c,),
    }
    per_block = {
        "ln_1.weight": (c,), "ln_1.bias": (c,),
        "attn.c_attn.weight": (c, 3 * c), "attn.c_attn.bias": (3 * c,),
        "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,),
        "ln_2.weight": (c,), "ln_2.bias": (c,),
        "mlp.c_fc.weight": (c, m), "mlp.c_fc.bias": (m,),
        "mlp.c_proj.weight": (m, c), "mlp.c_proj.bias": (c,),
    }  # fmt: skip
    for i in range(config.n_layer):
        shapes.update({f"h.{i}.{name}": shape for name, shape in per_block.items()})
    return shapes


def config_from_json(data: dict) -> GPTConfig:
    if data.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"model_type {data.get('model_type')!r} is not 'gpt2'")
    activation = data.get("activation_function", "gelu_new")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(
            f"activation_function {activation!r} is not supported; expected one of "
            f"{', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if data.get(flag):
            raise CheckpointError(f"config flag {flag}=true is not supported")
    if data.get("scale_attn_weights") is False:
        raise CheckpointError("config flag scale_attn_weights=false is not supported")
    try:
        return GPTConfig(
            n_layer=data["n_layer"],
            n_head=data["n_head"],
            n_embd=data["n_embd"],
            vocab_size=data["vocab_size"],
            n_ctx=data.get("n_positions", data.get("n_ctx")),
            layer_norm_epsilon=float(data.get("layer_norm_epsilon", 1e-5)),
            n_inner=data.get("n_inner"),
        )
    except KeyError as missing:
        raise CheckpointError(f"config.json lacks the key {missing}") from None
    except (TypeError, ValueError) as bad:
        raise CheckpointError(f"config.json is inconsistent: {bad}") from None


def config_to_json(config: GPTConfig, tied: bool = True) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "activation_function": "gelu_new",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_inner": config.n_inner,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }


def _refuse_pickles(path: Path) -> None:
    pickles = [p.name for p in path.iterdir() if p.name in PICKLE_NAMES or p.suffix in (".pt", ".pth")]
    raise CheckpointError(
        f"{path} has no model.safetensors"
        + (f" but a pickle checkpoint ({', '.join(sorted(pickles))})" if pickles else "")
        + ". Pickle files are refused because loading one runs arbitrary code. Convert it "
        "once, in an environment you trust, with transformers: "
        "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
    )


def load_checkpoint(path: str | Path) -> tuple[GPTConfig, GPT2Weights]:
    """Read a Hugging Face GPT-2 directory into float32 arrays, checking every tensor."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_file() and path.suffix in (".bin", ".pt", ".pth"):
        _refuse_pickles(path.parent)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = config_from_json(json.loads((path / "config.json").read_text()))
    except json.JSONDecodeError as bad:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {bad}") from None
    if not (path / "model.safetensors").is_file():
        _refuse_pickles(path)
    try:
        raw = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, TypeError, ValueError) as bad:
        raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {bad}") from None

    tensors = {_strip_prefix(name): value for name, value in raw.items()}
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise CheckpointError(f"tensor {name!r} is missing (expected shape {shape})")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                "from config.json"
            )
    return config, _weights_from_tensors(config, tensors)


def _strip_prefix(name: str) -> str:
    return name.removeprefix("transformer.")


def _weights_from_tensors(config: GPTConfig, t: dict[str, np.ndarray]) -> GPT2Weights:
    def f32(name: str) -> np.ndarray:
        return np.ascontiguousarray(t[name], dtype=np.float32)

    blocks = []
    for i in range(config.n_layer):
        fields: dict[str, dict[str, np.ndarray]] = {}
        for (field, part), name in _BLOCK_TENSORS.items():
            fields.setdefault(field, {})[part] = f32(f"h.{i}.{name}")
        blocks.append(
            Block(
                ln_1=LayerNorm(**fields["ln_1"]),
                c_attn=Linear(**fields["c_attn"]),
                attn_proj=Linear(**fields["attn_proj"]),
                ln_2=LayerNorm(**fields["ln_2"]),
                c_fc=Linear(**fields["c_fc"]),
                mlp_proj=Linear(**fields["mlp_proj"]),
            )
        )
    lm_head = None
    if "lm_head.weight" in t:
        head = f32("lm_head.weight")
        if head.shape != (config.vocab_size, config.n_embd):
            raise CheckpointError(
                f"tensor 'lm_head.weight' has shape {head.shape}, expected "
                f"{(config.vocab_size, config.n_embd)}"
            )
        if not np.array_equal(head, t["wte.weight"]):
            lm_head = head
    return GPT2Weights(
        wte=f32("wte.weight"),
        wpe=f32("wpe.weight"),
        blocks=blocks,
        ln_f=LayerNorm(f32("ln_f.weight"), f32("ln_f.bias")),
        lm_head=lm_head,
    )


def weights_to_tensors(weights: GPT2Weights) -> dict[str, np.ndarray]:
    """Our weights under the names ``GPT2LMHeadModel.save_pretrained`` writes."""
    tensors = {
        "transformer.wte.weight": weights.wte,
        "transformer.wpe.weight": weights.wpe,
        "transformer.ln_f.weight": weights.ln_f.g,
        "transformer.ln_f.bias": weights.ln_f.b,
    }
    for i, block in enumerate(weights.blocks):
        for (field, part), name in _BLOCK_TENSORS.items():
            tensors[f"transformer.h.{i}.{name}"] = getattr(getattr(block, field), part)
    if weights.lm_head is not None:
        tensors["lm_head.weight"] = weights.lm_head
    return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def save_checkpoint(path: str | Path, config: GPTConfig, weights: GPT2Weights) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_json(config, tied=weights.lm_head is None), indent=2) + "\n")
    save_file(weights_to_tensors(weights), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
