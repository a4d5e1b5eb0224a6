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
(:func:`peer_failure`). Every group has a timeout (``BNBENCH_DIST_TIMEOUT_S`` seconds, default
240) after which a collective waiting for a stuck peer (stopped, hung, on a dead node) fails
instead of hanging: the rank that waited prints one line naming the rank it waited for. Raise it
where one rank may legitimately keep the others waiting longer (e.g. a slow file system under
rank 0's checkpoint writes).

The ``dist.nproc=N`` launcher (:func:`launch_local`) owns its processes: they die with it (even
``kill -9``: ``PR_SET_PDEATHSIG``, :func:`bnbench.cli.die_with_launcher`), a stopped process is
ended as soon as another has failed (not after torchrun's 30 s grace), and Ctrl-C stops them all
and prints one line for the job (where the last checkpoint is, how to resume).
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from bnbench import cli
from bnbench.cli import PRINT_FLAGS, given_flags
from bnbench.errors import BnbenchError

log = logging.getLogger("bnbench")

#: Seconds a collective may wait for its peers before failing (env override). The default ends
#: a run whose rank stalled within 5 minutes (the wait, then a few seconds of teardown).
TIMEOUT_ENV = "BNBENCH_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 240
#: A file where rank 0 of a ``dist.nproc`` job writes its run dir and resume command (JSON).
RUN_INFO_ENV = "BNBENCH_RUN_INFO"


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


def timeout_s() -> float:
    """The collective timeout in seconds: ``BNBENCH_DIST_TIMEOUT_S``, else 240."""
    given = os.environ.get(TIMEOUT_ENV, "").strip()
    if not given:
        return float(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(given)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise BnbenchError(f"{TIMEOUT_ENV}={given}: must be a positive number of seconds")
    return seconds


def _timeout() -> timedelta:
    return timedelta(seconds=timeout_s())


def init_from_env(backend: str = "auto", use_cuda: bool = False,
                  timeout: float | None = None) -> bool:
    """Join the process group described by torchrun's (or SLURM's) environment.

    ``timeout``: seconds a collective may wait (default :func:`timeout_s`); it becomes this
    process's ``BNBENCH_DIST_TIMEOUT_S``, so sub-groups and messages use it too.

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
    if timeout is not None:
        os.environ[TIMEOUT_ENV] = repr(float(timeout))
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

    Standalone rendezvous on a free port, no restarts. Returns 0 when every process succeeded;
    2 when a process printed its ``bnbench: error:`` line (status 2; the others were only
    stopped); else the status of the first process that failed (``128 + signal`` for a signal),
    with a line printed here. Interrupted (Ctrl-C, SIGTERM): the processes are stopped, one
    ``bnbench: interrupted; …`` line names the last checkpoint and the command that resumes the
    run, and the status is ``128 + signal`` (130 for Ctrl-C).

    The processes die with this one, even when it is killed with SIGKILL
    (:func:`bnbench.cli.die_with_launcher`); one that is stopped (SIGSTOP) while another failed is
    ended at once (:class:`_StoppedReaper`).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would use 1 and warn
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    timeout_s()  # a bad BNBENCH_DIST_TIMEOUT_S: one line here, not one per process
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
    fd, info = tempfile.mkstemp(prefix="bnbench-run-", suffix=".json")
    os.close(fd)
    saved = {key: os.environ.get(key) for key in (cli.LAUNCHER_ENV, RUN_INFO_ENV)}
    os.environ[cli.LAUNCHER_ENV] = str(os.getpid())  # inherited by the processes torchrun starts
    os.environ[RUN_INFO_ENV] = info
    # failures are reported below, in one line (torchrun's modules set their loggers' levels)
    quiet = [logger for name, logger in logging.root.manager.loggerDict.items()
             if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger)]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    reaper = _StoppedReaper()
    reaper.start()
    try:
        run(args)
    except ChildFailedError as err:
        if any(f.exitcode == 2 for f in err.failures.values()):
            return 2  # a process said why in its `bnbench: error:` line; the others were stopped
        failed_rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
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
    except SignalException as err:  # torchrun forwarded it and waited for the processes
        print(_interrupted(info, int(err.sigval)), file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    finally:
        reaper.stop()
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        with contextlib.suppress(OSError):
            os.unlink(info)
    return 0


def _interrupted(info: str, signum: int) -> str:
    """The launcher's line for an interrupted job, from what rank 0 wrote to ``info``."""
    try:
        job = json.loads(Path(info).read_text() or "{}")
    except (OSError, ValueError):
        job = {}
    return cli.interrupted_line(job.get("run_dir"), job.get("resume"), signum)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    found = []  # kernels without CONFIG_PROC_CHILDREN: every process's parent
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _proc_stat(int(entry.name))[1:2] == [pid]:
            found.append(int(entry.name))
    return found


def _proc_stat(pid: int) -> list:
    """``[state, ppid]`` of a process from ``/proc/<pid>/stat`` (``[]`` if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return [fields[0], int(fields[1])]


class _StoppedReaper(threading.Thread):
    """Ends a stopped worker (SIGSTOP, ``T`` state) once another worker has ended.

    torchrun stops the processes of a failed job with SIGTERM and waits 30 s before SIGKILL; a
    stopped process handles nothing until continued, so the job would hang on for those 30 s.
    SIGTERM then SIGCONT ends it now (its default action: no handler runs)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(name="bnbench-reaper", daemon=True)
        self.interval = interval
        self._done = threading.Event()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)

    def run(self) -> None:
        seen: set[int] = set()
        me = os.getpid()
        while not self._done.wait(self.interval):
            states = {pid: _proc_stat(pid)[:1] for pid in _children(me)}
            alive = {pid for pid, st in states.items() if st and st[0] not in "ZX"}
            seen |= set(states)
            if not seen - alive:
                continue  # every worker still runs
            for pid, st in states.items():
                if st == ["T"]:
                    for sig in (signal.SIGTERM, signal.SIGCONT):
                        with contextlib.suppress(OSError):
                            os.killpg(pid, sig)


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
    "caused pair closure",  # gloo, when its timeout hits inside the backward's all-reduce
)
_TIMED_OUT = re.compile(r"Timed out waiting (\d+)ms|timed out|timeout", re.IGNORECASE)
#: Seconds that the ranks left after a failed collective wait for each other's roll call.
ROLL_CALL_S = 5.0


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def roll_call(store, prefix: str, me: int, world: int, wait: float) -> list[int]:
    """Answer ``me`` on ``store`` and return the ranks that did not answer within ``wait``
    seconds: after a failed collective every rank that is still running answers, so those
    missing are the ranks that died, stopped or hang."""
    store.set(f"{prefix}{me}", "1")
    deadline = time.monotonic() + wait
    while True:
        missing = [r for r in range(world) if r != me and not store.check([f"{prefix}{r}"])]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.05)


def _missing_ranks() -> list[int] | None:
    """:func:`roll_call` on the job's rendezvous store (``MASTER_ADDR``/``MASTER_PORT``: torchrun's
    agent, or rank 0 under SLURM); ``None`` when it cannot be reached."""
    try:
        wait = min(ROLL_CALL_S, timeout_s())
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=wait))
        generation = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return roll_call(store, f"bnbench/answering/{generation}/", rank(), world_size(), wait)
    except Exception:  # noqa: BLE001 - the store went with a dead rank 0: no names then
        return None


def peer_failure(err: BaseException) -> str | None:
    """A one-line description if ``err`` is a collective that failed because another process of
    the group died or stopped answering (its own error is the one to read); else ``None``.

    The ranks still running answer a roll call (:func:`roll_call`) that names the missing ones;
    the lowest of them reports and the others return ``""`` (one line for the job) after a
    moment, so that it is not stopped before its line is out."""
    if not is_distributed() or dist.get_world_size() == 1:
        return None
    text = str(err).strip()
    if not isinstance(err, getattr(dist, "DistError", ())) and not any(
        s in text for s in _PEER_LOST
    ):
        return None
    me, world = rank(), world_size()
    missing = _missing_ranks()
    if missing and me != min(set(range(world)) - set(missing)):
        time.sleep(2)
        return ""
    if missing is None:  # unknown: with 2 processes, the other one
        missing = [1 - me] if world == 2 else []
    timed_out = _TIMED_OUT.search(text)
    if timed_out:
        waited = int(timed_out.group(1)) / 1000 if timed_out.group(1) else timeout_s()
        who = _ranks(missing) if missing else "another rank"
        return (
            f"rank {me}/{world}: timed out after {waited:g} s waiting for {who} in a collective "
            f"operation: {'they' if len(missing) > 1 else 'it'} stopped or hung "
            f"({TIMEOUT_ENV}={timeout_s():g} sets the limit)"
        )
    first = text.splitlines()[0] if text else type(err).__name__
    first = re.sub(r"^\[[^\]]*\] ", "", first).split(". ")[0]  # no source location, advice
    who = _ranks(missing) if missing else "another process"
    return (
        f"rank {me}/{world}: stopped because a collective operation failed; {who} "
        f"failed or stopped answering (see its error): {first}"
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
