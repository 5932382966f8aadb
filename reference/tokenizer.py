"""Tokenizers: raw bytes for byte-vocabulary models, GPT-2 BPE from a checkpoint directory."""

from __future__ import annotations

import codecs
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. Ids past 255 (a random-weight gpt2 preset) print as <id>."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return "".join(self.stream(ids))

    def stream(self, ids):
        """Decode ids one by one, holding back bytes until they form a character."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in ids:
            yield decoder.decode(bytes([i])) if i < 256 else decoder.decode(b"", final=True) + f"<{i}>"
        yield decoder.decode(b"", final=True)


class BPETokenizer:
    """GPT-2's byte-level BPE through the ``tokenizers`` library."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_directory(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        if (path / "tokenizer.json").is_file():
            return cls(HFTokenizer.from_file(str(path / "tokenizer.json")))
        tok = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def stream(self, ids):
        """Yield the text each new id adds (decoding the growing prefix keeps merges right)."""
        seen: list[int] = []
        shown = ""
        for i in ids:
            seen.append(i)
            text = self.decode(seen)
            if not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        yield self.decode(seen)[len(shown):]


def load_tokenizer(checkpoint: str | Path | None) -> ByteTokenizer | BPETokenizer:
    """BPE when the directory carries tokenizer.json or vocab.json + merges.txt, else bytes."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            return BPETokenizer.from_directory(path)
    return ByteTokenizer()
