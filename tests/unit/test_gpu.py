"""The CUDA paths (grouped_mm in bf16, the permuted dispatch, autocast, FSDP mixed
precision). Skipped cleanly without a GPU."""

import copy

import pytest
import torch

from moetrain.config import BalanceConfig, MoEConfig
from moetrain.model.experts import GroupedExperts
from moetrain.model.moe import MoE

from tests.unit.reference import naive_moe
from tests.unit.test_moe_layer import MOE_CASES, make_moe

pytestmark = pytest.mark.gpu


def test_cuda_grouped_mm_matches_the_cpu_path_in_bf16_tolerance():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 64, 128)
    experts.init_weights(0.05)
    counts = torch.tensor([40, 0, 16, 8, 24, 0, 32, 8])
    x = torch.randn(int(counts.sum()), 64)
    gates = torch.rand(len(x))
    expected = experts(x, counts, gates)
    got = experts.cuda()(x.cuda().bfloat16(), counts.cuda(), gates.cuda())
    torch.testing.assert_close(got.float().cpu(), expected, rtol=2e-2, atol=2e-2)


def test_cuda_grouped_mm_with_lora_adapters_matches_the_cpu_path_with_gradients():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 64, 128)
    experts.init_weights(0.05)
    experts.add_lora(8, 2.0, 0.0)
    with torch.no_grad():
        for adapter in experts.adapters():
            adapter.normal_(0, 0.05)
    for w in (experts.w_gate, experts.w_up, experts.w_down):
        w.requires_grad_(False)
    counts = torch.tensor([40, 0, 16, 8, 24, 0, 32, 8])
    x = torch.randn(int(counts.sum()), 64)
    gates = torch.rand(len(x))
    expected = experts(x, counts, gates)
    expected.square().sum().backward()
    want = [a.grad.clone() for a in experts.adapters()]
    experts.zero_grad()
    got = experts.cuda()(x.cuda().bfloat16(), counts.cuda(), gates.cuda())
    got.float().square().sum().backward()
    torch.testing.assert_close(got.float().cpu(), expected, rtol=2e-2, atol=2e-2)
    for grad, ref in zip((a.grad.float().cpu() for a in experts.adapters()), want):
        assert (grad - ref).abs().max() <= 0.05 * ref.abs().max()


def test_moe_layer_trains_under_bf16_autocast():
    torch.manual_seed(0)
    moe = MoE(64, MoEConfig(num_experts=8, top_k=2, expert_hidden=64, router="sigmoid",
                            n_shared_experts=1), BalanceConfig(aux_loss="sequence")).cuda()
    moe.init_weights(0.05)
    x = torch.randn(2, 16, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, aux = moe(x)
    (out.float().sum() + aux).backward()
    assert torch.isfinite(x.grad).all() and moe.experts.w_gate.grad.abs().sum() > 0


def test_fsdp_bf16_mixed_precision_keeps_fp32_master_weights(monkeypatch):
    """FSDP2's bf16 policy on one NCCL rank, built on the meta device: logits within bf16
    tolerance of the fp32 model with the same seed; parameters and gradients stay fp32."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from moetrain.config import ModelConfig, ParallelConfig
    from moetrain.loss import next_token_loss
    from moetrain.model import Transformer
    from moetrain.parallel import build_mesh, init_distributed
    from moetrain.parallel.parallelize import apply_fsdp
    from tests.distributed.launcher import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    init_distributed(60)
    try:
        cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, max_seq_len=32,
                          moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=64))
        reference = Transformer(cfg)
        reference.init_weights(0)
        reference.cuda()
        with torch.device("meta"):
            model = Transformer(cfg)
        apply_fsdp(model, build_mesh(ParallelConfig(), 8), mixed_precision=True)
        model.to_empty(device="cuda")
        model.init_weights(0)
        tokens = torch.randint(0, 64, (2, 33), device="cuda")
        logits, aux = model(tokens[:, :-1])
        assert logits.dtype == torch.bfloat16
        with torch.no_grad():
            expected, _ = reference(tokens[:, :-1])
        torch.testing.assert_close(logits.float(), expected, rtol=5e-2, atol=5e-2)
        (next_token_loss(logits, tokens) + aux).backward()
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            assert torch.isfinite(grad).all(), name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_layer_on_cuda_matches_the_per_token_loop(case):
    """fp32 on CUDA: dropless token choice takes the permuted dispatch, the other cases the
    gather / index_add one; both against the per-token loop on CPU, gradients included."""
    moe = make_moe(**MOE_CASES[case])
    x = torch.randn(24, 12, requires_grad=True)
    grad_out = torch.randn(24, 12)
    ref = naive_moe(moe, x)
    ref_grads = torch.autograd.grad(ref, [x, *moe.parameters()], grad_out, allow_unused=True)

    gpu = copy.deepcopy(moe).cuda()
    x_gpu = x.detach().cuda().requires_grad_(True)
    out, _ = gpu(x_gpu.view(2, 12, 12))
    grads = torch.autograd.grad(out.view(24, 12), [x_gpu, *gpu.parameters()], grad_out.cuda())
    torch.testing.assert_close(out.view(24, 12).cpu(), ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, ref_grads):
        g_ref = torch.zeros_like(g.cpu()) if g_ref is None else g_ref
        torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid"])
def test_bf16_moe_layer_matches_fp32_and_is_deterministic(router):
    """bf16 on CUDA (grouped_mm, permuted dispatch): within bf16 tolerance of the fp32 CPU
    layer with the same (bf16-rounded) weights, and bit-identical over two runs (no atomic
    adds on the way)."""
    torch.manual_seed(0)
    kw = (dict(num_experts=8, top_k=2) if router == "softmax_topk" else
          dict(num_experts=16, top_k=4, n_groups=4, topk_groups=2, route_scale=2.5,
               n_shared_experts=1))
    moe = MoE(64, MoEConfig(router=router, expert_hidden=32, **kw), BalanceConfig())
    moe.init_weights(0.05)
    moe = moe.bfloat16().float()  # the weights bf16 can hold, so both route alike
    x = torch.randn(4, 64, 64).bfloat16().float()
    grad_out = torch.randn_like(x)
    x_ref = x.clone().requires_grad_(True)
    ref, _ = moe(x_ref)
    ref.backward(grad_out)

    gpu = copy.deepcopy(moe).cuda().bfloat16()
    runs = []
    for _ in range(2):
        x_gpu = x.cuda().bfloat16().requires_grad_(True)
        out, _ = gpu(x_gpu)
        out.backward(grad_out.cuda().bfloat16())
        runs.append((out.detach(), x_gpu.grad, gpu.experts.w_down.grad.clone()))
        gpu.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    out, x_grad, _ = runs[0]
    scale = ref.abs().max()
    assert (out.float().cpu() - ref).abs().max() <= 0.02 * scale
    assert (x_grad.float().cpu() - x_ref.grad).abs().max() <= 0.02 * x_ref.grad.abs().max()


def test_a_run_resumes_on_cuda_with_the_fused_optimizer(tmp_path):
    """Resuming creates AdamW's slots before loading into them; the fused CUDA kernel refuses
    a step count on the CPU (every resume of a one-GPU run failed so). The resumed steps
    repeat the uninterrupted run's losses."""
    import shutil

    from moetrain.train import Trainer
    from tests.unit.test_checkpoint_integrity import losses, run_with_checkpoints

    run_dir, cfg = run_with_checkpoints(tmp_path, steps=4, every=2)
    reference = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    cfg.resume = "auto"
    trainer = Trainer(cfg)
    assert trainer.step == 2 and next(trainer.model.parameters()).is_cuda
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    trainer.fit()
    got = losses(run_dir)
    for step in (3, 4):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), step
