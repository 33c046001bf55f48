"""Stops on a signal in one process: SIGTERM, SIGINT and SIGUSR1 stop after the current step
with a checkpoint; an error after a stop signal (another rank left mid-collective) exits as
the stop. (Several ranks under the launcher: tests/distributed/test_launcher.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from moetrain.config import MoEConfig
from moetrain.train import Trainer
from moetrain.train.cli import exit_if_stopping
from moetrain.train.preemption import STOP, Preempted
from tests.unit.test_trainer import tiny_run


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_mid_run_stops_after_that_step_with_a_checkpoint(tmp_path, signum):
    cfg = tiny_run(tmp_path, MoEConfig(num_experts=4, top_k=2, expert_hidden=32), steps=8)
    trainer = Trainer(cfg)
    step = trainer.train_step

    def signalled_step():
        if trainer.step == 2:  # during step 3
            os.kill(os.getpid(), signum)
        return step()

    trainer.train_step = signalled_step
    with pytest.raises(Preempted) as stop:
        trainer.fit()
    assert stop.value.code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} after step 3 of 8" in str(stop.value)
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "manifest.json").is_file()
    assert signal.getsignal(signum) is not STOP._handle  # handlers restored


def test_an_error_after_a_stop_signal_exits_as_that_stop(capsys):
    STOP.signum = None  # as each run starts
    exit_if_stopping()  # no signal: the caller re-raises the error
    STOP.signum = signal.SIGTERM
    try:
        with pytest.raises(SystemExit) as leaving:
            exit_if_stopping()
    finally:
        STOP.signum = None
    assert leaving.value.code == 143
    assert capsys.readouterr().err == ("moetrain: stopped by SIGTERM while another rank was "
                                       "leaving; no checkpoint written\n")


def test_the_launcher_counts_as_stops_exactly_the_signals_the_ranks_stop_on():
    from moetrain.launcher import STOP_CODES, STOP_SIGNALS
    from moetrain.train.preemption import SIGNALS
    assert STOP_SIGNALS == SIGNALS and STOP_CODES == (143, 130, 138)
