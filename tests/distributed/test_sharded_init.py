"""Building on the meta device and materialising only this rank's shards: the peak resident
memory of building a model, and of loading a checkpoint into it, stays within the rank's
shard plus a small constant, well below the whole model, and the shard is the size dry_run
reports. (That the values equal one
process's init bit for bit is checked for every layout of the equivalence gate.)"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from moetrain.config import ModelConfig, MoEConfig, ParallelConfig
from moetrain.model import Transformer
from moetrain.parallel import build_mesh, parallelize
from moetrain.parallel.memory import (peak_resident_bytes, reset_peak_resident, resident_bytes,
                                      state_bytes_per_rank)
from tests.distributed.launcher import run_distributed

MiB = 2**20
SLACK = 24 * MiB  # allocator and process-group noise, one row of init, rope tables

# ~42M parameters, 168 MiB in fp32; 16 experts of 3 x 256 x 768 in each of 3 MoE layers.
CFG = ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=4, ffn_hidden=1024,
                  max_seq_len=64, first_k_dense=1,
                  moe=MoEConfig(num_experts=16, top_k=2, expert_hidden=768))


def build(rank, world_size, pcfg: ParallelConfig, checkpoint: str) -> dict:
    mesh = build_mesh(pcfg, CFG.moe.num_experts)
    with torch.device("meta"):  # the first meta build costs ~30 MiB of one-time lazy set-up
        Transformer(CFG)
    gc.collect()
    assert reset_peak_resident(), "needs Linux's /proc/self/clear_refs"
    before = resident_bytes()
    with torch.device("meta"):
        model = Transformer(CFG)
    parallelize(model, mesh, pcfg, seed=0)
    peak, after = peak_resident_bytes(), resident_bytes()
    local = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes
                for p in model.parameters())
    whole = sum(p.numel() * p.dtype.itemsize for p in model.parameters())
    with torch.device("meta"):  # what dry_run prints for this layout
        estimate = state_bytes_per_rank(Transformer(CFG), pcfg, world_size)["parameters"]

    # Loading a checkpoint reads this rank's shards into place, nothing whole.
    state = model.state_dict()
    saved = {k: (v.to_local() if isinstance(v, DTensor) else v).clone() for k, v in state.items()}
    dcp.save(state, checkpoint_id=checkpoint)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    gc.collect()
    reset_peak_resident()
    before_load = resident_bytes()
    dcp.load(state, checkpoint_id=checkpoint)
    load_peak = peak_resident_bytes() - before_load
    restored = all(torch.equal(v.to_local() if isinstance(v, DTensor) else v, saved[k])
                   for k, v in model.state_dict().items())
    return {"peak": peak - before, "after": after - before, "shard": local, "whole": whole,
            "estimate": estimate, "load_peak": load_peak, "restored": restored}


@pytest.mark.parametrize("world,ep", [(4, 4), (4, 2), (2, 1)], ids=["w4-ep4", "w4-ep2-edp2",
                                                                   "w2-ep1"])
def test_building_and_loading_allocate_only_the_local_shard(world, ep, tmp_path):
    results = run_distributed(build, world, ParallelConfig(ep=ep, data_parallel="fsdp"),
                              str(tmp_path / "checkpoint"))
    assert max(r["shard"] for r in results) == results[0]["estimate"]  # dry_run's bytes
    for rank, r in enumerate(results):
        assert r["whole"] > r["shard"] * world * 0.9  # the shards do add up to the model
        assert r["whole"] > r["shard"] + 2 * SLACK  # so building it whole would fail below
        assert r["peak"] < r["shard"] + SLACK, (
            f"rank {rank}: peak {r['peak'] / MiB:.1f} MiB while building, shard "
            f"{r['shard'] / MiB:.1f} MiB, whole model {r['whole'] / MiB:.1f} MiB")
        assert r["restored"], f"rank {rank}: loading did not restore the saved shards"
        assert r["load_peak"] < r["shard"] + SLACK, (
            f"rank {rank}: peak {r['load_peak'] / MiB:.1f} MiB while loading, shard "
            f"{r['shard'] / MiB:.1f} MiB, whole model {r['whole'] / MiB:.1f} MiB")
