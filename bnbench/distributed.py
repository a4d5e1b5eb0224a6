"""Process groups and rank helpers (torch.distributed: NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import os

import torch.distributed as dist

from bnbench.errors import BnbenchError


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
        group = dist.new_group(list(range(start, start + size)))
        if start <= dist.get_rank() < start + size:
            mine = group
    return mine


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(backend: str = "auto", use_cuda: bool = False) -> bool:
    """Join the process group described by torchrun's environment; ``False`` if single-process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend)
    return True


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


def wrap_model(model, dist_cfg, device):
    """DistributedDataParallel when multi-process. Buffers are not broadcast: every rank keeps
    its own EMA statistics (as the papers' per-GPU BN), synced before each evaluation."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False)
