"""Test-only entry point: ``python tests/kill_entry.py WHERE N train [overrides]`` runs
``bnbench train`` and SIGKILLs itself at the N-th call of WHERE — ``validation`` (an evaluation
pass) or ``checkpoint`` (in the middle of writing ``last.pt``, leaving a partial temporary
file) — as a kill -9 from outside would, at a deterministic point."""

from __future__ import annotations

import os
import signal
import sys

import torch

import bnbench.evaluate as evaluate_module
from bnbench.cli import main


def _kill_at(count: int, original, counts=lambda *args: True):
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += counts(*args)
        if calls[0] == count and counts(*args):
            if len(args) > 1 and hasattr(args[1], "write"):  # torch.save(obj, file): half of it
                args[1].write(b"\0" * 4096)
                args[1].flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    where, count, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if where == "validation":
        # the trainer's validation goes through evaluate_stats, which calls this
        evaluate_module.evaluate = _kill_at(count, evaluate_module.evaluate)
    elif where == "checkpoint":
        torch.save = _kill_at(count, torch.save,  # the run's checkpoint, not the data cache
                              lambda obj, *rest: isinstance(obj, dict) and "optimizer" in obj)
    else:
        raise SystemExit(f"unknown kill point {where}")
    sys.exit(main(argv))
