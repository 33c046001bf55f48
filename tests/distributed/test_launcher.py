"""Runs started the way users start them (launch/torchrun.sh, python -m moetrain.train):
config and data errors are one line and exit 2; SIGTERM/SIGINT stop every rank at a step
boundary with a checkpoint, one line and the scheduler's exit code; resume=auto from that
checkpoint gives the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "NPROC": "2", "OMP_NUM_THREADS": "1",
       "PYTHON": sys.executable}
SMALL = ["model=deepseek_tiny", "balance=aux_free", "parallel.ep=2", "train.log_every=1",
         "train.val_every=0", "train.micro_batch_size=4", "data.seq_len=32",
         "data.synthetic_docs=600", "logger=none", "checkpoint.every=0"]


def launch(*overrides, entry=("launch/torchrun.sh",)) -> subprocess.Popen:
    return subprocess.Popen([*entry, *overrides], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(job: subprocess.Popen, timeout=300) -> tuple[int, str, str]:
    out, err = job.communicate(timeout=timeout)
    return job.returncode, out, err


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "unknown config key 'train.stepz'"),
    ("+train.stepz=5", "unknown config key 'train.stepz'"),
    ("+unknown.key=1", "unknown config key 'unknown'"),
    ("parallel.ep=3", "parallel.ep=3 does not divide the world size 2"),
    ("model=nonexistent", "invalid overrides"),
])
def test_a_config_error_under_the_launcher_is_one_line_and_exit_2(override, message):
    key = override.lstrip("+").split("=")[0]
    code, out, err = finish(launch(override, *(a for a in SMALL if not a.startswith(key))))
    assert code == 2, err
    assert lines(err) == [lines(err)[0]] and lines(err)[0].startswith("moetrain: error: ")
    assert message in err and "Traceback" not in err
    assert "parameters:" not in out  # no rank started


def test_an_unknown_key_added_with_plus_stops_a_one_process_run_before_training():
    job = launch("+train.stepz=5", "logger=none",
                 entry=(sys.executable, "-m", "moetrain.train"))
    code, out, err = finish(job)
    assert code == 2 and lines(err) == ["moetrain: error: unknown config key 'train.stepz'; "
                                        "valid keys here: " + lines(err)[0].split(": ")[-1]]
    assert out == ""


def test_unreadable_data_and_run_dirs_are_one_line_naming_file_and_setting(tmp_path):
    (tmp_path / "random.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "sub").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text\n" * 100)
    (tmp_path / "file").write_text("")
    cases = [
        ([f"data.path={tmp_path / 'random.txt'}"], "data.path=",
         f"{tmp_path / 'random.txt'} is not UTF-8 text"),
        ([f"data.path={tmp_path / 'corpus'}/*"], "data.path=",
         f"{tmp_path / 'corpus' / 'sub'} is a directory"),
        ([f"data.path={tmp_path / 'corpus' / 'a.txt'}", f"run_dir={tmp_path / 'file' / 'run'}"],
         "run_dir=", f"{tmp_path / 'file'} is a file"),
    ]
    jobs = [launch("data=local_text", *extra, *SMALL[3:]) for extra, _, _ in cases]
    for job, (_, setting, message) in zip(jobs, cases):
        code, _, err = finish(job)
        assert code == 2, err
        assert len(lines(err)) == 1 and setting in err and message in err, err


def start_and_signal(run_dir: Path, signum: int, at_least_step: int):
    job = launch(f"run_dir={run_dir}", "train.steps=40", *SMALL)
    deadline = time.monotonic() + 240
    metrics = run_dir / "metrics.jsonl"
    while True:
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at_least_step:
            break
        time.sleep(0.05)
    job.send_signal(signum)
    return finish(job)


def test_sigterm_stops_cleanly_and_resume_continues_the_uninterrupted_run(tmp_path):
    reference = launch(f"run_dir={tmp_path / 'reference'}", "train.steps=40", *SMALL)
    code, _, err = start_and_signal(tmp_path / "run", signal.SIGTERM, at_least_step=3)
    assert code == 143, err  # 128 + SIGTERM: what a requeueing scheduler looks for
    assert "Traceback" not in err
    stops = [line for line in lines(err) if line.startswith("moetrain:")]
    assert len(stops) == 1 and "stopped by SIGTERM after step" in stops[0], err
    step = int(stops[0].split("after step ")[1].split()[0])
    assert 3 <= step < 40
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
    assert str(checkpoint) in stops[0] and (checkpoint / "manifest.json").is_file()
    assert max(step_losses(tmp_path / "run")) == step  # stopped at a step boundary

    code, out, err = finish(launch(f"run_dir={tmp_path / 'run'}", "train.steps=40",
                                   "resume=auto", *SMALL))
    assert code == 0, err
    ref_code, _, ref_err = finish(reference)
    assert ref_code == 0, ref_err
    got, expected = step_losses(tmp_path / "run"), step_losses(tmp_path / "reference")
    assert sorted(got) == list(range(1, 41))
    for s in range(1, 41):
        assert got[s] == pytest.approx(expected[s], rel=1e-6), f"step {s}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_sigusr1_stop_every_rank_with_a_checkpoint(tmp_path, signum):
    """SIGUSR1 (sbatch --signal=USR1@N) too: torchrun alone dies of it, leaving its ranks
    training with nobody watching."""
    code, _, err = start_and_signal(tmp_path / "run", signum, at_least_step=2)
    assert code == 128 + signum, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stops = [line for line in lines(err) if line.startswith("moetrain:")]
    assert len(stops) == 1 and f"stopped by {signal.Signals(signum).name}" in stops[0], err
    assert list((tmp_path / "run" / "checkpoints").glob("step_*/manifest.json"))


@pytest.mark.parametrize("codes, expected_code, named", [
    ({0: -15, 1: 1}, 1, "rank 1 failed (exit code 1)"),  # rank 1 raised; the agent killed 0
    ({0: -15, 1: -11}, 139, "rank 1 failed (killed by signal 11)"),  # a segfault
    ({0: -15, 1: -15}, 1, "rank 0 failed (killed by signal 15)"),  # never 143: no checkpoint
    ({0: 143, 1: -9}, 137, "rank 1 failed (killed by signal 9)"),
    ({0: 143, 1: 143}, 143, None),  # every rank stopped cleanly on SIGTERM
    ({0: 138, 1: 138}, 138, None),  # on SIGUSR1
    ({0: -10, 1: -15}, 1, "rank 0 failed (killed by signal 10)"),
])
def test_the_launcher_names_the_rank_that_failed_and_never_a_stop_code(codes, expected_code,
                                                                       named, capsys):
    """A crash must not exit 143, which slurm.sbatch requeues as a stop with a checkpoint."""
    from types import SimpleNamespace

    from moetrain.launcher import report
    failures = {rank: SimpleNamespace(exitcode=code, error_file_data={})
                for rank, code in codes.items()}
    assert report(failures) == expected_code
    err = capsys.readouterr().err
    assert (named is None and err == "") or err == f"moetrain: {named}; its output is above\n"


def test_slurm_script_needs_a_run_it_can_requeue(tmp_path):
    """Slurm stand-ins on PATH: without run_dir= and resume=auto a requeued job would start
    over (or be refused as a new run in an old run_dir), so the script refuses to start; with
    them it hands the arguments to srun (the stand-in prints them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", "echo node0"), ("srun", 'echo srun "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node0",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO)}
    refused = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "model=deepseek_tiny"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("slurm.sbatch: pass run_dir=DIR and resume=auto")
    started = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "run_dir=runs/job",
                              "resume=auto"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=60)
    assert started.returncode == 0 and started.stdout.startswith("srun ")
    assert started.stdout.strip().endswith("run_dir=runs/job resume=auto")


def test_launch_script_reads_relative_paths_from_where_it_is_started(tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(f"line {i} of a small corpus\n"
                                                 for i in range(200)))
    code, out, err = finish(subprocess.Popen(
        [str(REPO / "launch/torchrun.sh"), "data=local_text", "data.path=corpus.txt",
         "data.tokenizer=byte", "model.vocab_size=256", "data.seq_len=32", "train.steps=1",
         "train.micro_batch_size=2", "logger=none", "run_dir=run"],
        cwd=tmp_path, env={**ENV, "NPROC": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
    assert code == 0, err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    bad = subprocess.run([str(REPO / "launch/torchrun.sh")], cwd=tmp_path,
                         env={**ENV, "NPROC": "0"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr == "torchrun.sh: NPROC=0 must be an integer >= 1\n"
    unset = subprocess.run([str(REPO / "launch/multinode.sh")], cwd=tmp_path,
                           env={k: v for k, v in ENV.items() if k != "NNODES"},
                           capture_output=True, text=True, timeout=60)
    assert unset.returncode == 2 and unset.stderr.startswith("multinode.sh: set NNODES (e.g.")
