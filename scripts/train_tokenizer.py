"""Train a byte-level BPE tokenizer on the training split of a data config.

    .venv/bin/python scripts/train_tokenizer.py --vocab-size 2048 --out DIR [data overrides]

The data overrides are Hydra's, as for training (default: data=python_stdlib), e.g.
`data=local_text data.path=book.txt data.sample_by=paragraph`. DIR gets tokenizer.json and
tokenizer_config.json; train with `data.tokenizer=DIR model.vocab_size=<its size>`.

The built-in `stdlib-bpe-2048` (data=python_stdlib's tokenizer) was made on CPython 3.11.7 with

    .venv/bin/python scripts/train_tokenizer.py --vocab-size 2048 \\
        --out moetrain/data/tokenizers/stdlib-bpe-2048
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("overrides", nargs="*", help="Hydra data overrides")
    args = parser.parse_args()
    if args.vocab_size < 257:
        parser.error(f"--vocab-size {args.vocab_size} must be at least 257 (256 bytes and the "
                     "end-of-document token)")

    from moetrain.data.loader import load_texts
    from moetrain.data.tokenizer import save_tokenizer, train_byte_bpe
    from moetrain.train.cli import config_from_overrides
    overrides = args.overrides or ["data=python_stdlib"]
    start = time.perf_counter()
    try:  # bad overrides or data: one line, exit 2, as for training
        cfg = config_from_overrides(["logger=none", *overrides]).data
        cfg.validate()
        if cfg.streaming:
            raise ValueError("data.streaming=true: train the tokenizer on a local sample "
                             "instead")
        texts = load_texts(cfg, "train")
    except ValueError as error:
        print(f"train_tokenizer: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    column = texts[cfg.column]
    tokenizer = train_byte_bpe(column, args.vocab_size)
    out = save_tokenizer(tokenizer, args.out)
    n_bytes = sum(len(t.encode("utf-8")) for t in column)
    n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(list(column)))
    print(f"{out}: {tokenizer.get_vocab_size()} tokens, learnt from {len(column):,} "
          f"document{'s' * (len(column) != 1)} "
          f"({n_bytes / 1e6:.1f} MB) in {time.perf_counter() - start:.0f} s; "
          f"{n_bytes / n_tokens:.2f} bytes per token on them")


if __name__ == "__main__":
    main()
