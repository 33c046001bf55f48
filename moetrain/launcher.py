"""torchrun for moetrain: `python -m moetrain.launcher [torchrun options] -m moetrain.train
[overrides]` (what launch/*.sh run).

It is torchrun (same options, same elastic agent) with three differences a user sees:
  - the config is composed and checked in this one process before any rank starts, so a bad
    override or an unknown key prints one line and exits 2, once;
  - when ranks fail, it prints the one line the failing rank recorded (the lowest such rank)
    and exits with that rank's code (2 for a config/data error, 3 for a stopped run), instead
    of torchrun's ChildFailedError report;
  - SIGTERM/SIGINT/SIGUSR1 reach the ranks, which stop at a step boundary and save
    (moetrain.train's preemption; torchrun alone would die of a SIGUSR1 and leave its ranks
    training, unsupervised); the launcher waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default
    here 300 s, torchrun's own is 30) for that checkpoint, then exits 128 + the signal number,
    quietly.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

ENTRY = "moetrain.train"
# moetrain.train.preemption.SIGNALS (143, 130, 138: a rank stopped cleanly on a signal),
# spelled out: importing the trainer package costs the launcher ~2 s
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOP_CODES = tuple(128 + s for s in STOP_SIGNALS)
AGENT_SIGNALS = (15, 9)  # how torchrun's agent stops the other ranks once one has failed


def world_size(args) -> int | None:
    """The job's world size when it is fixed (not an elastic min:max range)."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes
    low, high = parse_min_max_nnodes(args.nnodes)
    return low * determine_local_world_size(args.nproc_per_node) if low == high else None


def report(failures: dict) -> int:
    """One line and the exit code for the failed ranks (global rank -> ProcessFailure)."""
    ranked = sorted(failures.items())
    for _, failure in ranked:
        info = failure.error_file_data.get("message") or {}
        extra = info.get("extraInfo", {}) if isinstance(info, dict) else {}
        if extra.get("moetrain"):
            print(info["message"], file=sys.stderr, flush=True)
            # The code the rank chose: the agent may have killed it on its way out, once
            # another rank had failed.
            return int(extra.get("exitcode", 1))
    codes = [failure.exitcode for _, failure in ranked]
    if all(code in STOP_CODES for code in codes):
        return codes[0]  # rank 0 has printed where it stopped and saved
    # The rank that failed by itself: an exit code of its own first, then a signal other
    # than the SIGTERM/SIGKILL with which the agent stops the other ranks after a failure.
    crashed = [(r, f) for r, f in ranked if f.exitcode > 0 and f.exitcode not in STOP_CODES]
    killed = [(r, f) for r, f in ranked if f.exitcode < 0]
    rank, failure = (crashed or [(r, f) for r, f in killed if -f.exitcode not in AGENT_SIGNALS]
                     or killed)[0]
    code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    if code in STOP_CODES:  # killed mid-step, no checkpoint: not a stop to requeue
        code = 1
    reason = (f"killed by signal {-failure.exitcode}" if failure.exitcode < 0
              else f"exit code {failure.exitcode}")
    print(f"moetrain: rank {rank} failed ({reason}); its output is above", file=sys.stderr,
          flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's default list (TERM, INT, HUP, QUIT) plus what the ranks stop on
    forwarded = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"] + [s.name for s in STOP_SIGNALS]
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", ",".join(dict.fromkeys(forwarded)))
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.module and args.training_script == ENTRY:
        from moetrain.train.cli import preflight
        try:
            preflight(args.training_script_args, world_size(args))
        except ValueError as error:
            print(f"moetrain: error: {error}", file=sys.stderr, flush=True)
            return 2
    os.environ["MOETRAIN_LAUNCHER"] = "1"  # ranks leave their error line to us
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    # The agent's own warnings repeat what the ranks and this function say. Its loggers set
    # their own levels at import, so each is quietened by name.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run",
                            "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as error:
        return report(error.failures)
    except SignalException as error:
        return 128 + int(error.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
