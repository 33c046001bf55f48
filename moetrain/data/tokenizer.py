"""Tokenizers: bytes by default (nothing to download), or a `tokenizers` JSON file."""

from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes are the tokens; byte 0 (never in text) separates documents."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json from a local path (no hub access).

    A tokenizer_config.json beside it (a transformers checkpoint's) names the eos token and
    whether special tokens written in text are split into ordinary tokens; without one, the
    first of a few common end-of-text tokens it has is the eos."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"data.tokenizer={path!r}: no tokenizer.json there; use 'byte' or "
                             "a path to a tokenizers JSON file")
        self._tok = Tokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size()
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        eos = config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is None or self._tok.token_to_id(eos) is None:
            eos = next((t for t in ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
                        if self._tok.token_to_id(t) is not None), None)
        self.eos_token = eos
        self.eos_id = self._tok.token_to_id(eos) if eos else 0
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))

    @property
    def backend(self):
        """The tokenizers.Tokenizer itself (vocabulary, added tokens, pipeline)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def build_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else FileTokenizer(name)
