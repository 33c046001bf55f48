"""moetrain.evaluate on 2 gloo ranks equals one process: the library under ep=2 (dense layers
FSDP over both ranks) and the real command line under torchrun with ep=1 (experts FSDP too),
on data whose batches do not divide evenly over the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.tensor import DTensor

from moetrain.data.synthetic import generate
from moetrain.evaluate import (eval_blocks, eval_data_config, evaluate, load_for_evaluation,
                               main, token_byte_lengths)
from moetrain.train import Trainer
from tests.distributed.launcher import run_distributed
from tests.unit.test_evaluate import trained_run_config

REPO = Path(__file__).resolve().parents[2]
BATCH = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint run dir, a JSON-lines file, the one-process result on it as a dict)."""
    root = tmp_path_factory.mktemp("evaluate-dist")
    Trainer(trained_run_config(root / "run")).fit()
    text = root / "docs.jsonl"  # 134 blocks of 17 tokens: 45 batches of 3, the last of 2
    text.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in generate(15, seed=5)))
    loaded = load_for_evaluation(root / "run")
    blocks, tokenizer = blocks_of(loaded.cfg, str(text))
    assert len(blocks) == 134
    result = evaluate(loaded.model, blocks, BATCH, token_bytes=token_byte_lengths(tokenizer))
    return root / "run", text, result.to_dict()


def blocks_of(cfg, path: str):
    return eval_blocks(eval_data_config(cfg.data, data=path), cfg.model.vocab_size,
                       cfg.model.max_seq_len, own_validation=False)


def evaluate_rank(rank, world_size, run_dir, text):
    loaded = load_for_evaluation(run_dir, ep=2)
    experts = loaded.model.moe_layers()[0].experts.w_gate
    assert isinstance(experts, DTensor) and experts.to_local().shape[0] == 2  # 4 experts / 2
    blocks, tokenizer = blocks_of(loaded.cfg, str(text))
    return evaluate(loaded.model, blocks, BATCH, module=loaded.module,
                    token_bytes=token_byte_lengths(tokenizer)).to_dict()


def assert_same(got: dict, expected: dict):
    for key in ("tokens", "bytes", "blocks", "batches", "layers", "tokens_per_expert",
                "dead_experts"):
        assert got[key] == expected[key], key
    for key in ("loss", "bits_per_byte", "perplexity"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    for key in ("max_violation", "load_entropy"):
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_ep2_equals_one_process(setup):
    run_dir, text, expected = setup
    results = run_distributed(evaluate_rank, 2, run_dir, text)
    for got in results:  # every rank holds the reduced result
        assert_same(got, expected)


def torchrun(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "moetrain.evaluate", *map(str, args)], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
             "HF_DATASETS_OFFLINE": "1"}, timeout=180)


def test_command_line_under_torchrun_equals_one_process(setup, tmp_path, capsys):
    run_dir, text, expected = setup
    proc = torchrun(run_dir, "--data", text, "--batch-size", BATCH, "--ep", 1,
                    "--json", tmp_path / "two.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("nats/token") == 1  # rank 0 prints
    assert "ranks       2 (ep 1)" in proc.stdout
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    assert_same(two, expected)
    # the one-process command line writes the same numbers
    assert main([str(run_dir), "--data", str(text), "--batch-size", str(BATCH),
                 "--json", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["world_size"] == 1
    assert_same(two, one)


def test_bad_input_under_torchrun_fails_fast_with_one_line(setup, tmp_path):
    """Checked before the process group starts, so no rank waits in a collective. torchrun
    stops the other rank as soon as one exits, so one or two ranks get to print their line;
    the launcher's own ChildFailedError traceback follows."""
    proc = torchrun(setup[0], "--data", tmp_path / "missing.txt")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith("moetrain.evaluate: error:")]
    assert errors and all("no such file" in line for line in errors)
    assert "exitcode  : 2" in proc.stderr and "moetrain/evaluate.py" not in proc.stderr


def test_a_lora_run_evaluated_at_ep2_equals_one_process(setup, tmp_path):
    """Adapters-only checkpoint: each rank builds base + adapters sharded at ep=2 and loads
    both; one process runs the same adapters unmerged."""
    from moetrain.checkpoint import find_checkpoint, load_model
    from moetrain.config import FinetuneConfig, LoRAConfig
    run_dir, text, _ = setup
    cfg = trained_run_config(tmp_path / "lora")
    cfg.init_from = str(find_checkpoint(run_dir))
    cfg.finetune = FinetuneConfig(LoRAConfig(rank=4, targets=["experts", "attention"]))
    cfg.optim.lr = 3e-2
    Trainer(cfg).fit()
    model, loaded_cfg = load_model(tmp_path / "lora", merge=False)
    blocks, tokenizer = blocks_of(loaded_cfg, str(text))
    expected = evaluate(model, blocks, BATCH, token_bytes=token_byte_lengths(tokenizer)).to_dict()
    for got in run_distributed(evaluate_rank, 2, tmp_path / "lora", text):
        assert_same(got, expected)
