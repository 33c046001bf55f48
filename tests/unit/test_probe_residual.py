"""The residual-stream instruments of moetrain.probes against per-row and per-pair loops, and
scripts/probe_residual.py on a two-step run that reports every layer on the real corpus."""

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from moetrain.probes import common_and_spread, mean_pairwise_cosine

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "probe_residual.py"
spec = importlib.util.spec_from_file_location("probe_residual", SCRIPT)
probe_residual = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_residual)


def test_statistics_match_loops():
    torch.manual_seed(0)
    common = torch.randn(16) * 3
    x = common + torch.randn(10, 16)
    mean = sum(x[i] for i in range(10)) / 10
    spread = sum((x[i] - mean).norm().item() for i in range(10)) / 10
    assert common_and_spread(x) == pytest.approx((mean.norm().item(), spread))
    cosines = [torch.nn.functional.cosine_similarity(x[i], x[j], dim=0).item()
               for i, j in itertools.product(range(10), repeat=2)]
    assert mean_pairwise_cosine(x) == pytest.approx(sum(cosines) / 100)
    same = torch.randn(1, 16).repeat(5, 1)
    assert common_and_spread(same)[1] == pytest.approx(0, abs=1e-6)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)


def test_two_steps_report_every_layer(tmp_path, capsys):
    reports = probe_residual.main([
        "--at", "1", "2", "--", "train.micro_batch_size=2", "data.seq_len=32"])
    again = probe_residual.main([  # the default run dir is scratch: a second run is welcome
        "--at", "1", "--", "train.micro_batch_size=2", "data.seq_len=32"])
    assert again[1] == reports[1]
    assert sorted(reports) == [1, 2]
    for rows in reports.values():
        assert [row["layer"] for row in rows] == [0, 1, 2, 3]
        assert [row["moe"] for row in rows] == [False, True, True, True]  # first_k_dense=1
        for row in rows:
            assert 0 < row["ffn_input_cosine"] <= 1 + 1e-6
            assert all(v > 0 for v in (*row["attn"], *row["ffn"]))
    assert reports[1] != reports[2]  # the model moved between the two reports
    out = capsys.readouterr().out
    assert "step 1: layer" in out and "step 2: layer" in out
    with pytest.raises(SystemExit):
        probe_residual.main(["--at", "0"])
