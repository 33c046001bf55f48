"""The gate: every parallel layout trains the same model as one process.

One spawn per world size runs every case (family x capacity x dedup x ep layout) over a shared
process group; each result is compared with a single-process run of the same global batch.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.distributed.workers import family, reference_run, run_cases

FAMILIES = [("mixtral", None), ("mixtral", 1.0), ("deepseek", None), ("deepseek", 1.0),
            ("mixtral_global", None), ("expert_choice", 1.0)]
LAYOUTS = {1: [1], 2: [1, 2], 4: [4, 2]}  # world size -> ep sizes (edp = world / ep)


# Activation checkpointing re-runs the all-to-alls (and the global-statistics all-reduce)
# inside backward: (world size, family, capacity factor, ep) cases run with it on.
RECOMPUTE = {2: [("mixtral", 1.0, 2), ("deepseek", None, 2)],
             4: [("deepseek", 1.0, 2), ("mixtral_global", None, 4)]}


def cases_for(world_size):
    """(family, capacity factor, ep, dedup, activation checkpointing)"""
    return ([(name, cf, ep, dedup, False) for ep in LAYOUTS[world_size] for name, cf in FAMILIES
             for dedup in ((True, False) if ep > 1 else (True,))]
            + [(name, cf, ep, True, True) for name, cf, ep in RECOMPUTE.get(world_size, [])])


@functools.lru_cache(maxsize=None)
def reference(name, capacity_factor, micro_batches):
    return reference_run(family(name, capacity_factor), micro_batches)


@functools.lru_cache(maxsize=None)
def parallel_results(world_size):
    return run_distributed(run_cases, world_size, cases_for(world_size))


def case_ids(world_size):
    return [f"{n}-cf{cf}-ep{ep}-edp{world_size // ep}-{'dedup' if d else 'nodedup'}"
            + ("-recompute" if r else "") for n, cf, ep, d, r in cases_for(world_size)]


@pytest.mark.parametrize("world_size,case_index",
                         [(w, i) for w in LAYOUTS for i in range(len(cases_for(w)))],
                         ids=[f"w{w}-{c}" for w in LAYOUTS for c in case_ids(w)])
def test_parallel_layout_matches_single_process(world_size, case_index):
    name, capacity_factor, ep, dedup, recompute = cases_for(world_size)[case_index]
    # Global-batch statistics see all ranks' tokens at once: one big micro-batch in one process.
    micro_batches = 1 if name == "mixtral_global" else world_size
    ref = reference(name, capacity_factor, micro_batches)
    ranks = [r[case_index] for r in parallel_results(world_size)]

    for rank, result in enumerate(ranks):
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]),
                                   rtol=1e-5, atol=0, msg=f"rank {rank} per-step loss")
        assert torch.equal(result["counts"], ref["counts"]), "per-expert token counts differ"
        # Gradients are compared directly: Adam is blind to a uniformly mis-scaled gradient.
        torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                                   torch.tensor(ref["grad_norms"]), rtol=1e-5, atol=0,
                                   msg=f"rank {rank} global gradient norm")
        for key, value in ref["first_grads"].items():
            torch.testing.assert_close(result["first_grads"][key], value, rtol=1e-4, atol=1e-7,
                                       msg=f"rank {rank} gradient of {key} at step 1")
        assert result["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-5, atol=1e-5,
                                       msg=f"rank {rank} parameter {key} after 5 steps")
        for bias, ref_bias, bias0 in zip(result["expert_bias"],
                                         [v for k, v in ref["state"].items()
                                          if k.endswith("expert_bias")],
                                         ranks[0]["expert_bias"]):
            assert torch.equal(bias, bias0), "expert bias differs between ranks"
            torch.testing.assert_close(bias, ref_bias, rtol=0, atol=1e-7)
    # the cases must exercise what they claim
    assert all(r["moe_forwards"] == (2 if recompute else 1) for r in ranks)
    if capacity_factor is not None and name != "expert_choice":
        assert ref["max_dropped"] > 0, "capacity case dropped nothing"
    if name == "deepseek":
        assert any(b.abs().sum() > 0 for b in ranks[0]["expert_bias"])
