"""Test-only entry point: ``bnbench`` with a failure injected into one rank's training.

``torchrun --standalone --nproc-per-node=N tests/fail_entry.py RANK STEP train [overrides]`` runs
``bnbench train [overrides]`` on every rank; rank ``RANK`` raises a :class:`BnbenchError` at its
``STEP``-th training step (a forward pre-hook on the model that
:func:`bnbench.distributed.wrap_model` receives, so the other ranks are left waiting in a
collective), the other ranks run unchanged.
"""

from __future__ import annotations

import sys

from bnbench import cli
from bnbench import distributed as D
from bnbench.errors import BnbenchError


def inject(fail_rank: int, fail_step: int) -> None:
    """Make ``bnbench.distributed.wrap_model`` (called by the trainer) arm the failure."""
    wrap_model = D.wrap_model

    def failing_wrap_model(model, dist_cfg, device):
        if D.rank() == fail_rank:
            steps = 0

            def hook(module, inputs):
                nonlocal steps
                if module.training:
                    steps += 1
                    if steps == fail_step:
                        raise BnbenchError(f"injected failure at training step {fail_step}")

            model.register_forward_pre_hook(hook)
        return wrap_model(model, dist_cfg, device)

    D.wrap_model = failing_wrap_model


if __name__ == "__main__":
    rank, step, *argv = sys.argv[1:]
    inject(int(rank), int(step))
    sys.exit(cli.main(argv))
