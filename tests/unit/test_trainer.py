"""The training loop in one process: collapse detection, non-finite policies, optimizer."""

import json
import math
import re

import pytest
import torch

from moetrain.data.tokenizer import build_tokenizer
from moetrain.config import (BalanceConfig, DataConfig, LoggerConfig, LoopConfig, ModelConfig,
                             MonitorConfig, MoEConfig, OptimConfig, RunConfig, WandbConfig)
from moetrain.monitor import CollapseDetector
from moetrain.optim import build_optimizer, param_groups
from moetrain.train import Trainer, TrainingStopped


def tiny_run(tmp_path, moe=None, balance=None, steps=6, patience=4, micro_batch_size=4,
             **train):
    return RunConfig(
        run_dir=str(tmp_path / "run"),
        model=ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_hidden=64,
                          max_seq_len=32, moe=moe, balance=balance or BalanceConfig()),
        data=DataConfig(synthetic_docs=400, synthetic_val_docs=40, seq_len=32),
        optim=OptimConfig(lr=3e-3, warmup_steps=4),
        train=LoopConfig(steps=steps, micro_batch_size=micro_batch_size, log_every=2,
                         val_every=0, **train),
        monitor=MonitorConfig(patience=patience, on_collapse="stop"),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled"), progress_bar=False,
                            plots=False))


def skewed_run(tmp_path, balance):
    """Top-1 sigmoid routing whose selection bias starts out sending every token to expert 0:
    sigmoid scores here lie within about 0.5 +- 0.1, so a +0.2 bias beats all of them."""
    moe = MoEConfig(router="sigmoid", num_experts=8, top_k=1, expert_hidden=32)
    cfg = tiny_run(tmp_path, moe, balance, steps=48, patience=6, micro_batch_size=16)
    cfg.train.log_every = 4
    trainer = Trainer(cfg)
    torch.manual_seed(0)
    for layer in trainer.model.moe_layers():
        layer.router.weight.data.normal_(std=0.05)
        layer.router.expert_bias[0] = 0.2
    return trainer


def test_collapse_is_detected_without_balancing(tmp_path):
    trainer = skewed_run(tmp_path, BalanceConfig(aux_loss="none"))
    trainer.cfg.logger.plots = True  # a stopped run still writes its plots
    with pytest.raises(TrainingStopped, match=r"expert collapse in layer \d: experts \["):
        trainer.fit()
    plots = {p.name for p in (tmp_path / "run" / "plots").iterdir()}
    assert {"loss.png", "expert_load_layer0.png", "expert_load_layer1.png",
            "max_violation.png"} <= plots
    assert trainer.step == 24  # patience 6 checks x log_every 4: as early as possible
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(e.get("event") == "collapse" for e in events)
    assert [e for e in events if "loss" in e][-1]["step"] == 24  # the stopping step's record
    # a real collapse: at the stop, some layer sends (nearly) every token to one expert of 8
    # (max violation E - 1 = 7 when all load is on one expert)
    last = [e for e in events if "moe" in e][-1]
    assert max(last["moe"]["max_violation_global"]) >= 6


def test_same_run_with_aux_free_balancing_is_not_flagged(tmp_path):
    trainer = skewed_run(tmp_path, BalanceConfig(aux_free=True, bias_update_rate=0.02))
    summary = trainer.fit()
    assert summary["step"] == 48
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert not any("event" in r for r in records)
    # at most half as concentrated as the collapse the same run reaches without balancing
    # (7 = all load on one expert of 8; see the test above)
    assert all(max(r["moe"]["max_violation_global"]) < 3.5 for r in records[-3:])
    for layer in trainer.model.moe_layers():  # the bias took back most of expert 0's +0.2
        bias = layer.router.expert_bias
        assert bias[0] - bias[1:].mean() < 0.1


def test_wandb_offline_logs_bounded_keys_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=32)
    cfg = tiny_run(tmp_path, moe, steps=2)
    cfg.logger = LoggerConfig(wandb=WandbConfig(mode="auto"), progress_bar=True)
    Trainer(cfg).fit()
    run_dir = tmp_path / "run"
    run_id = (run_dir / "wandb_run_id").read_text()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1  # auto without a key: offline, under the run dir
    cfg.resume, cfg.train.steps = "auto", 4
    Trainer(cfg).fit()
    assert (run_dir / "wandb_run_id").read_text() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_wandb_payload_keys_grow_with_layers_not_experts():
    from moetrain.loggers import wandb_payload
    layers, experts = [1, 2, 3], 64
    moe = {"layers": layers, "load_fraction": [[1 / experts] * experts for _ in layers],
           **{key: [0.0] * len(layers) for key in ("max_violation_global", "load_entropy")}}
    payload = wandb_payload({"step": 1, "loss": 1.0, "moe": moe})
    assert len(payload) == 1 + 2 * len(layers) + 1 + len(layers)  # loss, scalars, map, hists


def test_a_one_expert_layer_is_never_a_collapse():
    detector = CollapseDetector(MonitorConfig(patience=1), [0, 1], 1)
    assert detector.update(torch.tensor([[64.0], [64.0]])) == []


def test_collapse_detector_patience_reporting_and_recovery():
    detector = CollapseDetector(MonitorConfig(patience=2, entropy_floor=0.2), [3], 4)
    skewed = torch.tensor([[100.0, 100.0, 100.0, 1.0]])
    assert detector.update(skewed) == []
    events = detector.update(skewed)
    assert events == [{"layer": 3, "kind": "starved", "experts": [3],
                       "message": "expert collapse in layer 3: experts [3] below 10% of their "
                                  "fair share for 2 consecutive checks"}]
    assert detector.update(skewed) == []  # reported once
    assert detector.update(torch.tensor([[1.0, 1.0, 1.0, 1.0]])) == []  # recovered
    detector.update(skewed)
    assert len(detector.update(skewed)) == 1  # a new episode is reported again
    one_expert = torch.tensor([[400.0, 0.0, 0.0, 0.0]])
    detector.update(one_expert)
    assert any("entropy 0.000 below 0.2" in e["message"] and e["kind"] == "entropy"
               for e in detector.update(one_expert))


def test_an_expert_starving_in_a_layer_already_reported_is_a_new_event():
    detector = CollapseDetector(MonitorConfig(patience=2, entropy_floor=0.0), [0], 4)
    first, both, second = ([[1.0, 100, 100, 100]], [[1.0, 1, 100, 100]],
                           [[100.0, 1, 100, 100]])
    reported = [[e["experts"] for e in detector.update(torch.tensor(loads))]
                for loads in (first, first, both, both, second, second, second)]
    # expert 0 at its 2nd check; expert 1 at its 2nd (while 0 is still starved), once
    assert reported == [[], [[0]], [], [[1]], [], [], []]
    state = detector.state_dict()
    again = CollapseDetector(MonitorConfig(patience=2, entropy_floor=0.0), [0], 4)
    again.load_state_dict(state)
    assert again.update(torch.tensor(second)) == []  # still reported, across a resume


class NaNAt:
    """Wraps Trainer.loss_on: the cross-entropy turns NaN during optimizer step `step`."""

    def __init__(self, trainer, step):
        self.trainer, self.step, self.inner = trainer, step, trainer.loss_on

    def __call__(self, tokens):
        ce, aux = self.inner(tokens)
        if self.trainer.step + 1 == self.step and self.trainer.model.training:
            ce = ce * float("nan")
        return ce, aux


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    trainer = Trainer(tiny_run(tmp_path, steps=5))
    trainer.loss_on = NaNAt(trainer, 3)
    with pytest.raises(TrainingStopped, match="non-finite loss at step 3"):
        trainer.fit()


def test_nonfinite_loss_skip_leaves_weights_untouched(tmp_path):
    skipping = Trainer(tiny_run(tmp_path / "a", steps=3, on_nonfinite="skip"))
    skipping.loss_on = NaNAt(skipping, 3)
    skipping.fit()
    reference = Trainer(tiny_run(tmp_path / "b", steps=2))  # warmup: same lr for steps 1-2
    reference.fit()
    for (name, a), b in zip(skipping.model.state_dict().items(),
                            reference.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_no_weight_decay_on_norms_and_embeddings_and_schedule_shape():
    from moetrain.model import Transformer
    model = Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, moe=None))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {
        "tok_embeddings.weight", "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight",
        "norm.weight"}
    opt, sched = build_optimizer(model, OptimConfig(lr=1.0, warmup_steps=10,
                                                    min_lr_ratio=0.1), total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 0.1) and math.isclose(lrs[9], 1.0)
    assert math.isclose(lrs[60], 0.1 + 0.9 * 0.5, rel_tol=1e-6) and lrs[-1] > 0.1


def test_activation_checkpointing_trains_the_same_model(tmp_path):
    """train.activation_checkpointing=full with aux-free balancing and gradient accumulation:
    the same losses, expert loads (the bias update reads them) and weights."""
    runs = []
    for mode in ("none", "full"):
        moe = MoEConfig(router="sigmoid", num_experts=8, top_k=2, expert_hidden=32)
        cfg = tiny_run(tmp_path / mode, moe, BalanceConfig(aux_free=True, bias_update_rate=0.01),
                       steps=4, grad_accum=2, activation_checkpointing=mode)
        trainer = Trainer(cfg)
        trainer.fit()
        records = [json.loads(line) for line in open(tmp_path / mode / "run" / "metrics.jsonl")]
        runs.append((records, trainer.model.state_dict()))
    (plain, plain_state), (ckpt, ckpt_state) = runs
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    assert [r["moe"]["tokens_per_expert"] for r in ckpt] == [r["moe"]["tokens_per_expert"]
                                                            for r in plain]
    for key, value in plain_state.items():
        torch.testing.assert_close(ckpt_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(v.abs().sum() > 0 for k, v in ckpt_state.items() if k.endswith("expert_bias"))


def test_a_resumed_progress_bar_rates_only_its_own_steps_and_warnings_keep_their_line(
        tmp_path, capsys):
    import re
    import time

    from moetrain.loggers import RunLogger
    logger = RunLogger(LoggerConfig(wandb=WandbConfig(mode="disabled"), plots=False), tmp_path,
                       {}, "run", 100, start_step=80, resumed_from=tmp_path / "ckpt")
    time.sleep(0.25)
    logger.advance(81)
    logger.write("WARNING: something")
    rate = float(re.search(r"([\d.]+)it/s", str(logger.bar)).group(1))
    logger.close()
    assert rate < 8  # one step in 0.25 s; counting the 80 resumed steps would show > 300
    segments = capsys.readouterr().err.split("\r")
    assert "WARNING: something\n" in segments  # on its own line, not after the bar's text


def test_time_phases_logs_milliseconds_per_step_of_each_phase(tmp_path):
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=16)
    cfg = tiny_run(tmp_path, moe, steps=4, grad_accum=2)
    cfg.train.time_phases = True
    Trainer(cfg).fit()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [r for r in records if "tokens_per_s" in r]
    assert len(logged) == 2
    for record in logged:
        phases = record["phase_ms"]
        assert {"data", "forward", "backward", "grad sync and clip", "balance",
                "optimizer"} <= set(phases)
        assert all(ms >= 0 for ms in phases.values()) and phases["backward"] > 0
    assert "log and validation" in logged[1]["phase_ms"]  # booked after the first log
    cfg = tiny_run(tmp_path / "off", moe, steps=2)
    Trainer(cfg).fit()
    assert not any("phase_ms" in json.loads(line)
                   for line in open(tmp_path / "off" / "run" / "metrics.jsonl"))


@pytest.mark.parametrize("tokenizer", ["byte", "stdlib-bpe-2048"])
def test_validation_reports_bits_per_byte_of_the_text_it_predicts(tmp_path, tokenizer):
    """Validation loss per byte of the predicted tokens' text, the same whatever the
    tokenizer cuts it into: the bytes are counted here by decoding the validated blocks."""
    cfg = tiny_run(tmp_path, steps=2, val_batches=3)
    cfg.train.val_every = 2
    cfg.data.tokenizer, cfg.model.vocab_size = tokenizer, 2048
    trainer = Trainer(cfg)
    trainer.fit()
    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()
              if "val_loss" in line][-1]
    tok = build_tokenizer(tokenizer)
    targets = trainer.val_blocks[:3 * cfg.train.micro_batch_size, 1:]
    text_bytes = sum(len(tok.decode([i for i in row if i != tok.eos_id]).encode("utf-8"))
                     for row in targets.tolist())
    expected = record["val_loss"] * targets.numel() / (math.log(2) * text_bytes)
    assert record["val_bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    if tokenizer != "byte":  # several bytes per token
        assert record["val_bits_per_byte"] < record["val_loss"] / math.log(2) / 1.5


def test_validation_text_of_empty_documents_has_a_loss_but_no_bits_per_byte(tmp_path):
    cfg = tiny_run(tmp_path, steps=2, val_batches=1)
    cfg.train.val_every = 2
    (tmp_path / "train.txt").write_text("some text to train on\n" * 200)
    (tmp_path / "val.txt").write_text("\n" * 400)  # every line an empty document
    cfg.data.source, cfg.data.path = "text", str(tmp_path / "train.txt")
    cfg.data.val_path = str(tmp_path / "val.txt")
    Trainer(cfg).fit()
    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()
              if "val_loss" in line][-1]
    assert math.isfinite(record["val_loss"]) and "val_bits_per_byte" not in record


def test_validation_reports_expert_loads_over_the_whole_pass(tmp_path):
    """The validation MaxVio (the paper's MaxVio_global) comes from every validation token:
    the loads equal a count of each token's top-k, routed one token at a time."""
    moe = MoEConfig(router="sigmoid", num_experts=8, top_k=2, expert_hidden=32, n_groups=2,
                    topk_groups=1)
    cfg = tiny_run(tmp_path, moe, BalanceConfig(aux_free=True), steps=4, val_batches=3)
    cfg.train.val_every = 2
    trainer = Trainer(cfg)
    trainer.fit()
    val_loss, loads = trainer.validate()
    model = trainer.model.eval()
    blocks = trainer.val_blocks[:3 * cfg.train.micro_batch_size]
    captured = {i: [] for i, layer in enumerate(model.layers) if layer.is_moe}
    def capture(i):
        return lambda module, args, out: captured[i].append(args[0].detach())
    hooks = [model.layers[i].ffn.router.register_forward_hook(capture(i)) for i in captured]
    with torch.no_grad():
        model(blocks[:, :-1])
    for hook in hooks:
        hook.remove()
    for row, (i, inputs) in enumerate(captured.items()):
        router = model.layers[i].ffn.router
        expected = torch.zeros(8)
        for x in torch.cat(inputs):  # one token at a time
            scores = torch.sigmoid(router.weight @ x) + router.expert_bias
            groups = scores.view(2, 4).topk(2, dim=-1).values.sum(-1)
            kept = groups.argmax()
            masked = torch.full_like(scores, float("-inf"))
            masked[kept * 4:(kept + 1) * 4] = scores[kept * 4:(kept + 1) * 4]
            expected[masked.topk(2).indices] += 1
        assert torch.equal(loads[row], expected), (row, loads[row], expected)
    assert loads.sum() == 2 * blocks[:, :-1].numel() * len(captured)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    val_records = [r for r in records if "val_moe" in r]
    assert [r["step"] for r in val_records] == [2, 4]
    last = val_records[-1]["val_moe"]
    assert last["tokens_per_expert"] == loads.tolist()
    expected_mv = (loads.max(-1).values / loads.mean(-1) - 1).tolist()
    assert last["max_violation"] == pytest.approx(expected_mv)
    assert val_loss == pytest.approx(val_records[-1]["val_loss"])


def test_a_run_from_a_checkpoint_must_keep_its_tokenizer(tmp_path):
    """The embeddings are per token id: starting from a checkpoint with another tokenizer is
    refused in one line naming the fix, before any data is read."""
    import shutil

    from moetrain.data.tokenizer import BUILTIN_DIR, same_tokenizer
    base = tiny_run(tmp_path, steps=1)
    Trainer(base).fit()
    cfg = tiny_run(tmp_path / "ft", steps=1)
    cfg.init_from = str(tmp_path / "run" / "checkpoints" / "step_00000001")
    cfg.data.tokenizer, cfg.model.vocab_size = "stdlib-bpe-2048", 2048
    # a missing file: reading the data first would fail on it instead
    cfg.data.source, cfg.data.path = "text", str(tmp_path / "never-read.txt")
    with pytest.raises(ValueError, match=r"was trained with data.tokenizer='byte' \(model."
                       r"vocab_size=256\), .*add data.tokenizer=byte model.vocab_size=256$"):
        Trainer(cfg)
    # resuming it under another tokenizer (a bytes run after the default became a BPE)
    resumed = tiny_run(tmp_path, steps=2)
    resumed.resume = "auto"
    resumed.data.tokenizer, resumed.model.vocab_size = "stdlib-bpe-2048", 2048
    step_1 = tmp_path / "run" / "checkpoints" / "step_00000001"
    refused = (rf"^resume='{re.escape(str(step_1))}' was trained with data.tokenizer='byte' "
               r".*add data.tokenizer=byte model.vocab_size=256$")
    with pytest.raises(ValueError, match=refused):
        Trainer(resumed)
    # named explicitly, it is refused before the data is read (the missing file again)
    resumed.resume = str(step_1)
    resumed.data.source, resumed.data.path = "text", str(tmp_path / "never-read.txt")
    with pytest.raises(ValueError, match=refused):
        Trainer(resumed)
    # the same tokenizer.json under another name (an export's copy) is the same tokenizer
    copy = tmp_path / "copy"
    shutil.copytree(BUILTIN_DIR / "stdlib-bpe-2048", copy)
    assert same_tokenizer("stdlib-bpe-2048", str(copy))
    assert not same_tokenizer("stdlib-bpe-2048", "byte") and same_tokenizer("byte", "byte")
    assert not same_tokenizer("stdlib-bpe-2048", str(tmp_path / "missing"))


def test_a_new_run_never_writes_over_another_run_in_its_run_dir(tmp_path):
    Trainer(tiny_run(tmp_path, steps=2)).fit()
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"^run_dir='.*run' already holds a run \(config.yaml, "
                       r"metrics.jsonl, checkpoints\); continue it with resume=auto"):
        Trainer(tiny_run(tmp_path, steps=2))
    # resuming a run past the steps asked for trains nothing: refused, naming both
    resumed = tiny_run(tmp_path, steps=1)
    resumed.resume = "auto"
    with pytest.raises(ValueError, match=r"^train.steps=1 is below the step of the checkpoint "
                       r"it resumes \(2: .*step_00000002\); set train.steps above 2"):
        Trainer(resumed)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    resumed.train.steps = 2  # a finished run: nothing to do, and no error
    trainer = Trainer(resumed)
    assert trainer.step == 2
    trainer.fit()


def test_resume_auto_without_a_checkpoint_starts_again_with_one_record_per_step(tmp_path):
    cfg = tiny_run(tmp_path, steps=4)
    cfg.train.log_every, cfg.checkpoint.at_end = 1, False
    Trainer(cfg).fit()  # no checkpoint: as if killed before the first one
    cfg.resume = "auto"
    Trainer(cfg).fit()
    metrics = tmp_path / "run" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in metrics.open() if '"loss"' in line]
    assert steps == [1, 2, 3, 4]
    old = [json.loads(line)["step"] for line in
           metrics.with_name("metrics.superseded.jsonl").open() if '"loss"' in line]
    assert old == [1, 2, 3, 4]  # kept, not lost


def test_validation_builds_no_autograd_graph(tmp_path):
    trainer = Trainer(tiny_run(tmp_path, steps=1, val_batches=2))
    grad_enabled = []
    loss_on = trainer.loss_on

    def recording(*args, **kwargs):
        grad_enabled.append(torch.is_grad_enabled())
        return loss_on(*args, **kwargs)

    trainer.loss_on = recording
    trainer.validate()
    assert grad_enabled == [False, False]


def test_config_yaml_names_the_runs_inputs_from_anywhere(tmp_path, monkeypatch):
    """Relative paths (tokenizer, text files, init_from) are recorded absolute: the tools and
    a resume read config.yaml from any directory."""
    import shutil
    from moetrain.checkpoint import load_run_config
    from moetrain.data.tokenizer import tokenizer_file
    from moetrain.generate import main as generate_main
    work = tmp_path / "work"
    (work / "tok").mkdir(parents=True)
    shutil.copyfile(tokenizer_file("stdlib-bpe-2048"), work / "tok" / "tokenizer.json")
    (work / "text").mkdir()
    for i in range(4):
        (work / "text" / f"{i}.txt").write_text("a sentence about herons and ponds\n" * 40)
    monkeypatch.chdir(work)
    cfg = tiny_run(tmp_path, steps=1)
    cfg.run_dir = "runs/base"
    cfg.model.vocab_size = 2048
    cfg.data = DataConfig(source="text", path="text/*.txt", tokenizer="tok", seq_len=32,
                          val_fraction=0.25)
    cfg.checkpoint.at_end = True
    Trainer(cfg).fit()
    cfg.run_dir, cfg.data.path = "runs/next", "text/0.txt"
    cfg.init_from = "runs/base/checkpoints/step_00000001"
    Trainer(cfg).fit()
    saved = load_run_config(work / "runs/next/checkpoints/step_00000001")
    assert saved.data.tokenizer == str(work / "tok")
    assert saved.data.path == str(work / "text/0.txt")
    assert saved.init_from == str(work / "runs/base/checkpoints/step_00000001")
    monkeypatch.chdir(tmp_path)
    generate_main([str(work / "runs/next"), "--prompt", "a heron", "--max-new-tokens", "3"])


def test_a_resume_follows_the_runs_own_learning_rate_schedule(tmp_path):
    """optim.lr (and warmup) changed on resume take effect at the checkpoint's step, as
    config.yaml then records; unchanged, the rates are the uninterrupted run's bit for bit."""
    def lrs(run_dir) -> dict[int, float]:
        return {r["step"]: r["lr"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))
                if "lr" in r}

    def run(name, lr, warmup, **changes):
        cfg = tiny_run(tmp_path / name, steps=8)
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.log_every = lr, warmup, 1
        for key, value in changes.items():
            setattr(cfg, key, value)
        Trainer(cfg).fit()
        return tmp_path / name / "run"

    for lr, warmup in ((3e-3, 4), (1e-4, 2)):
        straight = run(f"straight-{lr}", lr, warmup)
        first = tiny_run(tmp_path / f"resumed-{lr}", steps=8, exit_at_step=3)
        first.optim.lr, first.optim.warmup_steps, first.train.log_every = 3e-3, 4, 1
        Trainer(first).fit()
        resumed = run(f"resumed-{lr}", lr, warmup, resume="auto")
        after = {step: lr for step, lr in lrs(resumed).items() if step > 3}
        assert after == {step: lr for step, lr in lrs(straight).items() if step > 3}


def test_a_rollback_supersedes_the_newer_checkpoints_instead_of_losing_its_own(tmp_path):
    """Resuming an older checkpoint (past a loss spike) makes it the run's newest: the
    abandoned newer ones are moved aside, so keep_last keeps what the rollback writes and
    resume=auto continues the rollback, not the abandoned run."""
    cfg = tiny_run(tmp_path, steps=12, exit_at_step=8)
    cfg.checkpoint.every, cfg.checkpoint.keep_last = 2, 2
    Trainer(cfg).fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000006", "step_00000008"]
    rollback = tiny_run(tmp_path, steps=12, exit_at_step=7)
    rollback.checkpoint.every, rollback.checkpoint.keep_last = 2, 2
    rollback.resume = str(checkpoints / "step_00000006")
    Trainer(rollback).fit()
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step_00000006", "step_00000007", "superseded"]
    assert [p.name for p in (checkpoints / "superseded").iterdir()] == ["step_00000008"]
    again = tiny_run(tmp_path, steps=12)
    again.resume = "auto"
    assert Trainer(again).resumed_from.name == "step_00000007"


def test_an_exit_step_behind_the_resumed_step_is_named(tmp_path, capsys):
    cfg = tiny_run(tmp_path, steps=4, exit_at_step=2)
    Trainer(cfg).fit()
    again = tiny_run(tmp_path, steps=4, exit_at_step=2)
    again.resume = "auto"
    assert Trainer(again).fit()["step"] == 4
    assert ("WARNING: train.exit_at_step=2 is not after the resumed step 2: this job runs to "
            "train.steps=4") in capsys.readouterr().out


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path, monkeypatch):
    from datetime import datetime

    from moetrain.train import setup

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(setup, "datetime", Frozen)
    made = [setup.new_dated_dir(tmp_path / "runs", "quick") for _ in range(3)]
    assert [p.name for p in made] == ["quick-20260102-030405", "quick-20260102-030405-2",
                                      "quick-20260102-030405-3"]
    assert all(p.is_dir() for p in made)


def test_resuming_a_finished_run_says_so_and_leaves_its_files_alone(tmp_path, capsys):
    cfg = tiny_run(tmp_path, steps=2)
    Trainer(cfg).fit()
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    cfg.resume = "auto"
    assert Trainer(cfg).fit() == {"step": 2}
    assert capsys.readouterr().out.endswith(
        f"{run_dir}: the run is finished (step 2 of train.steps=2); raise train.steps to train "
        "on\n")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_collapse_reaches_the_wandb_summary_of_an_offline_run(tmp_path):
    from types import SimpleNamespace

    from moetrain.loggers import RunLogger
    logger = RunLogger(LoggerConfig(wandb=WandbConfig(mode="disabled"), progress_bar=False,
                                    plots=False), tmp_path, {}, "run", 10)
    alerts = []
    logger.wandb, logger.mode = SimpleNamespace(summary={}, alert=alerts.append), "offline"
    logger.alert({"step": 7, "layer": 2, "kind": "starved", "experts": [5],
                  "message": "expert collapse in layer 2"})
    assert logger.wandb.summary == {"collapse/layer2/starved": 7}
    assert alerts == []  # alerts need a server
    logger.wandb = None
    logger.close()
