"""Checkpoint integrity in one process: damaged, truncated or missing files are found before
anything loads; resume=auto falls back to the newest valid checkpoint; an explicit path fails
naming the file; metrics.jsonl holds one record per step after a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moetrain.checkpoint import find_checkpoint, load_model, load_model_weights, resolve_resume
from moetrain.config import DataConfig, MoEConfig
from moetrain.integrity import MANIFEST, CheckpointInvalid
from moetrain.train import Trainer
from tests.unit.test_trainer import tiny_run

MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=32)


def run_with_checkpoints(tmp_path, steps=4, every=2, **train):
    cfg = tiny_run(tmp_path, MOE, steps=steps, **train)
    cfg.train.log_every = 1
    cfg.checkpoint.every, cfg.checkpoint.keep_last = every, 0
    Trainer(cfg).fit()
    return Path(cfg.run_dir), cfg


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def shard(checkpoint: Path) -> Path:
    return next(checkpoint.glob("*.distcp"))


def flip_bit_in_tensor_data(path: Path) -> str:
    """Flip one bit in the middle of the largest model tensor stored in `path`, where DCP
    itself notices nothing; returns the tensor's name."""
    metadata = dcp.FileSystemReader(str(path.parent)).read_metadata()
    index, item = max(((i, s) for i, s in metadata.storage_data.items()
                       if s.relative_path == path.name and i.fqn.startswith("model.")),
                      key=lambda pair: pair[1].length)
    data = bytearray(path.read_bytes())
    data[item.offset + item.length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return index.fqn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_with_checkpoints(tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def run_copy(trained, tmp_path):
    run_dir, cfg = trained
    shutil.copytree(run_dir, tmp_path / "run")
    cfg.run_dir = str(tmp_path / "run")
    return tmp_path / "run", cfg


def test_every_checkpoint_has_a_manifest_of_every_file_it_wrote(trained):
    run_dir, _ = trained
    for checkpoint in sorted((run_dir / "checkpoints").iterdir()):
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
        on_disk = {p.name for p in checkpoint.iterdir()} - {MANIFEST}
        assert set(files) == on_disk
        assert {".metadata", "config.yaml", "extra_rank0.pt"} <= on_disk
        assert all(len(entry["sha256"]) == 64 for entry in files.values())


def test_one_flipped_bit_is_loaded_silently_without_verification(run_copy):
    """What the manifest guards against: DCP alone loads the flipped bit without a word."""
    run_dir, _ = run_copy
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    model, _ = load_model(checkpoint)
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    name = flip_bit_in_tensor_data(shard(checkpoint))
    load_model_weights(model, checkpoint)  # no verification on this path
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, clean[k])]
    assert changed == [name[len("model."):]]


def test_flipped_bit_is_skipped_by_resume_auto_and_the_run_continues_exactly(run_copy,
                                                                             capsys):
    run_dir, cfg = run_copy
    reference = losses(run_dir)
    bad = shard(run_dir / "checkpoints" / "step_00000004")
    flip_bit_in_tensor_data(bad)
    assert resolve_resume("auto", run_dir) == run_dir / "checkpoints" / "step_00000002"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "SHA-256" in warnings[0]
    cfg.resume = "auto"
    trainer = Trainer(cfg)
    assert trainer.step == 2
    trainer.fit()
    got = losses(run_dir)
    for step in (3, 4):
        assert got[step] == pytest.approx(reference[step], rel=1e-6), step


def test_explicit_resume_of_a_damaged_checkpoint_fails_naming_the_file(run_copy):
    run_dir, cfg = run_copy
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    flip_bit_in_tensor_data(shard(checkpoint))
    cfg.resume = str(checkpoint)
    with pytest.raises(CheckpointInvalid) as error:
        Trainer(cfg)
    message = str(error.value)
    assert "\n" not in message and str(shard(checkpoint)) in message
    with pytest.raises(CheckpointInvalid, match="corrupted"):  # the one-process tools too
        load_model(checkpoint)


@pytest.mark.parametrize("field", ["resume", "init_from"])
def test_a_damaged_config_yaml_is_a_verification_error_before_anything_reads_it(run_copy,
                                                                                  field):
    """The start-up checks read a checkpoint's config.yaml (its tokenizer) before the whole
    checkpoint is verified: that file is checked first, and without a manifest to check it
    against, a config that does not parse is one line naming it."""
    run_dir, cfg = run_copy
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    config = checkpoint / "config.yaml"
    text = config.read_text()
    config.write_text(text.replace(":", ";", 1))  # one flipped bit (0x3a -> 0x3b)
    run = tiny_run(run_dir.parent / "new", MOE, steps=6)
    setattr(run, field, str(checkpoint))
    with pytest.raises(CheckpointInvalid) as error:
        Trainer(run)
    assert "\n" not in str(error.value)
    assert f"{config} does not match its SHA-256" in str(error.value)
    (checkpoint / MANIFEST).unlink()  # a checkpoint from before manifests
    with pytest.raises(CheckpointInvalid) as error:
        Trainer(run)
    assert "\n" not in str(error.value) and f"{config} is not a moetrain run config" in str(
        error.value)
    assert not (run_dir.parent / "new" / "run").exists()  # refused before any work


@pytest.mark.parametrize("damage", ["truncate", "delete_extra", "delete_metadata",
                                    "garble_manifest"])
def test_truncated_missing_or_unreadable_files_are_found(run_copy, damage, capsys):
    run_dir, _ = run_copy
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    if damage == "truncate":
        bad = shard(checkpoint)
        bad.write_bytes(bad.read_bytes()[:-100])
    elif damage == "delete_extra":
        bad = checkpoint / "extra_rank0.pt"
        bad.unlink()
    elif damage == "delete_metadata":
        bad = checkpoint / ".metadata"
        bad.unlink()
    else:
        bad = checkpoint / MANIFEST
        bad.write_text("{not json")
    with pytest.raises(CheckpointInvalid, match=str(bad).replace(".", r"\.")):
        resolve_resume(str(checkpoint), run_dir)
    assert find_checkpoint(run_dir) == run_dir / "checkpoints" / "step_00000002"


def test_every_checkpoint_bad_is_an_error_not_a_fresh_start(run_copy):
    run_dir, _ = run_copy
    for checkpoint in (run_dir / "checkpoints").iterdir():
        (checkpoint / "extra_rank0.pt").unlink()
    with pytest.raises(CheckpointInvalid, match="none of the 2 checkpoints"):
        resolve_resume("auto", run_dir)


def test_an_unverified_damaged_file_never_advises_weights_only_false(run_copy):
    """A checkpoint from before manifests (none to check against) with a damaged extras file:
    the error names the file and never repeats torch's advice to unpickle it unsafely."""
    run_dir, cfg = run_copy
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    (checkpoint / MANIFEST).unlink()
    extra = checkpoint / "extra_rank0.pt"
    extra.write_bytes(b"\x80\x02garbage" + extra.read_bytes()[10:])
    cfg.resume = str(checkpoint)
    with pytest.raises(CheckpointInvalid) as error:
        Trainer(cfg)
    assert str(extra) in str(error.value)
    assert "weights_only" not in str(error.value)


def test_resume_never_leaves_two_records_of_one_step(tmp_path):
    """Logged to step 5, checkpointed at 3: the resumed run logs 4 and 5 again."""
    run_dir, cfg = run_with_checkpoints(tmp_path, steps=5, every=3)
    cfg.checkpoint.at_end = False
    first = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000005")
    cfg.resume, cfg.train.steps = "auto", 6
    Trainer(cfg).fit()
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    superseded = [json.loads(line) for line in open(run_dir / "metrics.superseded.jsonl")]
    assert [r["step"] for r in superseded] == [4, 5]  # kept, not lost
    assert [r["loss"] for r in superseded] == [first[4], first[5]]
    assert any(r.get("event") == "resume" and r["step"] == 3 for r in records)


@pytest.mark.parametrize("field, valid", [
    ("resume", "use 'auto' or a checkpoints/step_XXXXXXXX path"),
    ("init_from", "use a checkpoints/step_XXXXXXXX path, or hf:DIR for a transformers one")])
def test_a_path_that_is_no_checkpoint_names_what_its_field_takes(tmp_path, field, valid):
    from moetrain.checkpoint import checked_path
    with pytest.raises(ValueError) as err:
        checked_path(tmp_path, field)
    assert str(err.value).startswith(f"{field}='{tmp_path}' is not a complete checkpoint")
    assert str(err.value).endswith(valid)


def test_a_checkpoint_that_lost_its_manifest_is_never_picked_unverified(run_copy, capsys):
    """Deleting manifest.json (or a prune killed midway) must not switch the checksums off:
    resume=auto passes over it to the newest verified checkpoint; named, it loads with a
    warning, as one written before manifests."""
    run_dir, _ = run_copy
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    (checkpoint / MANIFEST).unlink()
    bad = shard(checkpoint)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad.write_bytes(bytes(data))
    assert resolve_resume("auto", run_dir) == run_dir / "checkpoints" / "step_00000002"
    assert "has no manifest.json (deleted, or written before" in capsys.readouterr().err
    assert find_checkpoint(run_dir) == run_dir / "checkpoints" / "step_00000002"
    assert resolve_resume(str(checkpoint), run_dir) == checkpoint
    assert "loading it unverified" in capsys.readouterr().err


def test_a_streamed_run_resumed_from_its_checkpoint_equals_the_uninterrupted_one(tmp_path):
    """The stream's position (datasets' state, the tokens not yet handed out) goes through a
    real checkpoint: saved with the rank's extras, loaded with weights_only."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} " + "word " * (i % 11) + "\n" for i in range(300)))

    def run(name, steps, **extra):
        cfg = tiny_run(tmp_path / name, MOE, steps=steps)
        cfg.data = DataConfig(source="text", path=str(corpus), streaming=True, seq_len=32)
        cfg.train.log_every = 1
        cfg.checkpoint.every = 3
        for key, value in extra.items():
            setattr(cfg, key, value)
        Trainer(cfg).fit()
        return Path(cfg.run_dir)

    straight = losses(run("straight", 8))
    run("stopped", 3)
    resumed = losses(run("stopped", 8, resume="auto"))
    assert set(resumed) == set(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
