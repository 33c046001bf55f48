"""moetrain's tokenizer as files `transformers.AutoTokenizer` loads.

The bytes tokenizer becomes a byte-level BPE with no merges: token id b is byte b, so every
string encodes to its UTF-8 bytes exactly as moetrain's ByteTokenizer does, and decoding gives
the same text (invalid UTF-8 replaced by U+FFFD the same way). Byte 0 is moetrain's
end-of-document token: its byte-level symbol is declared the eos token, and
`split_special_tokens` keeps a literal occurrence of that symbol in text encoded as the bytes
it is made of, as moetrain does. Decode with `skip_special_tokens=True` to drop it, as
moetrain's decode does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moetrain.data.tokenizer import (ByteTokenizer, FileTokenizer, build_tokenizer,
                                     tokenizer_file)

# tokenizer_config.json marker: a directory holding it was written from the bytes tokenizer.
BYTE_MARKER = "moetrain_byte_tokenizer"


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, as tokenizers' ByteLevel uses them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer_json() -> dict:
    symbols = byte_symbols()
    eos = symbols[ByteTokenizer.eos_id]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": ByteTokenizer.eos_id, "content": eos, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                          "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {symbol: b for b, symbol in enumerate(symbols)}, "merges": []},
    }


def write_tokenizer(name: str, out_dir: Path, model_max_length: int) -> int:
    """Write tokenizer.json and tokenizer_config.json for data.tokenizer `name`; returns the
    eos id. A tokenizers file is copied as is (its tokenizer_config.json too, if beside it)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(name)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    if isinstance(tokenizer, ByteTokenizer):
        (out_dir / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
        config.update(eos_token=byte_symbols()[tokenizer.eos_id], split_special_tokens=True)
        config[BYTE_MARKER] = True
    else:
        source = tokenizer_file(name)
        shutil.copyfile(source, out_dir / "tokenizer.json")
        beside = source.parent / "tokenizer_config.json"
        if beside.is_file():
            shutil.copyfile(beside, out_dir / "tokenizer_config.json")
            return tokenizer.eos_id
        assert isinstance(tokenizer, FileTokenizer)
        config["eos_token"] = tokenizer.eos_token
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer.eos_id


def tokenizer_setting(directory: Path) -> str | None:
    """data.tokenizer for a transformers checkpoint directory: `byte` for one moetrain wrote
    from its bytes tokenizer, else the directory (its tokenizer.json); None if it has none."""
    directory = Path(directory)
    config = directory / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get(BYTE_MARKER):
        return "byte"
    return str(directory) if (directory / "tokenizer.json").is_file() else None
