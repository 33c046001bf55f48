"""Tokenizers: bytes by default (nothing to download), a byte-level BPE that ships with
moetrain (`stdlib-bpe-2048`, data=python_stdlib's), or any `tokenizers` JSON file.

`train_byte_bpe` makes GPT-2-style byte-level BPEs (scripts/train_tokenizer.py is its command
line): every byte is a token, so any text encodes, and id 0 is the end-of-document token, as
with the bytes tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

# data.tokenizer names of the tokenizers that ship with moetrain: directories here, each with a
# tokenizer.json and a tokenizer_config.json.
BUILTIN_DIR = Path(__file__).parent / "tokenizers"
END_OF_TEXT = "<|endoftext|>"


def builtin_tokenizers() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "tokenizer.json").is_file())


def tokenizer_file(name: str) -> Path:
    """The tokenizer.json that data.tokenizer `name` (not `byte`) stands for: a built-in name,
    a directory holding tokenizer.json, or the file itself."""
    if name in builtin_tokenizers():
        return BUILTIN_DIR / name / "tokenizer.json"
    file = Path(name)
    file = file / "tokenizer.json" if file.is_dir() else file
    if not file.is_file():
        raise ValueError(f"data.tokenizer={name!r}: no tokenizer.json there; use 'byte', one "
                         f"of {', '.join(builtin_tokenizers())}, or a path to a tokenizers "
                         "JSON file")
    return file


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two data.tokenizer settings give the same token ids: equal settings, or
    tokenizer.json files with the same contents (e.g. a built-in name and the copy an export
    wrote); False for `byte` against a file, or a missing file."""
    if a == b:
        return True
    try:
        return "byte" not in (a, b) and (
            tokenizer_file(a).read_bytes() == tokenizer_file(b).read_bytes())
    except ValueError:
        return False


class ByteTokenizer:
    """UTF-8 bytes are the tokens; byte 0 (never in text) separates documents."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Ids past the 256 bytes (a model.vocab_size padded beyond the tokenizer's) stand
        for no text and are dropped, as the tokenizers library drops ids it does not know."""
        return bytes(i for i in ids if i != self.eos_id and 0 <= i < 256).decode(
            "utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json from a local path (no hub access).

    A tokenizer_config.json beside it (a transformers checkpoint's) names the eos token and
    whether special tokens written in text are split into ordinary tokens; without one, the
    first of a few common end-of-text tokens it has is the eos."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        file = tokenizer_file(path)
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
        if eos is None:  # id 0 would be an ordinary token, e.g. '!', cut out of every text
            raise ValueError(f"data.tokenizer={path!r} has no end-of-text token (none of "
                             "</s>, <|endoftext|>, <eos>, [SEP], and no eos_token in a "
                             "tokenizer_config.json beside it); moetrain separates documents "
                             "with one")
        self.eos_token = eos
        self.eos_id = self._tok.token_to_id(eos)
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))

    @property
    def backend(self):
        """The tokenizers.Tokenizer itself (vocabulary, added tokens, pipeline)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, on all cores (tokenizers' own threads)."""
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def build_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else FileTokenizer(name)


def train_byte_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2's pre-tokenization: words, number runs, punctuation runs and
    whitespace runs are merged within, never across) with `vocab_size` tokens learnt from
    `texts`: the end-of-document token (id 0), the 256 bytes, then the merges. The same texts
    in the same order give the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} must be at least 257 (256 bytes and the "
                         "end-of-document token)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    """tokenizer.json and a tokenizer_config.json naming the end-of-document token, in
    `out_dir`: what data.tokenizer=out_dir and transformers' AutoTokenizer read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END_OF_TEXT,
              "clean_up_tokenization_spaces": False,
              # "<|endoftext|>" written in a document is text, not an end of document
              "split_special_tokens": True}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(vocab,) int64: the UTF-8 bytes each token id stands for (the rules: moetrain.evaluate's
    docstring)."""
    if isinstance(tokenizer, ByteTokenizer):
        lengths = torch.ones(tokenizer.vocab_size, dtype=torch.long)
        lengths[tokenizer.eos_id] = 0
        return lengths
    from tokenizers.pre_tokenizers import ByteLevel
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    byte_level = _has_byte_level(spec.get("pre_tokenizer")) or _has_byte_level(
        spec.get("decoder"))
    alphabet = set(ByteLevel.alphabet())
    special = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id in special or token_id == tokenizer.eos_id:
            continue
        if byte_level and all(ch in alphabet for ch in token):
            lengths[token_id] = len(token)  # one byte per byte-alphabet character
        else:
            lengths[token_id] = len(backend.decode([token_id],
                                                   skip_special_tokens=False).encode("utf-8"))
    return lengths


def _has_byte_level(node) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence) contains a ByteLevel step."""
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False
