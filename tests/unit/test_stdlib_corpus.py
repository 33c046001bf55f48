"""data=python_stdlib (the running Python's standard library sources) and how local text
files are cut into documents."""

from __future__ import annotations

import torch

import pytest

from moetrain.config import DataConfig
from moetrain.data import stdlib
from moetrain.data.loader import build_data, load_texts, pack, tokenize_and_pack
from moetrain.data.tokenizer import ByteTokenizer


def test_split_is_by_file_deterministic_and_disjoint():
    train, val = stdlib.load_split("train", 0.02), stdlib.load_split("validation", 0.02)
    again = stdlib.load_split("validation", 0.02)
    assert val.names == again.names and val.texts == again.texts
    assert not set(train.names) & set(val.names)
    everything = stdlib.stdlib_files()
    assert len(train.names) + len(val.names) + train.skipped + val.skipped == len(everything)
    assert train.names == sorted(train.names)  # a fixed order
    assert 0.005 < len(val.names) / len(everything) < 0.05
    assert train.bytes > 10e6  # a real corpus, tens of MB
    # the split depends on the path alone: a larger fraction only adds files to validation
    assert set(val.names) <= set(stdlib.load_split("validation", 0.1).names)
    root = stdlib.stdlib_root()
    assert (root / val.names[0]).read_text(encoding="utf-8") == val.texts[0]


def test_missing_sources_fail_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "only.pyc").write_bytes(b"\0")
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: tmp_path)
    with pytest.raises(ValueError, match=r"data=python_stdlib: no \.py source files under"):
        build_data(DataConfig(source="python_stdlib"), 4, 0, 1, 256)


def test_stdlib_blocks_are_the_files_bytes(capsys):
    data, val = build_data(DataConfig(source="python_stdlib", seq_len=64), 4, 0, 1, 256)
    assert "python_stdlib of Python" in capsys.readouterr().out
    first_val = stdlib.load_split("validation", 0.02).texts[0].encode("utf-8")
    assert bytes(val[0].tolist()) == first_val[:65]
    assert data.blocks.shape[1] == 65 and len(data.blocks) > 100_000


def test_byte_fast_path_packs_like_the_generic_one():
    cfg = DataConfig(synthetic_docs=200, seq_len=33)
    ds = load_texts(cfg, "train")
    tok = ByteTokenizer()
    expected = pack([tok.encode(t) for t in ds[cfg.column]], tok.eos_id, cfg.seq_len + 1)
    assert torch.equal(tokenize_and_pack(ds, cfg, tok), expected)


@pytest.mark.parametrize("sample_by, documents", [("line", 5), ("paragraph", 3),
                                                  ("document", 2)])
def test_text_files_split_into_lines_paragraphs_or_whole_files(tmp_path, sample_by, documents):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")  # 3 lines, 2 paragraphs
    (tmp_path / "b.txt").write_text("four\nfive\n")  # 2 lines, 1 paragraph
    cfg = DataConfig(source="text", path=str(tmp_path / "*.txt"), sample_by=sample_by)
    texts = [t for t in load_texts(cfg, "train")[cfg.column] if t.strip()]
    assert len(texts) == documents
    if sample_by == "document":
        assert texts[0] == "one\ntwo\n\nthree\n"
