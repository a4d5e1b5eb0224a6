"""Process groups, launching and rank helpers (torch.distributed: NCCL on CUDA, gloo on CPU).

One run of N processes, three ways to start it:

* ``torchrun --nproc_per_node=N -m bnbench train ...``: torchrun sets ``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; :func:`init_from_env` joins the group;
* ``bnbench train dist.nproc=N ...``: :func:`launch_local` runs the same command as N processes
  under torchrun's machinery (standalone rendezvous on a free port) and returns the exit status
  of the first process that failed (or 0);
* SLURM, one task per GPU (``+cluster=slurm`` through submitit, or ``srun bnbench train ...``):
  :func:`env_from_slurm` maps ``SLURM_*`` to the torch.distributed variables, then
  :func:`init_from_env` joins.

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

from bnbench.errors import BnbenchError

log = logging.getLogger("bnbench")

#: Seconds a collective may wait for its peers before failing (env override).
TIMEOUT_ENV = "BNBENCH_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800
#: Test-only fault injection: the rank named here raises at its third training step.
FAIL_RANK_ENV = "BNBENCH_TEST_FAIL_RANK"
FAIL_AT_STEP = 3


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


def launch_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank before the group exists: torchrun's ``RANK``, else ``SLURM_PROCID``."""
    environ = os.environ if environ is None else environ
    if launched_by_torchrun(environ):
        return int(environ.get("RANK", "0"))
    return int(environ.get("SLURM_PROCID", "0")) if under_slurm(environ) else 0


def _slurm_world(environ: Mapping[str, str]) -> int:
    keys = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    return int(next((environ[k] for k in keys if environ.get(k)), "1"))


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, e.g. ``"gpu[001-003,7],login"`` → ``gpu001 … gpu7 login``."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]*)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` such as ``"4(x2),3"`` → ``[4, 4, 3]``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise BnbenchError(f"SLURM_TASKS_PER_NODE={spec}: cannot parse")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's environment for this SLURM task (a pure function of ``environ``).

    ``RANK`` ← ``SLURM_PROCID``; ``WORLD_SIZE`` ← the step's task count (``SLURM_STEP_NUM_TASKS``,
    else ``SLURM_NTASKS``); ``LOCAL_RANK`` ← ``SLURM_LOCALID``; ``LOCAL_WORLD_SIZE`` ← this node's
    entry of ``SLURM_STEP_TASKS_PER_NODE``/``SLURM_TASKS_PER_NODE``; ``GROUP_RANK`` ←
    ``SLURM_NODEID``; ``MASTER_ADDR`` ← the first host of the step's (else the job's) node list,
    else ``SLURM_LAUNCH_NODE_IPADDR``; ``MASTER_PORT`` ← ``15000 + SLURM_JOB_ID mod 20000``, the
    same for every task of the job and again after a requeue. ``MASTER_ADDR``/``MASTER_PORT``
    already in ``environ`` win (a user's choice).
    """

    def get(*keys: str) -> str | None:
        return next((environ[k] for k in keys if environ.get(k)), None)

    procid = get("SLURM_PROCID")
    ntasks = get("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if procid is None or ntasks is None:
        raise BnbenchError("SLURM: SLURM_PROCID and SLURM_NTASKS must be set in a SLURM task")
    node = int(get("SLURM_NODEID") or 0)
    out = {
        "RANK": procid,
        "WORLD_SIZE": ntasks,
        "LOCAL_RANK": get("SLURM_LOCALID") or "0",
        "GROUP_RANK": str(node),
    }
    per_node = get("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node:
        counts = _tasks_per_node(per_node)
        out["LOCAL_WORLD_SIZE"] = str(counts[min(node, len(counts) - 1)])
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = get("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        hosts = expand_hostlist(nodelist) if nodelist else []
        addr = hosts[0] if hosts else get("SLURM_LAUNCH_NODE_IPADDR")
    if not addr:
        raise BnbenchError("SLURM: no node list (SLURM_JOB_NODELIST) to find the master node")
    out["MASTER_ADDR"] = addr
    port = environ.get("MASTER_PORT")
    if not port:
        job = get("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID") or "0"
        task = get("SLURM_ARRAY_TASK_ID") or "0"
        port = str(15000 + (int(job) + int(task)) % 20000)
    out["MASTER_PORT"] = port
    return out


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
        os.environ.update(env_from_slurm(os.environ))
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
    info = {"--cfg", "-c", "--info", "--help", "-h", "--hydra-help", "--shell-completion", "-sc"}
    if nproc <= 1 or launched_by_torchrun() or info & set(args):
        return False
    if under_slurm() and _slurm_world(os.environ) > 1:
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


def _inject_fault(model) -> None:
    """Test-only: ``BNBENCH_TEST_FAIL_RANK=r`` makes rank ``r`` fail at training step 3."""
    target = os.environ.get(FAIL_RANK_ENV)
    if target is None or int(target) != rank():
        return
    steps = [0]

    def hook(module, inputs):
        if module.training:
            steps[0] += 1
            if steps[0] == FAIL_AT_STEP:
                raise BnbenchError(
                    f"{FAIL_RANK_ENV}={target}: injected failure at training step {FAIL_AT_STEP}"
                )

    model.register_forward_pre_hook(hook)


def wrap_model(model, dist_cfg, device):
    """The module the training loop calls: ``DDP(ShuffleBN(model))`` when multi-process.

    * ShuffleBN (``dist.shuffle_bn``, :mod:`bnbench.shuffle`) sits inside DDP: each rank then
      computes parameter gradients of the samples it normalized, which the shuffle's differentiable
      gathers route back to their owners' losses, and DDP averages them as usual.
    * Buffers are not broadcast: every rank keeps its own EMA statistics (as the papers' per-GPU
      BN), synced before each evaluation.

    Single process: ``model`` itself (ShuffleBN has nothing to shuffle across).
    """
    _inject_fault(model)
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
