"""Checkpoints: exact resume, resharding across ep sizes, crash safety, restart after a dead
rank under torchrun, strict keys, and export."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moetrain.checkpoint import complete_checkpoints, resolve_resume
from moetrain.train import Trainer
from tests.distributed.ckpt_workers import losses, run_config, train
from tests.distributed.launcher import run_distributed

REPO = Path(__file__).resolve().parents[2]


def straight(family: str, root: str, data_parallel: str = "fsdp"):
    """10 uninterrupted steps at world 2, ep=2, checkpoints at steps 5 and 10; run once per
    (family, data_parallel), however the arguments are spelled."""
    return _straight(family, root, data_parallel)


@functools.lru_cache(maxsize=None)
def _straight(family: str, root: str, data_parallel: str):
    run_dir = Path(root) / f"straight-{family}-{data_parallel}"
    result = run_distributed(train, 2, run_dir, family, 2, data_parallel=data_parallel)[0]
    return run_dir, result


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt"))


def test_a_missing_per_rank_file_is_found_before_loading(root, tmp_path):
    """extra_rank1.pt of a world-2 checkpoint deleted: never resumed with rank 0's extras."""
    import shutil
    from moetrain.integrity import CheckpointInvalid
    ref_dir, _ = straight("mixtral", root)
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    missing = run_dir / "checkpoints" / "step_00000010" / "extra_rank1.pt"
    missing.unlink()
    with pytest.raises(CheckpointInvalid, match=f"{missing} is missing"):
        resolve_resume(str(missing.parent), run_dir)
    assert resolve_resume("auto", run_dir) == run_dir / "checkpoints" / "step_00000005"


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_exact_resume_matches_uninterrupted_run(family, root):
    ref_dir, ref = straight(family, root)
    run_dir = Path(root) / f"stopped-{family}"
    first = run_distributed(train, 2, run_dir, family, 2, train={"exit_at_step": 5})[0]
    assert first["step"] == 5
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000005"]
    resumed = run_distributed(train, 2, run_dir, family, 2, resume="auto")[0]
    assert resumed["step"] == 10
    got, expected = losses(run_dir), losses(ref_dir)
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), f"step {step}"
    for key, value in ref["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, rtol=1e-6, atol=1e-6,
                                   msg=f"{key} after resuming")
    if family == "deepseek":
        assert any("expert_bias" in k and v.abs().sum() > 0 for k, v in ref["state"].items())


# (written by, world, ep, data parallel, dp_replicate) of the resumed run
RESHARD = [("fsdp", 2, 1, "ddp", 1), ("fsdp", 4, 4, "fsdp", 1), ("fsdp", 4, 2, "ddp", 1),
           ("fsdp", 4, 2, "fsdp", 2), ("ddp", 4, 2, "fsdp", 1), ("ddp", 2, 1, "fsdp", 1)]


@pytest.mark.parametrize("written_by,world,ep,data_parallel,dp_replicate", RESHARD,
                         ids=[f"{w}-to-w{n}-ep{ep}-{dp}" + (f"-hsdp{r}" if r > 1 else "")
                              for w, n, ep, dp, r in RESHARD])
def test_resharded_resume_continues_the_same_training(written_by, world, ep, data_parallel,
                                                      dp_replicate, root):
    """A checkpoint written at world 2, ep=2 under FSDP or DDP resumes under another data
    parallelism, world size and ep (HSDP too) and gives the uninterrupted run's next loss."""
    ref_dir, _ = straight("deepseek", root, written_by)
    checkpoint = ref_dir / "checkpoints" / "step_00000005"
    run_dir = Path(root) / f"reshard-{written_by}-w{world}-ep{ep}-{data_parallel}{dp_replicate}"
    result = run_distributed(train, world, run_dir, "deepseek", ep, resume=str(checkpoint),
                             data_parallel=data_parallel, dp_replicate=dp_replicate,
                             train={"exit_at_step": 6})[0]
    assert result["step"] == 6
    assert losses(run_dir)[6] == pytest.approx(losses(ref_dir)[6], rel=1e-5)


def test_ddp_and_fsdp_train_the_same_run(root):
    (fsdp_dir, fsdp), (ddp_dir, ddp) = straight("deepseek", root), straight("deepseek", root,
                                                                            "ddp")
    for step, loss in losses(fsdp_dir).items():
        assert losses(ddp_dir)[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
    for key, value in fsdp["state"].items():
        scale = value.abs().max().clamp(min=1e-30)
        assert ((ddp["state"][key] - value).abs().max() / scale).item() < 1e-5, key


def test_export_writes_logical_safetensors_from_an_ep2_run(root, tmp_path):
    from safetensors.torch import load_file
    ref_dir, ref = straight("mixtral", root)
    proc = subprocess.run([sys.executable, "-m", "moetrain.export", str(ref_dir),
                           "--format", "safetensors", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["layers.0.ffn.experts.w_gate"].shape == (8, 16, 32)  # all 8 experts
    for key, value in tensors.items():
        torch.testing.assert_close(value, ref["state"][key], rtol=0, atol=0, msg=key)
    assert "num_experts: 8" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_hf_export_of_an_ep2_run_matches_transformers(family, root, tmp_path):
    """Written by 2 ranks at ep=2 (FSDP), exported in one process, loaded by transformers:
    the same logits as the trained weights in moetrain, and the same greedy text."""
    transformers = pytest.importorskip("transformers")
    from moetrain.generate import generate
    from moetrain.hf import export_hf
    from moetrain.model import Transformer
    ref_dir, ref = straight(family, root)
    out = export_hf(ref_dir, tmp_path / "hf", max_shard_size=20_000)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not any(info.values()), info
    ours = Transformer(run_config(tmp_path, family, 1, 1).model).eval()
    ours.load_state_dict(ref["state"])  # the weights the 2 ranks trained, gathered
    torch.manual_seed(0)
    for length in (4, 9, 16):
        tokens = torch.randint(1, 256, (1, length))
        with torch.no_grad():
            a, b = ours(tokens)[0], hf(tokens).logits
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5, length
    prompt = list(b"the ")
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert generate(ours, prompt, 12, temperature=0, eos_id=0) == theirs[0, 4:].tolist()


@pytest.mark.parametrize("world, ep, data_parallel", [(2, 2, "fsdp"), (4, 2, "ddp")])
def test_init_from_hf_loads_every_layout_exactly(world, ep, data_parallel, root, tmp_path):
    """A transformers checkpoint read into sharded experts and FSDP shards, each rank reading
    only its slices: the gathered weights are exactly those of one process."""
    from moetrain.checkpoint import load_model
    from moetrain.hf import export_hf
    from tests.distributed.ckpt_workers import initial_state
    ref_dir, _ = straight("deepseek", root)
    hf_dir = export_hf(ref_dir, tmp_path / "hf")
    expected, _ = load_model(f"hf:{hf_dir}")
    states = run_distributed(initial_state, world, tmp_path / "run", "deepseek", ep,
                             f"hf:{hf_dir}", data_parallel=data_parallel)
    for state in states:
        assert state.keys() == expected.state_dict().keys()
        for key, value in expected.state_dict().items():
            assert torch.equal(state[key], value), key


def test_checkpoint_with_wrong_keys_fails_loudly(root, tmp_path):
    ref_dir, _ = straight("mixtral", root)
    cfg = run_config(tmp_path / "other", "mixtral", 1, 1,
                     resume=str(ref_dir / "checkpoints" / "step_00000005"))
    cfg.model.n_layers = 3  # a layer the checkpoint does not have
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.2"):
        Trainer(cfg)
    cfg = run_config(tmp_path / "other", "mixtral", 1, 1,
                     resume=str(ref_dir / "checkpoints" / "step_00000005"))
    cfg.model.n_layers = 1
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.1"):
        Trainer(cfg)


def test_init_from_takes_weights_only_for_fine_tuning_with_a_frozen_router(root, tmp_path):
    ref_dir, ref = straight("mixtral", root)
    cfg = run_config(tmp_path / "finetune", "mixtral", 1, 1, steps=3,
                     init_from=str(ref_dir / "checkpoints" / "step_00000010"))
    cfg.model.moe.freeze_router = True
    trainer = Trainer(cfg)
    assert trainer.step == 0
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, ref["state"][key], rtol=0, atol=0, msg=key)
    trainer.fit()
    after, before = trainer.model.state_dict(), ref["state"]
    router, attention = "layers.0.ffn.router.weight", "layers.0.attn.wq.weight"
    assert torch.equal(after[router], before[router])
    assert not torch.equal(after[attention], before[attention])
    with pytest.raises(ValueError, match="init_from='nowhere' is not a complete checkpoint"):
        Trainer(run_config(tmp_path / "x", "mixtral", 1, 1, init_from="nowhere"))


CRASH_DURING_SAVE = """
import sys, time
from pathlib import Path
from moetrain.checkpoint import Checkpointer
from tests.distributed.ckpt_workers import run_config
from moetrain.train import Trainer
run_dir = Path(sys.argv[1])
original = Checkpointer._extra_state
def extra_state(self, step):
    if step == 4:  # the DCP files of step 4 are written; the rest never will be
        (run_dir / "saving").write_text("now")
        time.sleep(600)
    return original(self, step)
Checkpointer._extra_state = extra_state
cfg = run_config(run_dir, "mixtral", 1, 1, steps=6)
cfg.checkpoint.every = 2
Trainer(cfg).fit()
"""


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    run_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", CRASH_DURING_SAVE, str(run_dir)],
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "saving").exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_00000004.tmp" / ".metadata").is_file()  # partial, with DCP metadata
    assert resolve_resume("auto", run_dir) == ckpts / "step_00000002"
    cfg = run_config(run_dir, "mixtral", 1, 1, steps=6, resume="auto")
    trainer = Trainer(cfg)
    assert trainer.step == 2
    trainer.fit()
    assert [p.name for p in complete_checkpoints(ckpts)][-1] == "step_00000006"


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def torchrun(run_dir: Path, *extra) -> subprocess.Popen:
    args = ["model=deepseek_tiny", "balance=aux_free", "parallel.ep=2", "train.steps=12",
            "train.log_every=1", "train.val_every=0", "train.micro_batch_size=4",
            "data.seq_len=32", "data.synthetic_docs=600", "logger=none",
            "checkpoint.every=3", f"run_dir={run_dir}", "resume=auto"]
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", "1", "--monitor-interval", "0.5", "-m", "moetrain.train", *args,
         *extra], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_restarts_after_a_killed_rank_and_finishes_like_an_uninterrupted_run(
        tmp_path):
    reference = torchrun(tmp_path / "reference")
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    job = torchrun(tmp_path / "killed")
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step_00000006").exists():
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    workers = children(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert "resumed from" in out
    got, expected = losses(tmp_path / "killed"), losses(tmp_path / "reference")
    assert got[12] == pytest.approx(expected[12], rel=1e-6)
    metrics = (tmp_path / "killed" / "metrics.jsonl").read_text()
    assert '"event": "resume"' in metrics  # it really restarted from a checkpoint


OLD = REPO / "tests" / "data" / "checkpoint_d4bc6f2"  # DDP, world 2, ep=2, before FSDP


@pytest.mark.parametrize("world,ep", [(2, 1), (4, 4)])
def test_a_checkpoint_written_before_fsdp_resumes_under_fsdp(world, ep, tmp_path):
    """The checkpoint was written by commit d4bc6f2 (DDP, experts as plain slices) running
    that commit's ckpt_workers.train(rank, 2, run_dir, "deepseek", 2, steps=6); the losses of
    that run are in losses.json."""
    expected = json.loads((OLD / "losses.json").read_text())
    result = run_distributed(train, world, tmp_path / "run", "deepseek", ep,
                             resume=str(OLD / "step_00000005"), train={"exit_at_step": 6})[0]
    assert result["step"] == 6
    assert losses(tmp_path / "run")[6] == pytest.approx(expected["6"], rel=1e-5)
