"""Failures are loud and bounded: bad layouts fail on every rank before any collective, and a
rank that raises or hangs mid-step takes the whole job down with a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain.config import ModelConfig, MoEConfig, ParallelConfig
from tests.distributed.launcher import run_distributed

REPO = Path(__file__).resolve().parents[2]


def build_layout(rank, world_size, ep, num_experts):
    from moetrain.parallel import build_mesh
    try:
        build_mesh(ParallelConfig(ep=ep), num_experts)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("ep,num_experts,message", [
    # valid values divide both the world size and the experts
    (3, 6, "parallel.ep=3 does not divide the world size 4; valid: [1, 2]"),
    (4, 6, "model.moe.num_experts=6 is not divisible by parallel.ep=4; valid: [1, 2]"),
])
def test_bad_layout_fails_on_every_rank(ep, num_experts, message):
    messages = run_distributed(build_layout, 4, ep, num_experts)
    assert messages == [message] * 4


def test_layout_validation_needs_no_process_group():
    with pytest.raises(ValueError, match="parallel.ep=3 does not divide the world size 8"):
        ParallelConfig(ep=3).validate(8, 6)
    with pytest.raises(ValueError, match="needs an MoE model"):
        ParallelConfig(ep=2).validate(2, None)
    ModelConfig(moe=MoEConfig(num_experts=8)).validate()


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_failing_rank_stops_all_ranks_in_bounded_time(mode):
    timeout_s = 10
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--max-restarts", "0", "--monitor-interval", "0.5",
         str(REPO / "tests/distributed/crash_worker.py"), mode, str(timeout_s)],
        env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 0 step 1" in proc.stdout  # training really ran before the failure
    assert "rank 0 step 2" not in proc.stdout
    assert elapsed < 90, f"job took {elapsed:.0f}s to die"
    if mode == "raise":
        assert "injected failure on rank 1" in proc.stderr
