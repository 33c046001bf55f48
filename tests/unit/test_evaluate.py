"""moetrain.evaluate in one process: the trainer's validation loss, an independent per-token
reference, bits per byte by hand, expert loads, and the command line's errors and JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import (DataConfig, LoggerConfig, LoopConfig, ModelConfig, MoEConfig,
                             OptimConfig, RunConfig, WandbConfig)
from moetrain.data.tokenizer import FileTokenizer
from moetrain.evaluate import (eval_blocks, eval_data_config, evaluate, format_report,
                               load_for_evaluation, main, token_byte_lengths)
from moetrain.model import Transformer
from moetrain.train import Trainer

BATCH = 4


def trained_run_config(run_dir) -> RunConfig:
    """3 steps of a tiny MoE (layer 0 dense, layers 1-2 MoE); validation at the last step over
    every whole batch of the validation blocks (val_batches far above what there is)."""
    return RunConfig(
        run_dir=str(run_dir),
        model=ModelConfig(vocab_size=256, dim=32, n_layers=3, n_heads=2, ffn_hidden=64,
                          max_seq_len=32, first_k_dense=1,
                          moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32)),
        data=DataConfig(synthetic_docs=200, synthetic_val_docs=12, seq_len=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        train=LoopConfig(steps=3, micro_batch_size=BATCH, log_every=3, val_every=3,
                         val_batches=1000),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled"), progress_bar=False))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, trainer's final validation loss, trainer's validation blocks)."""
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    trainer = Trainer(trained_run_config(run_dir))
    summary = trainer.fit()
    return run_dir, summary["val_loss"], trainer.val_blocks


@pytest.fixture(scope="module")
def loaded(trained):
    return load_for_evaluation(trained[0])


def reference_loss(model, blocks) -> tuple[float, int]:
    """Per-token cross-entropy, one block at a time, summed in fp64: (nats / token, tokens)."""
    nats, count = 0.0, 0
    device = next(model.parameters()).device  # load_model puts it on the GPU, if any
    with torch.no_grad():
        for block in blocks.to(device):
            logits, _ = model(block[None, :-1])  # (1, T, V)
            log_probs = F.log_softmax(logits[0].double(), dim=-1)
            nats -= log_probs.gather(1, block[1:, None]).sum().item()
            count += len(block) - 1
    return nats / count, count


def test_default_data_is_the_trainers_validation_blocks_and_the_loss_its_val_loss(trained,
                                                                                   loaded):
    run_dir, val_loss, val_blocks = trained
    cfg = loaded.cfg
    blocks, _ = eval_blocks(eval_data_config(cfg.data), cfg.model.vocab_size,
                            cfg.model.max_seq_len, own_validation=True)
    assert torch.equal(blocks, val_blocks)
    whole = len(blocks) // BATCH  # the trainer validates whole micro-batches only
    result = evaluate(loaded.model, blocks, BATCH, max_batches=whole)
    assert result.blocks == whole * BATCH and result.tokens == whole * BATCH * 16
    assert result.loss == pytest.approx(val_loss, abs=1e-6)


def test_loss_equals_a_per_token_reference_with_an_uneven_last_batch(loaded, trained):
    blocks = trained[2][:10]  # batches of 3: 3 + 3 + 3 + 1
    result = evaluate(loaded.model, blocks, 3)
    expected, tokens = reference_loss(loaded.model, blocks)
    assert result.batches == 4 and result.tokens == tokens == 160
    assert result.loss == pytest.approx(expected, abs=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert not loaded.model.training


def test_bits_per_byte_by_hand(loaded, tmp_path):
    (tmp_path / "one.txt").write_text("héllo\n")  # 5 characters, 6 UTF-8 bytes
    cfg = eval_data_config(loaded.cfg.data, data=str(tmp_path / "one.txt"), seq_len=6)
    blocks, tokenizer = eval_blocks(cfg, 256, 32, own_validation=False)
    assert blocks.tolist() == [[*"héllo".encode(), 0]]  # the document, then its eos
    result = evaluate(loaded.model, blocks, 1, token_bytes=token_byte_lengths(tokenizer))
    # predicted: the 2 bytes of é, l, l, o (5 bytes), then eos, which stands for no byte
    assert result.tokens == 6 and result.bytes == 5
    assert result.bits_per_byte == pytest.approx(result.loss * 6 / (5 * math.log(2)),
                                                 rel=1e-12)
    assert result.loss == pytest.approx(reference_loss(loaded.model, blocks)[0], abs=1e-6)


@pytest.mark.parametrize("seq_len", [8, 16, 30])
def test_another_seq_len_evaluates_only_the_text_the_run_held_out(tmp_path, seq_len):
    """The run cut its corpus into blocks of 16 + 1 and held out the last 10%; at another
    --seq-len the same tokens are evaluated, re-cut, and never one the run trained on."""
    docs = [f"document {i}: " + "the heron waits by the pond. " * (i % 5 + 1) for i in range(60)]
    (tmp_path / "corpus.txt").write_text("\n".join(docs) + "\n")
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus.txt"), val_fraction=0.1,
                     seq_len=seq_len)
    blocks, _ = eval_blocks(cfg, 256, 32, own_validation=True, trained_seq_len=16)
    stream = b"\0".join(d.encode() for d in docs) + b"\0"  # bytes, each document then eos
    trained_blocks = len(stream) // 17
    held_out = stream[(trained_blocks - max(1, int(trained_blocks * 0.1))) * 17:
                      trained_blocks * 17]
    assert blocks.shape[1] == seq_len + 1 and len(blocks) == len(held_out) // (seq_len + 1)
    assert bytes(blocks.flatten().tolist()) == held_out[:blocks.numel()]


@pytest.mark.parametrize("spelling", ["dir", "glob"])
def test_a_directory_of_jsonl_files_is_read_as_json(loaded, tmp_path, spelling):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in (("a.jsonl", "first document"), ("b.jsonl", "second one")):
        (folder / name).write_text(json.dumps({"text": text}) + "\n")
    data = str(folder) if spelling == "dir" else str(folder / "*.jsonl")
    cfg = eval_data_config(loaded.cfg.data, data=data, seq_len=8)
    assert cfg.source == "json"
    blocks, _ = eval_blocks(cfg, 256, 32, own_validation=False)
    texts = bytes(t for t in blocks.flatten().tolist() if t != 0)
    assert texts.startswith(b"first documentsec") and b"{" not in texts  # not their JSON


def test_a_directory_of_mixed_files_needs_a_source(loaded, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.txt").write_text("y\n")
    with pytest.raises(ValueError, match="holds json and text files: .* or pass --source"):
        eval_data_config(loaded.cfg.data, data=str(tmp_path))
    assert eval_data_config(loaded.cfg.data, data=str(tmp_path), source="text").source == "text"


def test_bytes_per_token_of_a_byte_level_bpe_add_up_to_the_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from moetrain.data.synthetic import generate
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    # No decoder set, as test_data builds it; no prefix space: it would add a byte to the text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(generate(200, seed=0) + ["naïve café ✓"] * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["[UNK]", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    tokenizer = FileTokenizer(str(tmp_path))
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (tokenizer.vocab_size,)
    assert lengths[tok.token_to_id("</s>")] == 0 and lengths[tok.token_to_id("[UNK]")] == 0
    for text in ("naïve café ✓ at the harbour", "id=0042; name=Ada\n3*7=21"):
        ids = tokenizer.encode(text)
        assert max(ids) > 255  # merges, not bytes
        assert lengths[ids].sum().item() == len(text.encode("utf-8"))


def test_expert_loads_and_a_dead_expert():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, router="sigmoid")))
    model.layers[0].ffn.router.expert_bias[2] = -1e4  # never selected in layer 0
    blocks = torch.randint(0, 64, (12, 17), generator=torch.Generator().manual_seed(1))
    result = evaluate(model, blocks, 5)  # batches 5 + 5 + 2
    model(blocks[:, :-1])  # one forward over everything: the same routing, all at once
    expected = [layer.last_stats["tokens_per_expert"].tolist() for layer in model.moe_layers()]
    assert result.layers == [0, 1] and result.tokens_per_expert == expected
    for i in range(2):
        counts = result.tokens_per_expert[i]
        assert sum(counts) == 12 * 16 * 2  # every token, top_k times
        assert result.max_violation[i] == pytest.approx(max(counts) / (sum(counts) / 4) - 1)
        assert result.load_fraction[i] == pytest.approx([c / sum(counts) for c in counts])
        assert result.dead_experts[i] == counts.count(0)
    assert result.tokens_per_expert[0][2] == 0 and result.dead_experts == [1, 0]


def test_a_dense_model_has_a_loss_and_no_expert_table():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2,
                                    max_seq_len=16, moe=None))
    blocks = torch.randint(0, 64, (5, 17), generator=torch.Generator().manual_seed(2))
    result = evaluate(model, blocks, 2)
    assert result.loss == pytest.approx(reference_loss(model, blocks)[0], abs=1e-6)
    assert result.layers == [] and result.tokens_per_expert == [] and result.bits_per_byte is None
    assert "dense model" in format_report(result, {})


@pytest.fixture
def bpe_300(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from moetrain.data.synthetic import generate
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(generate(200, seed=0), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (lambda run, tmp: [str(tmp / "nope")], "nope' does not exist; name a run directory"),
    (lambda run, tmp: [str(tmp)], "is neither a checkpoint directory"),
    (lambda run, tmp: [run, "--data", str(tmp / "missing.txt")], "no such file"),
    (lambda run, tmp: [run, "--seq-len", "64"], "seq_len 64 exceeds the model's max_seq_len 32"),
    (lambda run, tmp: [run, "--tokenizer", str(tmp)],
     "the model's vocab_size 256 is smaller than the tokenizer's 300 tokens"),
    (lambda run, tmp: [run, "--ep", "2"], "--ep 2 needs 2 or more ranks"),
    (lambda run, tmp: [run, "--json", str(tmp / "no" / "dir.json")], "does not exist"),
], ids=["bad-path", "not-a-run", "missing-data", "seq-len", "vocab", "ep", "json-dir"])
def test_bad_input_is_one_line_and_exit_code_2(trained, bpe_300, capsys, args, message):
    assert main(args(str(trained[0]), bpe_300)) == 2
    out, err = capsys.readouterr()
    assert err.startswith("moetrain.evaluate: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_command_line_prints_a_table_and_writes_the_numbers(trained, tmp_path, capsys):
    run_dir, val_loss, val_blocks = trained
    whole = len(val_blocks) // BATCH
    out_file = tmp_path / "eval.json"
    assert main([str(run_dir), "--batch-size", str(BATCH), "--max-batches", str(whole),
                 "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out_file.read_text())
    assert report["loss"] == pytest.approx(val_loss, abs=1e-6)
    assert report["tokens"] == whole * BATCH * 16 and report["layers"] == [1, 2]
    byte_count = (val_blocks[:whole * BATCH, 1:] != 0).sum().item()  # every id but eos
    assert report["bytes"] == byte_count
    assert report["bits_per_byte"] == pytest.approx(
        report["loss"] * report["tokens"] / (math.log(2) * byte_count), rel=1e-9)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-9)
    assert all(sum(c) == report["tokens"] * 2 for c in report["tokens_per_expert"])
    assert f"{report['loss']:.4f} nats/token" in out and "maxvio" in out
    assert out.count("\n    1 ") == 1 and out.count("\n    2 ") == 1  # one row per MoE layer


def test_the_generated_corpus_evaluates_a_run_trained_on_files(tmp_path):
    """--source synthetic on a run whose data came from files: the file paths are dropped,
    not carried into a source that reads none."""
    from moetrain.evaluate import eval_data_config
    base = DataConfig(source="text", path=str(tmp_path / "train.txt"),
                      val_path=str(tmp_path / "val.txt"), seq_len=16)
    cfg = eval_data_config(base, source="synthetic")
    assert (cfg.source, cfg.path, cfg.val_path) == ("synthetic", None, None)


def test_data_errors_name_the_flags_typed(trained, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "some text"}\n')
    assert main([str(trained[0]), "--data", str(rows)]) == 2
    err = capsys.readouterr().err
    assert err == (f"moetrain.evaluate: error: --column 'text' is not a column of --data "
                   f"{str(rows)!r}; columns: ['body']\n")
