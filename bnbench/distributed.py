"""Process groups, launching and rank helpers (torch.distributed: NCCL on CUDA, gloo on CPU).

One run of N processes, three ways to start it:

* ``torchrun --nproc_per_node=N -m bnbench train ...``: torchrun sets ``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; :func:`init_from_env` joins the group;
* ``bnbench train dist.nproc=N ...``: :func:`launch_local` runs the same command as N processes
  under torchrun's machinery (standalone rendezvous on a free port) and returns the exit status
  of the first process that failed (or 0);
* SLURM, one task per GPU (``+cluster=slurm`` through submitit, or ``srun bnbench train ...``):
  :func:`env_from_slurm` maps ``SLURM_*`` to the torch.distributed variables (submitit's
  ``TorchDistributedEnvironment``), then :func:`init_from_env` joins.

Rank 0 owns the run dir (Hydra output, logs, TensorBoard, checkpoints, ``summary.json``); the
other ranks of a torchrun/srun job get :func:`worker_overrides` and write nothing (under
submitit every task runs Hydra's job setup in the same stable dir; ranks > 0 drop their file log
handlers). A process joins one group, kept for the jobs of a sweep and destroyed at exit.

Failures: a failing rank prints its ``bnbench: error:`` line and exits; torchrun then stops the
others, and a rank whose collective fails first because its peer is gone says so in one line
(:func:`peer_failure`). Every group has a timeout (``BNBENCH_DIST_TIMEOUT_S``, default 30 min)
after which a collective waiting for a stuck peer fails instead of hanging.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from bnbench.cli import PRINT_FLAGS, given_flags
from bnbench.errors import BnbenchError

log = logging.getLogger("bnbench")

#: Seconds a collective may wait for its peers before failing (env override).
TIMEOUT_ENV = "BNBENCH_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def sync_process_group(group_size: int = 0) -> dist.ProcessGroup | None:
    """The SyncBN group of this process: all ranks (``group_size`` 0) or blocks of ``group_size``.

    Single process: ``None`` (SyncBN is then exactly BN). Must be called by every rank in the same
    order, since creating sub-groups is collective.
    """
    if not is_distributed():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise BnbenchError(
                "syncbn: this is a multi-process run (WORLD_SIZE="
                f"{os.environ['WORLD_SIZE']}) but no process group is initialized"
            )
        return None
    world = dist.get_world_size()
    size = world if group_size in (0, None) else int(group_size)
    if size < 1 or world % size:
        raise BnbenchError(f"norm.group_size={group_size}: must divide the world size {world}")
    if size == world:
        return dist.group.WORLD
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)), timeout=_timeout())
        if start <= dist.get_rank() < start + size:
            mine = group
    return mine


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for(want: str | None) -> torch.device:
    """The device of this process for ``trainer.device``/``--device`` (``auto``/``None``: this
    rank's GPU when CUDA is available, else the CPU; ``cuda`` without CUDA is an error)."""
    cuda = torch.cuda.is_available()
    if want == "cuda" and not cuda:
        raise BnbenchError(f"device {want}: no CUDA device is available on this machine")
    if want == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank())


# -- environments ---------------------------------------------------------------------------


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a worker of torchrun (or already has a torch.distributed env)."""
    environ = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ)


def under_slurm(environ: Mapping[str, str] | None = None) -> bool:
    """A SLURM task (``srun``/submitit) that torchrun did not start."""
    environ = os.environ if environ is None else environ
    return "SLURM_PROCID" in environ and not launched_by_torchrun(environ)


def launch_rank() -> int:
    """This process's rank before the group exists: torchrun's ``RANK``, else the SLURM task's."""
    if launched_by_torchrun():
        return int(os.environ.get("RANK", "0"))
    return int(env_from_slurm()["RANK"]) if under_slurm() else 0


@contextlib.contextmanager
def _slurm_reading():
    """submitit reads a task's environment once it knows its cluster, which its own sbatch scripts
    declare (``SUBMITIT_EXECUTOR=slurm``); a task that ``srun`` started is read the same way."""
    saved = os.environ.get("SUBMITIT_EXECUTOR")
    os.environ["SUBMITIT_EXECUTOR"] = "slurm"
    try:
        yield
    except KeyError as err:
        raise BnbenchError(f"SLURM: {err.args[0]} is not set in this task's environment") from err
    except Exception as err:  # submitit: ValueError (a count), SlurmParseException (a node list)
        raise BnbenchError(f"SLURM: cannot read this task's environment: {err}") from err
    finally:
        if saved is None:
            os.environ.pop("SUBMITIT_EXECUTOR", None)
        else:
            os.environ["SUBMITIT_EXECUTOR"] = saved


def env_from_slurm() -> dict[str, str]:
    """torch.distributed's environment for this SLURM task, as submitit's
    ``submitit.helpers.TorchDistributedEnvironment`` derives it from ``SLURM_*``.

    ``RANK`` ← ``SLURM_PROCID``; ``WORLD_SIZE`` ← ``SLURM_NTASKS`` (under ``srun``: the step's
    tasks); ``LOCAL_RANK`` ← ``SLURM_LOCALID``; ``LOCAL_WORLD_SIZE`` ← tasks / nodes
    (``SLURM_JOB_NUM_NODES``); ``MASTER_ADDR`` ← the first host of ``SLURM_JOB_NODELIST``;
    ``MASTER_PORT`` ← a port in [20000, 60000] drawn from the job id: the same for every task of
    the job and again after a requeue. ``MASTER_ADDR``/``MASTER_PORT`` already in the environment
    win (a user's choice; e.g. for an ``srun`` step on part of an allocation, whose first node
    is not the job's).
    """
    from submitit.helpers import TorchDistributedEnvironment

    with _slurm_reading():
        env = TorchDistributedEnvironment()
        return {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": os.environ.get("MASTER_ADDR") or env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def init_from_env(backend: str = "auto", use_cuda: bool = False) -> bool:
    """Join the process group described by torchrun's (or SLURM's) environment.

    ``False`` if single-process. Under SLURM without torchrun the ``SLURM_*`` variables are mapped
    first (:func:`env_from_slurm`). Ranks > 0 then detach their file log handlers, so that only
    rank 0 writes the run dir's log (under SLURM every task runs Hydra's job setup).
    """
    if is_distributed():
        return True
    if under_slurm():
        os.environ.update(env_from_slurm())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank() % max(torch.cuda.device_count(), 1))
    dist.init_process_group(backend=backend, timeout=_timeout())
    # One group per process, kept across the jobs of a sweep (a torchrun worker cannot join a
    # second default group through the agent's store), destroyed at exit.
    atexit.register(_destroy)
    if dist.get_rank() > 0:
        for logger in (logging.getLogger(), log):
            for handler in list(logger.handlers):
                if isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
                    handler.close()
    return True


def _destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def worker_overrides(multirun: bool) -> list[str]:
    """Extra Hydra overrides for ranks > 0 of a torchrun job: no Hydra output at all.

    Rank 0 alone creates the (timestamped) run dir; the others log nothing to files and get a
    throw-away sweep dir in multirun mode (Hydra writes ``multirun.yaml`` there).
    """
    extra = [
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
        "hydra.run.dir=.",
    ]
    if multirun:
        scratch = tempfile.mkdtemp(prefix="bnbench-rank-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        extra += [f"hydra.sweep.dir={scratch}", "hydra.sweep.subdir=."]
    return extra


# -- self-launch ----------------------------------------------------------------------------


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m bnbench <argv>`` as ``nproc`` processes on this machine (torchrun).

    Standalone rendezvous on a free port, no restarts. Returns 0, or the exit status of the first
    process that failed (``128 + signal`` for a signal); when that process did not already print
    its ``bnbench: error:`` line (status 2), one is printed here.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would use 1 and warn
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    args = parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            "--monitor-interval=0.1",
            "--module",
            "bnbench",
            *argv,
        ]
    )
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # failures are reported below, in one line
    try:
        run(args)
    except ChildFailedError as err:
        failed_rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
        if code != 2:
            how = (
                f"was killed by signal {-failure.exitcode}"
                if failure.exitcode < 0
                else f"exited with status {code}"
            )
            print(
                f"bnbench: error: process {failed_rank} of {nproc} {how}; the others were stopped",
                file=sys.stderr,
                flush=True,
            )
        return code or 1
    except SignalException as err:
        return 128 + int(err.sigval)
    finally:
        quiet.setLevel(level)
    return 0


def should_launch(nproc: int, args: Sequence[str]) -> bool:
    """Whether ``bnbench train`` with ``dist.nproc=nproc`` must start its processes itself.

    Not inside torchrun or a multi-task SLURM step (the processes exist already), not for
    ``--cfg``/``--help``/``--info``, and an error with a cluster launcher (its tasks are the
    processes: ``hydra.launcher.tasks_per_node``).
    """
    if nproc <= 1 or launched_by_torchrun() or given_flags(args) & PRINT_FLAGS:
        return False
    if under_slurm() and int(env_from_slurm()["WORLD_SIZE"]) > 1:
        return False
    cluster = [a for a in args if a.lstrip("+~").startswith(("cluster=", "hydra/launcher="))]
    if cluster:
        raise BnbenchError(
            f"dist.nproc={nproc} starts processes on this machine; with {cluster[0]} the "
            "processes are the launcher's tasks (hydra.launcher.tasks_per_node, nodes)"
        )
    return True


# -- collectives ----------------------------------------------------------------------------


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (identity when single-process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_(tensor):
    """Sum ``tensor`` over all processes in place (no-op when single-process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


#: What gloo says when the other end of a collective is gone or silent (NCCL raises DistError).
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker",
    "Timed out waiting",
)


def peer_failure(err: BaseException) -> str | None:
    """A one-line description if ``err`` is a collective that failed because another process of
    the group died or stopped answering (its own error is the one to read); else ``None``."""
    if not is_distributed() or dist.get_world_size() == 1:
        return None
    text = str(err).strip()
    if not isinstance(err, getattr(dist, "DistError", ())) and not any(
        s in text for s in _PEER_LOST
    ):
        return None
    first = text.splitlines()[0] if text else type(err).__name__
    first = re.sub(r"^\[[^\]]*\] ", "", first).split(". ")[0]  # no source location, advice
    return (
        f"rank {rank()}/{world_size()}: stopped because a collective operation failed; another "
        f"process failed or stopped answering (see its error): {first}"
    )


# -- the training model ---------------------------------------------------------------------


def wrap_model(model, dist_cfg, device):
    """The module the training loop calls: ``DDP(ShuffleBN(model))`` when multi-process.

    * ShuffleBN (``dist.shuffle_bn``, :mod:`bnbench.shuffle`) sits inside DDP: each rank then
      computes parameter gradients of the samples it normalized, which the shuffle's differentiable
      gathers route back to their owners' losses, and DDP averages them as usual.
    * Buffers are not broadcast: every rank keeps its own EMA statistics (as the papers' per-GPU
      BN), synced before each evaluation.

    Single process: ``model`` itself (ShuffleBN has nothing to shuffle across).
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = model
    if dist_cfg is not None and dist_cfg.shuffle_bn:
        from bnbench.shuffle import ShuffleBN

        net = ShuffleBN(model, group=dist.new_group(timeout=_timeout()))
    ids = [device.index] if device.type == "cuda" else None
    # Buffers: equal at init either way (same seed, or the same checkpoint), never synced after.
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        return DDP(net, device_ids=ids, forward_sync_buffers=False)
    return DDP(net, device_ids=ids, broadcast_buffers=False)
