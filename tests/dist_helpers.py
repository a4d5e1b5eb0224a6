"""Gloo workers for tests/test_distributed.py (importable by ``spawn`` children).

:func:`run_jobs` runs a list of ``fn(rank, world, *args)`` jobs in ``world`` fresh processes
joined in one gloo group (file rendezvous, so no port can clash) and returns each job's results
in rank order, or the workers' tracebacks; a hang ends at ``timeout``. Workers return tensors; the
references are computed by the tests in their own (single) process.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

C, H, W = 4, 3, 3


def _worker(jobs, rank, world, store, results) -> None:
    done: dict[str, tuple[str, Any]] = {}
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        for name, fn, args in jobs:
            try:
                done[name] = ("ok", fn(rank, world, *args))
                dist.barrier()
            except BaseException:  # noqa: BLE001 - report everything to the test
                done[name] = ("error", traceback.format_exc())
                break  # the group is out of step now: the other rank's collective fails too
    except BaseException:  # noqa: BLE001
        done["<setup>"] = ("error", traceback.format_exc())
    finally:
        buf = io.BytesIO()
        torch.save(done, buf)  # bytes, not shared-memory tensors: the worker exits next
        results.put((rank, buf.getvalue()))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_jobs(
    jobs: list[tuple[str, Callable[..., Any], tuple]], world: int = 2, timeout: float = 180
) -> dict[str, list[Any]]:
    """Run every ``(name, fn, args)`` in one set of ``world`` workers, in order.

    Returns ``name → [result of rank 0, result of rank 1, …]``, or ``name → AssertionError`` (with
    the workers' tracebacks) for a job that failed or never ran. Starting processes is what costs
    (~5 s for 2 on 2 cores), so the tests share one set of workers.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    got: dict[int, dict[str, tuple[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(jobs, r, world, store, results)) for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            while len(got) < world:
                rank, blob = results.get(timeout=timeout)
                got[rank] = torch.load(io.BytesIO(blob), weights_only=False)
        except queue.Empty:
            pass
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    out: dict[str, Any] = {}
    for name, _, _ in jobs:
        per_rank = [got.get(r, {}).get(name) for r in range(world)]
        if all(item is not None and item[0] == "ok" for item in per_rank):
            out[name] = [item[1] for item in per_rank]
            continue
        why = [
            f"rank {r}: " + ("did not run or hung" if item is None else str(item[1]))
            for r, item in enumerate(per_rank)
        ]
        for r in range(world):
            if "<setup>" in got.get(r, {}):
                why.append(f"rank {r} setup: {got[r]['<setup>'][1]}")
        out[name] = AssertionError(f"job {name} failed:\n" + "\n".join(why))
    return out


# -- data shared by workers and references -----------------------------------------------------


def batch(rank: int, sizes: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s input and loss weights; the test rebuilds all of them for its reference."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.randn(total, C, H, W, generator=gen, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(total, C, H, W, generator=gen, dtype=torch.float64)
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]].clone(), w[start : start + sizes[rank]].clone()


def bn_layer(**kwargs) -> nn.Module:
    from bnbench.norm import BatchNorm2d

    layer = BatchNorm2d(C, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, C))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return layer


def _bn_step(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, steps: int = 2) -> dict:
    """Two training steps (so the EMA moves twice); outputs and gradients of the last."""
    for _ in range(steps):
        layer.zero_grad()
        x = x.detach().requires_grad_(True)
        y = layer(x)
        (y * w).sum().backward()
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": layer.weight.grad.clone(),
        "dbias": layer.bias.grad.clone(),
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "tracked": int(layer.num_batches_tracked),
    }


# -- workers ----------------------------------------------------------------------------------


def syncbn_worker(rank: int, world: int, sizes: list[int], group_size: int) -> dict:
    from bnbench import norm as norms

    layer = norms.make("syncbn", group_size=group_size)(C).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, C))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, C))
    x, w = batch(rank, sizes)
    out = _bn_step(layer, x, w)
    out["group_world"] = dist.get_world_size(layer.process_group)
    layer.eval()  # mini-batch statistics at inference: groups of 2 of this rank's samples only
    layer.eval_stats, layer.eval_nbs = "batch", 2
    with torch.no_grad():
        out["y_eval"] = layer(x) if x.shape[0] else None
    return out


def precise_worker(rank: int, world: int, chunks: list[list[int]], kwargs: dict) -> dict:
    from bnbench.population import update_population_stats

    model = small_net()
    data = precise_data()
    with torch.no_grad():  # EMA buffers that differ per rank, to be overwritten
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.fill_(rank + 3.0)
    mine = [data[i] for i in chunks[rank]]
    update_population_stats(model, lambda: iter(mine), **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def small_net(norm: str = "bn", **options) -> nn.Module:
    """conv-BN-ReLU-conv-BN-ReLU-pool-fc in float64, the same init for every caller."""
    from bnbench import norm as norms

    torch.manual_seed(1234)
    make = norms.make(norm, **options)
    net = nn.Sequential(
        nn.Conv2d(C, 6, 3, padding=1),
        make(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        make(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    return net.double()


def precise_data(batches: int = 6, size: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [
        torch.randn(size, C, H, W, generator=gen, dtype=torch.float64) * 1.5 + 0.3
        for _ in range(batches)
    ]


def shuffle_worker(rank: int, world: int, sizes: list[int], use_ddp: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnbench.shuffle import ShuffleBN

    net = small_net()
    wrapped = ShuffleBN(net, group=dist.new_group())
    module = DDP(wrapped, broadcast_buffers=False) if use_ddp else wrapped
    x, _ = batch(rank, sizes, seed=3)
    gen = torch.Generator().manual_seed(11)
    wts = torch.randn(sum(sizes), 3, generator=gen, dtype=torch.float64)
    start = sum(sizes[:rank])
    w = wts[start : start + sizes[rank]]
    torch.manual_seed(100 + rank)  # rank 0's draw is the one used: ranks may disagree
    x.requires_grad_(True)
    out = module(x)
    (out * w).sum().backward()
    module.eval()
    with torch.no_grad():
        eval_out = module(x.detach())
    return {
        "y": out.detach(),
        "eval_y": eval_out,
        "dx": x.grad,
        "perm": wrapped.last_permutation,
        "grads": {k: p.grad.clone() for k, p in net.named_parameters()},
        "buffers": {k: b.clone() for k, b in net.state_dict().items() if "running" in k},
    }
