"""Byte-level BPE: training one (`train_byte_bpe`, scripts/train_tokenizer.py), the built-in
`stdlib-bpe-2048` that data=python_stdlib uses, and packing documents with it."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetrain.config import DataConfig
from moetrain.data import stdlib
from moetrain.data.loader import build_data, load_texts, tokenize_and_pack
from moetrain.data.synthetic import generate
from moetrain.data.tokenizer import (END_OF_TEXT, build_tokenizer, builtin_tokenizers,
                                     save_tokenizer, train_byte_bpe)
from moetrain.evaluate import token_byte_lengths

REPO = Path(__file__).resolve().parents[2]
ODD_TEXT = "naïve café — 東京 🚀\tx\r\n\x00\x7f end <|endoftext|> tail"


def test_trained_bpe_is_deterministic_covers_every_byte_and_ends_documents_with_id_0(tmp_path):
    texts = generate(400, seed=3)
    first, second = train_byte_bpe(texts, 400), train_byte_bpe(texts, 400)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 400
    save_tokenizer(first, tmp_path / "tok")
    tok = build_tokenizer(str(tmp_path / "tok"))
    assert (tok.vocab_size, tok.eos_id, tok.eos_token) == (400, 0, END_OF_TEXT)
    # bytes never seen in training still encode, and decode back to the same text
    ids = tok.encode(ODD_TEXT)
    assert tok.decode(ids) == ODD_TEXT
    # the end-of-document token written in a document is text, not an end of document
    assert tok.eos_id not in ids
    # merges were learnt: fewer tokens than bytes on the training text
    assert len(tok.encode(texts[0])) < 0.7 * len(texts[0].encode("utf-8"))
    with pytest.raises(ValueError, match="vocab_size=200 must be at least 257"):
        train_byte_bpe(texts, 200)


def test_built_in_tokenizer_resolves_by_name_and_counts_bytes_exactly():
    assert "stdlib-bpe-2048" in builtin_tokenizers()
    tok = build_tokenizer("stdlib-bpe-2048")
    assert (tok.vocab_size, tok.eos_id) == (2048, 0)
    text = stdlib.load_split("validation", 0.02).texts[0] + ODD_TEXT
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    lengths = token_byte_lengths(tok)
    assert lengths[ids].sum().item() == len(text.encode("utf-8"))  # nats/byte is exact
    assert len(text.encode("utf-8")) / len(ids) > 2.0
    with pytest.raises(ValueError, match="use 'byte', one of .*stdlib-bpe-2048"):
        build_tokenizer("stdlib-bpe-4096")


def test_no_token_dominates_the_held_out_stdlib_text():
    """Why python_stdlib ships a BPE: with bytes, the space alone is ~30% of the tokens, and
    an MoE layer that has not learnt context yet must send all of them to one set of experts."""
    tok = build_tokenizer("stdlib-bpe-2048")
    texts = stdlib.load_split("validation", 0.02).texts
    bpe = collections.Counter(i for ids in tok.encode_batch(texts) for i in ids)
    byte = collections.Counter(b for t in texts for b in t.encode("utf-8"))
    bpe_top, byte_top = (c.most_common(1)[0][1] / c.total() for c in (bpe, byte))
    assert byte_top > 0.2 and bpe_top < 0.05


@pytest.mark.parametrize("data", ["python_stdlib", "local_text", "local_json", "hub"])
def test_real_text_configs_set_the_bpe_and_the_vocabulary_whatever_the_model(data):
    """Real text reads the built-in BPE (bytes leave MoE layers unbalanceable for the first
    steps); the data config sets model.vocab_size with it, over any model config's."""
    from moetrain.train.cli import config_from_overrides
    path = [] if data == "python_stdlib" else ["data.path=x"]
    for model in ("mixtral_tiny", "deepseek_tiny", "dense_tiny"):
        for order in ([f"model={model}", f"data={data}"], [f"data={data}", f"model={model}"]):
            cfg = config_from_overrides([*order, *path])
            assert (cfg.data.tokenizer, cfg.model.vocab_size) == ("stdlib-bpe-2048", 2048)
    cfg = config_from_overrides([f"data={data}", *path, "data.tokenizer=byte",
                                 "model.vocab_size=256"])
    assert (cfg.data.tokenizer, cfg.model.vocab_size) == ("byte", 256)
    assert config_from_overrides(["data=synthetic"]).model.vocab_size == 256
    assert config_from_overrides(["data=synthetic"]).data.tokenizer == "byte"


def test_packing_with_a_bpe_matches_encoding_each_document():
    """The batched encoder (chunks of 1024 documents) packs what one-by-one encoding would."""
    cfg = DataConfig(synthetic_docs=2500, seq_len=31, tokenizer="stdlib-bpe-2048")
    ds = load_texts(cfg, "train")
    tok = build_tokenizer(cfg.tokenizer)
    flat = [i for text in ds[cfg.column] for i in (*tok.encode(text), tok.eos_id)]
    n = len(flat) // 32
    expected = torch.tensor(flat[:n * 32]).view(n, 32)
    assert torch.equal(tokenize_and_pack(ds, cfg, tok), expected)
    train, val = build_data(cfg, 2, 0, 1, vocab_size=2048)
    assert train.next_batch().max() > 255 and val is not None


def test_train_tokenizer_script_writes_a_tokenizer_the_trainer_reads(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(generate(300, seed=1)))
    out = tmp_path / "tok"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--vocab-size", "320",
         "--out", str(out), "data=local_text", f"data.path={corpus}",
         "data.sample_by=paragraph"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "320 tokens, learnt from 300 documents" in result.stdout
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == END_OF_TEXT and config["split_special_tokens"] is True
    train, _ = build_data(DataConfig(source="text", path=str(corpus), sample_by="paragraph",
                                     tokenizer=str(out), seq_len=16), 2, 0, 1, vocab_size=320)
    assert train.next_batch().max() > 255


@pytest.mark.parametrize("overrides, message", [
    (["data=local_text"], "data.source='text' needs data.path"),
    (["data.stepz=3"], "unknown config key 'data.stepz'"),
    (["data=synthetic", "data.sample_by=foo"], "data.sample_by='foo' is not one of"),
])
def test_train_tokenizer_script_bad_input_is_one_line(tmp_path, overrides, message):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--vocab-size", "300",
         "--out", str(tmp_path / "tok"), *overrides], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("train_tokenizer: error: ")
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "tok").exists()


def test_a_tokenizer_without_an_end_of_text_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world! " * 50], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert tok.id_to_token(0) == "!"  # what an eos id of 0 would have cut from every text
    with pytest.raises(ValueError, match=r"has no end-of-text token .*separates documents"):
        build_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "!"}))
    assert build_tokenizer(str(tmp_path)).eos_id == 0  # named: the user's choice


def test_byte_decode_drops_ids_past_the_bytes():
    # a model.vocab_size padded beyond the tokenizer's can sample ids that stand for no text
    assert build_tokenizer("byte").decode([104, 300, 105, 0, 256]) == "hi"


def test_pack_keeps_whole_blocks_only():
    from moetrain.data.loader import pack
    blocks = pack([[5, 6, 7], [8]], eos_id=0, block=3)  # 5 6 7 0 8 0 -> two blocks
    assert blocks.tolist() == [[5, 6, 7], [0, 8, 0]]
    assert pack([[1, 2]], eos_id=0, block=8).shape == (0, 8)
