"""The gate: every parallel layout trains the same model as one process.

One spawn per world size runs every case (family x capacity x dedup x ep layout x FSDP/DDP x
activation checkpointing x gradient accumulation x precision) over shared process groups; each
result is compared with a single-process run of the same global batch, from the same seed:
initial weights bit for bit (the parallel model is built on the meta device and only its
shards are initialised), then losses, token counts, gradients and weights after 5 steps.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.distributed.workers import Case, family, lora_config, reference_run, run_cases

FAMILIES = [("mixtral", None), ("mixtral", 1.0), ("deepseek", None), ("deepseek", 1.0),
            ("mixtral_global", None), ("expert_choice", 1.0)]


def _all_families(**layout) -> list[Case]:
    return [Case(name, cf, **layout) for name, cf in FAMILIES]


# world size -> cases. FSDP (the default) on every layout and family; DDP kept on every layout;
# activation checkpointing, accumulation, HSDP and fp64 on the layouts that exercise them.
CASES = {
    1: _all_families(),
    2: (_all_families(ep=1) + _all_families(ep=1, data_parallel="ddp")
        + _all_families(ep=2) + _all_families(ep=2, dedup=False)
        + _all_families(ep=2, data_parallel="ddp")
        + [Case("mixtral", 1.0, ep=2, recompute=True),
           Case("deepseek", None, ep=2, data_parallel="ddp", recompute=True),
           Case("mixtral", None, ep=2, accum=2),
           Case("mixtral_global", None, ep=2, accum=2),
           Case("mixtral", None, ep=1, accum=2, defer_sync=True),
           Case("deepseek", None, ep=1, accum=2, recompute=True),
           Case("deepseek", None, ep=2, data_parallel="ddp", accum=2),
           Case("mixtral", None, ep=2, dtype="fp64"),
           Case("mixtral_tied", None, ep=2), Case("mixtral_tied", None, data_parallel="ddp"),
           Case("deepseek", None, ep=2, lora=True),
           Case("mixtral", 1.0, ep=2, data_parallel="ddp", lora=True),
           Case("deepseek", None, ep=2, data_parallel="ddp", lora="experts")]),
    4: (_all_families(ep=4) + _all_families(ep=2)
        + [Case(name, cf, ep=ep, data_parallel="ddp") for name, cf in FAMILIES[:3]
           for ep in (2, 4)]
        + [Case("deepseek", 1.0, ep=2, recompute=True),
           Case("mixtral_global", None, ep=4, recompute=True),
           Case("deepseek", None, ep=2, accum=2, defer_sync=True),
           Case("mixtral", 1.0, ep=4, accum=2, recompute=True),
           Case("mixtral", None, ep=2, dp_replicate=2),
           Case("deepseek", None, ep=1, dp_replicate=2, accum=2, defer_sync=True),
           Case("deepseek", None, ep=2, dtype="fp64"),
           Case("mixtral_global", None, ep=4, dtype="fp64"),
           Case("mixtral_tied", None, ep=2, dp_replicate=2),
           Case("deepseek", None, ep=2, lora=True), Case("mixtral", None, ep=4, lora=True),
           Case("mixtral", None, ep=2, data_parallel="ddp", lora=True)]),
}
# max |delta| / max |reference| per tensor: fp32 leaves summation-order noise, fp64 only bugs
TOLERANCE = {"fp32": 1e-5, "fp64": 1e-10}


@functools.lru_cache(maxsize=None)
def reference(name, capacity_factor, micro_batches, dtype, lora=False, world=1):
    return reference_run(family(name, capacity_factor), micro_batches,
                         dtype=Case(name, dtype=dtype).torch_dtype,
                         lora=lora_config(name, lora) if lora else None, world=world)


@functools.lru_cache(maxsize=None)
def parallel_results(world_size):
    return run_distributed(run_cases, world_size, CASES[world_size])


def case_id(world_size: int, case: Case) -> str:
    edp = world_size // case.ep
    parts = [f"w{world_size}", case.family, f"cf{case.capacity_factor}", f"ep{case.ep}",
             f"edp{edp}", case.data_parallel]
    parts += [label for label, on in (("nodedup", not case.dedup), ("recompute", case.recompute),
                                      (f"accum{case.accum}", case.accum > 1),
                                      ("defer-sync", case.defer_sync),
                                      (f"hsdp{case.dp_replicate}", case.dp_replicate > 1),
                                      ("fp64", case.dtype == "fp64"),
                                      ("lora" if case.lora is True else f"lora-{case.lora}",
                                       case.lora)) if on]
    return "-".join(parts)


def assert_relative_close(actual, expected, tolerance, what):
    """max |actual - expected| / max |expected| over the tensor."""
    scale = expected.abs().max().clamp(min=torch.finfo(expected.dtype).tiny)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


PARAMS = [(w, i) for w in CASES for i in range(len(CASES[w]))]


@pytest.mark.parametrize("world_size,case_index", PARAMS,
                         ids=[case_id(w, CASES[w][i]) for w, i in PARAMS])
def test_parallel_layout_matches_single_process(world_size, case_index):
    case = CASES[world_size][case_index]
    # Global-batch statistics see all ranks' tokens at once: one big micro-batch per
    # accumulation step in one process.
    if case.family == "mixtral_global":
        ref = reference(case.family, case.capacity_factor, case.accum, case.dtype, case.lora,
                        world=world_size if case.accum > 1 else 1)
    else:
        ref = reference(case.family, case.capacity_factor, world_size * case.accum,
                        case.dtype, case.lora)
    ranks = [r[case_index] for r in parallel_results(world_size)]
    tolerance = TOLERANCE[case.dtype]

    for rank, result in enumerate(ranks):
        assert result["init_state"].keys() == ref["init_state"].keys()
        for key, value in ref["init_state"].items():  # sharded init = one-process init
            assert torch.equal(result["init_state"][key], value), f"rank {rank} init of {key}"
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]),
                                   rtol=tolerance, atol=0, msg=f"rank {rank} per-step loss")
        assert torch.equal(result["counts"], ref["counts"]), "per-expert token counts differ"
        # Gradients are compared directly: Adam is blind to a uniformly mis-scaled gradient.
        torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                                   torch.tensor(ref["grad_norms"]), rtol=tolerance, atol=0,
                                   msg=f"rank {rank} global gradient norm")
        assert result["first_grads"].keys() == ref["first_grads"].keys()
        for key, value in ref["first_grads"].items():
            assert_relative_close(result["first_grads"][key], value, tolerance,
                                  f"rank {rank} gradient of {key} at step 1")
        assert result["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            assert_relative_close(result["state"][key], value, tolerance,
                                  f"rank {rank} {key} after 5 steps")
        for bias, ref_bias, bias0 in zip(result["expert_bias"],
                                         [v for k, v in ref["state"].items()
                                          if k.endswith("expert_bias")],
                                         ranks[0]["expert_bias"]):
            assert torch.equal(bias, bias0), "expert bias differs between ranks"
            torch.testing.assert_close(bias, ref_bias, rtol=0, atol=1e-7)
    # the cases must exercise what they claim
    assert all(r["moe_forwards"] == (2 if case.recompute else 1) for r in ranks)
    if case.capacity_factor is not None and case.family != "expert_choice":
        assert ref["max_dropped"] > 0, "capacity case dropped nothing"
    if case.family == "deepseek":
        assert any(b.abs().sum() > 0 for b in ranks[0]["expert_bias"])
    assert all(r["state"][k].dtype == case.torch_dtype for r in ranks for k in r["state"]
               if k.endswith("weight"))
    if case.lora:  # only the adapters trained: the frozen base still holds its init
        assert ref["first_grads"] and all(k.endswith(("lora_A", "lora_B"))
                                          for k in ref["first_grads"])
        for key, value in ranks[0]["state"].items():
            if not key.endswith(("lora_A", "lora_B", "expert_bias")):
                assert torch.equal(value, ranks[0]["init_state"][key]), key
            elif key.endswith("lora_B"):
                assert value.abs().sum() > 0, f"{key} never moved from zero"
