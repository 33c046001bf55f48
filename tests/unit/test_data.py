import json

import pytest
import torch

from moetrain.config import DataConfig
from moetrain.data.loader import ShardedBlocks, build_data, pack
from moetrain.data.synthetic import DOMAINS, generate
from moetrain.data.tokenizer import ByteTokenizer


def test_synthetic_corpus_is_deterministic_and_mixes_domains():
    a, b = generate(200, seed=3), generate(200, seed=3)
    assert a == b and generate(200, seed=4) != a
    joined = "\n".join(a)
    assert "=" in joined and "def " in joined and "name=" in joined and "The " in joined
    assert len(DOMAINS) >= 4
    for line in joined.splitlines():  # arithmetic lines are correct
        if line and line[0].isdigit() and "=" in line and ";" not in line:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs)


def test_pack_appends_eos_and_cuts_blocks():
    blocks = pack([[1, 2, 3], [4, 5]], eos_id=0, block=3)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]  # the final eos does not fill a block


def test_two_ranks_never_read_the_same_block_in_an_epoch():
    blocks = torch.arange(103).unsqueeze(1)
    ranks = [ShardedBlocks(blocks, 4, 1, rank=r, world=2, seed=7) for r in range(2)]
    per_epoch = ranks[0].micro_batches_per_epoch
    assert per_epoch == 12  # 103 blocks // global batch 8 = 12 steps
    for epoch in range(2):
        seen = [torch.cat([rank.next_batch() for _ in range(per_epoch)]).flatten().tolist()
                for rank in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0])) == len(seen[0]) == 48
    assert ranks[0].epoch == 1


def test_global_batch_does_not_depend_on_the_split():
    blocks = torch.arange(200).unsqueeze(1)
    two = [ShardedBlocks(blocks, 4, 2, rank=r, world=2, seed=3) for r in range(2)]
    four = [ShardedBlocks(blocks, 2, 2, rank=r, world=4, seed=3) for r in range(4)]
    one = ShardedBlocks(blocks, 16, 1, rank=0, world=1, seed=3)
    for _ in range(15):  # crosses an epoch boundary (12 steps of 16)
        a = torch.cat([r.next_batch() for r in two for _ in range(2)])
        b = torch.cat([r.next_batch() for r in four for _ in range(2)])
        assert sorted(a.flatten().tolist()) == sorted(b.flatten().tolist()) == sorted(
            one.next_batch().flatten().tolist())


def test_sharded_blocks_resume_where_they_stopped():
    blocks = torch.arange(50).unsqueeze(1)
    straight = ShardedBlocks(blocks, 3, 1, 0, 1, seed=1)
    expected = [straight.next_batch() for _ in range(40)]  # crosses epoch boundaries
    first = ShardedBlocks(blocks, 3, 1, 0, 1, seed=1)
    got = [first.next_batch() for _ in range(17)]
    resumed = ShardedBlocks(blocks, 3, 1, 0, 1, seed=1)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_batch() for _ in range(23)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_sharded_blocks_refuse_to_resume_with_another_global_batch():
    """The position is stored in optimizer steps: step s of a global batch of 8 blocks would
    start at another block under a global batch of 6 (re-reading and skipping data)."""
    blocks = torch.arange(50).unsqueeze(1)
    first = ShardedBlocks(blocks, 4, 1, 0, 2, seed=1)  # 2 ranks x 4
    [first.next_batch() for _ in range(3)]
    same = ShardedBlocks(blocks, 2, 2, 0, 2, seed=1)  # 2 ranks x 2 x accumulation 2
    same.load_state_dict(first.state_dict())
    smaller = ShardedBlocks(blocks, 3, 1, 0, 2, seed=1)
    with pytest.raises(ValueError, match=r"global batches of 8 blocks, this run's are 6 .*"
                                         r"resume with a global batch of 8"):
        smaller.load_state_dict(first.state_dict())


def test_synthetic_build_has_validation_split():
    cfg = DataConfig(synthetic_docs=300, synthetic_val_docs=50, seq_len=32)
    train, val = build_data(cfg, batch_size=4, rank=0, world=1, vocab_size=256)
    batch = train.next_batch()
    assert batch.shape == (4, 33) and batch.max() < 256
    assert val.shape[1] == 33 and len(val) > 0


def test_local_text_and_json_files(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line number {i} of a small corpus" for i in range(200)))
    train, val = build_data(DataConfig(source="text", path=str(text), seq_len=16), 2, 0, 1, 256)
    assert train.next_batch().shape == (2, 17) and val is not None
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"content": f"record {i} " * 5}) for i in range(100)))
    cfg = DataConfig(source="json", path=str(rows), column="content", seq_len=16)
    train, _ = build_data(cfg, 2, 0, 1, 256)
    assert bytes(train.next_batch()[0].tolist()).decode(errors="ignore").count("record") >= 1


def test_streaming_local_json_shards_and_resumes(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"doc {i:03d} " * 4}) for i in range(60)))
    cfg = DataConfig(source="json", path=str(rows), streaming=True, seq_len=8)
    a, _ = build_data(cfg, 2, 0, 2, 256)
    b, _ = build_data(cfg, 2, 1, 2, 256)
    batches_a = [a.next_batch() for _ in range(5)]
    assert not torch.equal(batches_a[0], b.next_batch())
    again, _ = build_data(cfg, 2, 0, 2, 256)
    again.load_state_dict({"consumed": 6})
    assert torch.equal(again.next_batch(), batches_a[3])
    alone, _ = build_data(cfg, 4, 0, 1, 256)  # one rank's share would be another stream
    with pytest.raises(ValueError, match="the checkpoint streamed its data on 2 ranks, this run "
                                         "has 1; streaming data resumes on 2 ranks only"):
        alone.load_state_dict(a.state_dict())


@pytest.mark.parametrize("make,message", [
    (lambda d: DataConfig(source="text", path=str(d / "missing.txt")), "does not exist"),
    (lambda d: DataConfig(source="text", path=str(d / "empty.txt")), "is empty"),
    (lambda d: DataConfig(source="text", path=str(d / "nothing")), "nothing' is an empty dir"),
    (lambda d: DataConfig(source="json", path=str(d / "rows.jsonl"), column="body"),
     "data.column='body' is not a column"),
    (lambda d: DataConfig(source="text", path=str(d / "tiny.txt"), seq_len=64),
     "fewer than 65 tokens"),
    (lambda d: DataConfig(tokenizer=str(d / "nope")), "no tokenizer.json there"),
    (lambda d: DataConfig(source="json", path=str(d / "rows.jsonl"), column="id"),
     "data.column='id' of .* holds int64, not text"),
    (lambda d: DataConfig(source="json", path=str(d / "rows.jsonl"), column="id",
                          streaming=True), "data.column='id' of .* holds int64, not text"),
    (lambda d: DataConfig(source="json", path=str(d / "mixed.jsonl")), "holds Json, not text"),
    (lambda d: DataConfig(source="text", path=str(d / "blank.txt"), seq_len=8),
     "holds no text: every document in data.column='text' is empty"),
    (lambda d: DataConfig(source="text", path=str(d / "blank.txt"), seq_len=8,
                          tokenizer="byte"), "holds no text"),
    # streamed: the first block is read while the data is built, not steps into the run
    (lambda d: DataConfig(source="text", path=str(d / "tiny.txt"), seq_len=64, streaming=True),
     r"data.path='.*tiny.txt' yields no block of 65 tokens \(data.seq_len 64 \+ 1\) on rank 0"),
    (lambda d: DataConfig(source="json", path=str(d / "emptyarr.json"), streaming=True),
     "emptyarr.json' holds no rows"),
    # the validation source is named, not the training one
    (lambda d: DataConfig(source="json", path=str(d / "good.jsonl"), val_path=str(
        d / "rows.jsonl"), column="body"), "data.column='body' is not a column of "
     "data.val_path='.*rows.jsonl'"),
    (lambda d: DataConfig(source="text", path=str(d / "good.txt"), val_path=str(d / "tiny.txt"),
                          seq_len=8), r"data.val_path='.*tiny.txt' holds fewer than 9 tokens"),
    (lambda d: DataConfig(source="text", path=str(d / "good.txt"), val_path=str(d / "tiny.txt"),
                          seq_len=8, streaming=True),
     r"data.val_path='.*tiny.txt' holds fewer than 9 tokens"),
    (lambda d: DataConfig(synthetic_docs=1, seq_len=256), "data.synthetic_docs=1 holds fewer"),
    # parquet is binary: the reason is arrow's, not "not UTF-8 text"
    (lambda d: DataConfig(source="parquet", path=str(d / "truncated.parquet")),
     r"truncated.parquet': datasets could not read it as data.source='parquet' \(ArrowInvalid"),
])
def test_bad_data_fails_clearly_before_training(tmp_path, make, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "tiny.txt").write_text("hi")
    (tmp_path / "blank.txt").write_text("\n" * 100)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "a", "id": 1}) + "\n")
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                  for t in ["a", 12345, "b"]))
    (tmp_path / "emptyarr.json").write_text("[]")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "good.jsonl").write_text(json.dumps({"body": "some words " * 20}) + "\n")
    (tmp_path / "good.txt").write_text("some words here\n" * 20)
    (tmp_path / "truncated.parquet").write_bytes(b"PAR1\xff\x15\x00\x15\x1c")
    with pytest.raises(ValueError, match=message):
        build_data(make(tmp_path), 2, 0, 1, 256)


def test_a_stream_without_declared_features_is_judged_by_its_first_row():
    import datasets

    from moetrain.data.loader import _column_kind

    def rows(value):
        return datasets.IterableDataset.from_generator(lambda: iter([{"text": value}]))
    assert rows(1).features is None
    assert [_column_kind(rows(v), "text", "data.path", "x") for v in (1, "a", None)] == [
        "int", "string",
                                                                        "string"]


def test_a_bad_file_met_midway_through_a_stream_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("good text line\n" * 50)
    (tmp_path / "b.txt").write_bytes(b"more\n\xff\xfe bad bytes\n")
    cfg = DataConfig(source="text", path=str(tmp_path / "*.txt"), streaming=True, seq_len=16)
    source, _ = build_data(cfg, 4, 0, 1, 256)
    with pytest.raises(ValueError, match=r"b.txt is not UTF-8 text \(invalid byte at offset 5\)"):
        for _ in range(100):
            source.next_batch()


def test_streamed_packing_equals_packing_in_memory():
    from moetrain.data.loader import packed_stream
    from moetrain.data.tokenizer import ByteTokenizer
    texts = ["x" * 5000, "", "short", "y" * 37, "z" * 12]  # one document of many blocks
    tok = ByteTokenizer()
    streamed = torch.stack(list(packed_stream([{"text": t} for t in texts], "text", tok, 17)))
    assert torch.equal(streamed, pack([tok.encode(t) for t in texts], tok.eos_id, 17))


def test_a_streamed_validation_source_is_read_once():
    from moetrain.data.loader import STREAMED_VAL_BLOCKS
    cfg = DataConfig(synthetic_docs=50, synthetic_val_docs=3, streaming=True, seq_len=16)
    _, val = build_data(cfg, 2, 0, 1, 256)
    _, in_memory = build_data(DataConfig(synthetic_docs=50, synthetic_val_docs=3, seq_len=16),
                              2, 0, 1, 256)
    assert 0 < len(val) < STREAMED_VAL_BLOCKS and torch.equal(val, in_memory)


def test_an_epoch_order_is_drawn_once(monkeypatch):
    draws = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(1) or real(*a, **k))
    source = ShardedBlocks(torch.arange(40).unsqueeze(1), 2, 1, 0, 1, seed=0)
    for _ in range(30):  # 20 micro-batches per epoch: two epochs
        source.next_batch()
    assert len(draws) == 2


@pytest.mark.parametrize("change,message", [
    (dict(seed=4), r"data.seed: 3 there, 4 here.*resume with data.seed = 3"),
    (dict(blocks=torch.arange(90).view(45, 2)), "training blocks: 50 there, 45 here.*init_from"),
    (dict(blocks=torch.arange(150).view(50, 3)), r"data.seq_len \+ 1: 2 there, 3 here"),
])
def test_sharded_blocks_refuse_to_resume_into_other_data(change, message):
    args = dict(blocks=torch.arange(100).view(50, 2), seed=3)
    first = ShardedBlocks(args["blocks"], 4, 1, 0, 1, seed=args["seed"])
    first.next_batch()
    args.update(change)
    other = ShardedBlocks(args["blocks"], 4, 1, 0, 1, seed=args["seed"])
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(first.state_dict())
    same = ShardedBlocks(torch.arange(100).view(50, 2), 4, 1, 0, 1, seed=3)
    same.load_state_dict(first.state_dict())
    assert torch.equal(same.next_batch(), first.next_batch())


def test_streaming_refuses_to_resume_at_another_seq_len(tmp_path):
    (tmp_path / "a.txt").write_text("good text line\n" * 50)
    cfg = DataConfig(source="text", path=str(tmp_path / "a.txt"), streaming=True, seq_len=16)
    first, _ = build_data(cfg, 2, 0, 1, 256)
    longer, _ = build_data(DataConfig(**{**cfg.__dict__, "seq_len": 32}), 2, 0, 1, 256)
    with pytest.raises(ValueError, match=r"data.seq_len \+ 1: 17 there, 33 here"):
        longer.load_state_dict(first.state_dict())


def test_vocab_smaller_than_tokenizer_is_rejected():
    with pytest.raises(ValueError, match="model.vocab_size=100 is smaller"):
        build_data(DataConfig(synthetic_docs=10), 1, 0, 1, vocab_size=100)


def test_local_tokenizers_json_is_used_for_packing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(generate(300, seed=0), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = DataConfig(synthetic_docs=200, seq_len=16, tokenizer=str(tmp_path))
    train, _ = build_data(cfg, 2, 0, 1, vocab_size=512)
    batch = train.next_batch()
    assert batch.shape == (2, 17) and batch.max() < tok.get_vocab_size()
    assert batch.max() > 255  # real BPE merges, not bytes
    with pytest.raises(ValueError, match="model.vocab_size=256 is smaller"):
        build_data(cfg, 2, 0, 1, vocab_size=256)


def test_a_stream_resumes_at_its_position_without_reading_it_again(tmp_path):
    """Long documents (a block's tokens span documents and a document spans blocks), two
    ranks, an epoch boundary: resuming from the state equals reading on, and reads only the
    documents it still needs (datasets seeks), not the whole way from the start."""
    for f in range(3):
        (tmp_path / f"{f}.jsonl").write_text("".join(
            json.dumps({"text": f"file {f} doc {i} " + "word " * (i % 7 * 2)}) + "\n"
            for i in range(40)))
    cfg = DataConfig(source="json", path=str(tmp_path / "*.jsonl"), streaming=True, seq_len=24)

    class Counting(ByteTokenizer):
        calls = 0

        def encode(self, text):
            Counting.calls += 1
            return super().encode(text)

    for rank in (0, 1):
        first, _ = build_data(cfg, 3, rank, 2, 256)
        first.tokenizer = Counting()
        straight = [first.next_batch() for _ in range(40)]  # past the end of the share
        assert first.epoch >= 1
        for stop in (5, 33):
            run, _ = build_data(cfg, 3, rank, 2, 256)
            run.tokenizer = Counting()
            for _ in range(stop):
                run.next_batch()
            resumed, _ = build_data(cfg, 3, rank, 2, 256)
            resumed.tokenizer = Counting()
            Counting.calls = 0
            resumed.load_state_dict(run.state_dict())
            for want in straight[stop:stop + 4]:
                assert torch.equal(resumed.next_batch(), want)
            assert Counting.calls < 12  # the documents of 4 batches, not of `stop` more
            assert resumed.consumed == run.consumed + 12


def test_a_hub_dataset_that_cannot_be_loaded_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub (LocalEntryNotFoundError)"
                              "\nTraceback continues...")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError) as error:
        build_data(DataConfig(source="hub", path="org/corpus"), 2, 0, 1, 256)
    assert str(error.value) == ("data.path='org/corpus' (data.source='hub', split 'train') could "
                                "not be loaded: ConnectionError: Couldn't reach 'org/corpus' on "
                                "the Hub (LocalEntryNotFoundError)")
