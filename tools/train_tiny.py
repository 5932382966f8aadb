"""Train a small byte-level GPT-2 on the Python standard library's own sources.

The text is on every machine that has Python, so anyone can rebuild the model
that flover ships as its demo (``flover/models/tiny-py``). Comments and
docstrings are removed first, so the model learns to write code, not English:

    python tools/train_tiny.py --out flover/models/tiny-py

It trains ``transformers.GPT2LMHeadModel`` with torch on the CPU, saves it in
the Hugging Face layout (``config.json``, ``model.safetensors``), checks that
the NumPy reference computes the same logits, and writes ``training.json`` and
``TRAINING.md`` beside it: the command, the data, the losses and greedy samples.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import random
import re
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a clone without installing flover
    sys.path.insert(0, str(ROOT))

from reference import ByteTokenizer, NumpyBackend, forward, generate, load_checkpoint  # noqa: E402

SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "turtledemo", "lib2to3"}
SAMPLE_PROMPTS = ("def ", "import ", "class ")
NATS_TO_BITS = 1 / math.log(2)
STATEMENT_START = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}


@dataclass(frozen=True, slots=True)
class Corpus:
    stdlib: str
    train_files: list[str]
    val_files: list[str]
    train: np.ndarray  # [N_train] uint8
    val: np.ndarray  # [N_val] uint8


def stdlib_sources(stdlib: Path) -> list[Path]:
    """The stdlib's .py files in a fixed order, without tests, demos and installed packages."""
    files = []
    for path in stdlib.rglob("*.py"):
        parts = path.relative_to(stdlib).parts
        if not any(p in SKIPPED_DIRS or p.startswith("test") for p in parts):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def strip_prose(source: bytes) -> bytes:
    """Python source without comments and docstrings (bare string statements), layout kept."""
    tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
    code = [t for t in tokens if t.type not in (tokenize.NL, tokenize.COMMENT)]
    drop: set[int] = set()  # line numbers removed whole
    cut: dict[int, int] = {}  # line number -> column of an inline comment
    replace: dict[int, str] = {}  # a docstring that was a whole body -> pass
    for t in tokens:
        if t.type == tokenize.COMMENT:
            if t.line[: t.start[1]].strip():
                cut[t.start[0]] = t.start[1]
            else:
                drop.add(t.start[0])
    for i, t in enumerate(code):
        if t.type != tokenize.STRING or code[i - 1].type not in STATEMENT_START or code[i + 1].type != tokenize.NEWLINE:
            continue
        lines = range(t.start[0], t.end[0] + 1)
        if code[i - 1].type == tokenize.INDENT and code[i + 2].type in (tokenize.DEDENT, tokenize.ENDMARKER):
            replace[t.start[0]] = t.line[: t.start[1]] + "pass\n"
        drop.update(lines)
    encoding = tokens[0].string if tokens[0].type == tokenize.ENCODING else "utf-8"
    out = []
    for n, raw in enumerate(io.BytesIO(source).readlines(), start=1):  # split as tokenize does
        line = raw.decode(encoding)
        if n in replace:
            out.append(replace[n])
        elif n in drop:
            continue
        elif n in cut:
            out.append(line[: cut[n]].rstrip() + "\n")
        else:
            out.append(line)
    text = "".join(out)
    text = re.sub(r":\n([ \t]*\n)+", ":\n", text)  # no blank line opening a body
    text = re.sub(r"\n([ \t]*\n){3,}", "\n\n\n", text)  # at most two blank lines in a row
    return text.lstrip("\n").encode("utf-8")


def load_corpus(stdlib: Path, val_fraction: float, seed: int) -> Corpus:
    """Whole files go to one split, so the validation loss is measured on unseen modules."""
    files = stdlib_sources(stdlib)
    if len(files) < 2:
        raise SystemExit(f"found {len(files)} .py files under {stdlib}; need at least 2 (train and validation)")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(files)))
    val_ids, train_ids = sorted(order[:n_val]), sorted(order[n_val:])

    def join(ids: list[int]) -> np.ndarray:
        text = b"\n".join(strip_prose(files[i].read_bytes()) for i in ids)
        return np.frombuffer(text, np.uint8)

    names = [f.relative_to(stdlib).as_posix() for f in files]
    return Corpus(
        stdlib=str(stdlib),
        train_files=[names[i] for i in train_ids],
        val_files=[names[i] for i in val_ids],
        train=join(train_ids),
        val=join(val_ids),
    )


def windows(data: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """context + 1 bytes from each start -> inputs and their next-byte targets, [B, T] each."""
    w = torch.from_numpy(np.stack([data[s : s + context + 1] for s in starts]).astype(np.int64))  # [B, T + 1]
    return w[:, :-1], w[:, 1:]


def line_starts(data: np.ndarray, context: int) -> np.ndarray:
    """Offsets just after each newline with a whole window after them: training windows begin
    at a line, as prompts such as ``def `` do, so the first positions learn how lines open."""
    starts = np.flatnonzero(data == ord("\n")) + 1
    return starts[starts + context + 1 <= len(data)]


def next_byte_loss(model, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=x).logits  # [B, T] -> [B, T, 256]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


def evaluate(model, data: np.ndarray, context: int, batch_size: int, n_batches: int) -> float:
    """Mean next-byte loss (nats) over windows at evenly spaced line starts, the same ones every time."""
    lines = line_starts(data, context)
    starts = lines[np.linspace(0, len(lines) - 1, min(n_batches * batch_size, len(lines))).astype(np.int64)]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            x, y = windows(data, starts[i : i + batch_size], context)
            total += next_byte_loss(model, x, y, reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(args: argparse.Namespace):
    config = GPT2Config(
        vocab_size=256,
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def make_optimizer(model, args: argparse.Namespace):
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and layer-norm gains
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def train(model, corpus: Corpus, args: argparse.Namespace) -> list[float]:
    optimizer = make_optimizer(model, args)
    rng = np.random.default_rng(args.seed)
    lines = line_starts(corpus.train, args.context)
    losses = []
    progress = tqdm(range(args.steps), desc="train", unit="step", disable=args.quiet)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        starts = rng.choice(lines, size=args.batch_size)
        loss = next_byte_loss(model, *windows(corpus.train, starts, args.context))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}", bpb=f"{loss.item() * NATS_TO_BITS:.3f}")
    return losses


def reference_mismatch(model, out: Path, corpus: Corpus, n_sequences: int = 3) -> float:
    """Largest |NumPy logit - torch logit| over the largest |torch logit|, on validation text."""
    config, weights = load_checkpoint(out)
    length = min(config.n_ctx, len(corpus.val) // n_sequences)
    worst = 0.0
    model.eval()
    for i in range(n_sequences):
        tokens = corpus.val[i * length : (i + 1) * length].astype(np.int64)  # [T]
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(tokens)[None]).logits[0].numpy()  # [T, 256]
        ours = forward(weights, config, tokens)  # [T, 256]
        worst = max(worst, float(np.abs(ours - expected).max() / np.abs(expected).max()))
    return worst


def greedy_samples(out: Path, max_new_tokens: int) -> dict[str, str]:
    config, weights = load_checkpoint(out)
    tokenizer = ByteTokenizer()
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt)
        new = list(generate(NumpyBackend(config, weights), ids, min(max_new_tokens, config.n_ctx - len(ids))))
        samples[prompt] = prompt + tokenizer.decode(new)
    return samples


def loss_record(nats: float) -> dict[str, float]:
    return {"nats_per_byte": round(nats, 4), "bits_per_byte": round(nats * NATS_TO_BITS, 4)}


def write_report(out: Path, record: dict) -> None:
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    loss = record["loss"]
    rows = "\n".join(
        f"| {name} | {loss[name]['nats_per_byte']:.4f} | {loss[name]['bits_per_byte']:.4f} |"
        for name in ("train_last_steps", "train", "validation")
    )
    samples = "\n\n".join(f"`{prompt}`\n\n```text\n{text}\n```" for prompt, text in record["samples"].items())
    data, model = record["data"], record["model"]
    text = f"""# {out.name}: a byte-level GPT-2 trained on the Python standard library

Rebuild it with

```
{record["command"]}
```

## Model

GPT-2 (`gelu_new`, tied embeddings) over the 256 byte values: {model["n_layer"]} layers, {model["n_head"]} heads,
n_embd {model["n_embd"]}, context {model["n_positions"]}. {model["parameters"]:,} parameters,
{model["safetensors_bytes"]:,} bytes of float32 safetensors.

## Data

The `.py` files of the standard library at `{data["stdlib"]}` (Python {data["python"]}),
without tests, `idlelib`, `turtledemo` and `lib2to3`: {data["train_files"] + data["val_files"]} files, sorted by path.
Comments and docstrings are removed, so greedy text is code rather than English prose.
{data["val_files"]} whole files, drawn with seed {record["seed"]}, are held out for validation:
{data["train_bytes"]:,} training bytes and {data["val_bytes"]:,} validation bytes (files joined by newlines).

## Training

- {record["steps"]} steps of {record["batch_size"]} windows x {record["context"]} bytes, each window starting at
  a line, as a prompt does ({record["steps"] * record["batch_size"] * record["context"]:,} bytes seen)
- AdamW, peak learning rate {record["lr"]}, {record["warmup"]} warmup steps, cosine decay to a tenth,
  weight decay {record["weight_decay"]}, gradients clipped at norm {record["clip"]}
- torch {record["torch"]}, {record["threads"]} CPU thread(s): {record["train_seconds"]:.0f} s of training,
  {record["date"]}

| loss | nats/byte | bits/byte |
|---|---|---|
{rows}

`train_last_steps` is the mean training loss of the last steps; `train` and `validation` are
measured after training on the same fixed windows (evenly spaced line starts) every time.
The NumPy reference reproduces torch's logits to {record["reference_relative_error"]:.1e} (relative).

## Greedy samples (NumPy reference)

{samples}
"""
    (out / "TRAINING.md").write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the checkpoint")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--context", type=int, default=256, help="bytes per training window")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--sample-tokens", type=int, default=160)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.context > args.n_positions:
        parser.error(f"--context {args.context} exceeds --n-positions {args.n_positions}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = load_corpus(args.stdlib, args.val_fraction, args.seed)
    print(f"data: {len(corpus.train):,} train bytes, {len(corpus.val):,} validation bytes from {corpus.stdlib}")
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    started = time.perf_counter()
    losses = train(model, corpus, args)
    train_seconds = time.perf_counter() - started
    train_loss = evaluate(model, corpus.train, args.context, args.batch_size, args.eval_batches)
    val_loss = evaluate(model, corpus.val, args.context, args.batch_size, args.eval_batches)
    last = float(np.mean(losses[-max(1, min(100, len(losses) // 10)) :]))
    print(
        f"loss (nats/byte): train {train_loss:.4f}, validation {val_loss:.4f}; "
        f"bits/byte: train {train_loss * NATS_TO_BITS:.4f}, validation {val_loss * NATS_TO_BITS:.4f}"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    mismatch = reference_mismatch(model, args.out, corpus)
    if mismatch > 1e-4:
        raise SystemExit(f"the NumPy reference differs from torch by {mismatch:.2e} relative (limit 1e-4)")
    samples = greedy_samples(args.out, args.sample_tokens)
    for text in samples.values():
        print("-" * 40 + "\n" + text)

    def pick(*names: str) -> dict:
        return {name: getattr(args, name) for name in names}

    record = {
        "command": " ".join(["python", "tools/train_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **pick("seed", "steps", "batch_size", "context", "lr", "warmup", "weight_decay", "clip", "threads"),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "train_seconds": round(train_seconds, 1),
        "model": {
            **pick("n_layer", "n_head", "n_embd", "n_positions"),
            "parameters": n_params,
            "safetensors_bytes": (args.out / "model.safetensors").stat().st_size,
        },
        "data": {
            "stdlib": corpus.stdlib,
            "python": platform.python_version(),
            **{name: len(getattr(corpus, name)) for name in ("train_files", "val_files")},
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
            "val_file_names": corpus.val_files,
        },
        "loss": {
            "train_last_steps": loss_record(last),
            "train": loss_record(train_loss),
            "validation": loss_record(val_loss),
        },
        "reference_relative_error": mismatch,
        "samples": samples,
    }
    write_report(args.out, record)
    print(f"saved {args.out} ({train_seconds:.0f} s of training)")


if __name__ == "__main__":
    main()
