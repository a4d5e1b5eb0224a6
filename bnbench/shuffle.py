"""ShuffleBN: per-process BN over a random subset of the global batch (Rethinking §6.1, Fig. 9).

Per-GPU BN normalizes each process's batch with its own statistics; when the samples of one
process are correlated (the RoIs of one image in an R-CNN head, the keys of one GPU in MoCo) the
model can exploit them through the statistics. ShuffleBN keeps per-process BN but decides which
samples a process normalizes together at random, one training step at a time:

1. the inputs of all processes are gathered: ``X`` (``G`` samples, rank ``r``'s share
   ``[o_r, o_{r+1})``, rank 0's first);
2. one permutation ``π`` of ``G`` is drawn and shared (every rank draws from its global torch RNG,
   which the trainer seeds and checkpoints, and rank 0's draw is broadcast, so all ranks agree);
3. rank ``r`` runs the wrapped module on ``X[π[o_r:o_{r+1}]]`` (its shuffled slice, as many samples
   as its own share), so each BN layer normalizes with the statistics of that random group;
4. the outputs are gathered (``Y_π``, in shuffled order) and un-shuffled: rank ``r`` returns
   ``Y[o_r:o_{r+1}]`` with ``Y[π[j]] = Y_π[j]``, the outputs of its own samples in their order.

Both gathers are differentiable (backward: the gathered gradient summed over ranks, then each
rank's slice), so every sample's gradient reaches the process that owns it and the parameter
gradients of a rank are those of the samples it normalized; DDP around this module averages them
as usual (see :func:`bnbench.distributed.wrap_model`). Unequal per-rank batches are padded for
the gathers. Outside training (``eval()``), or with a single process, the module is called
directly: population statistics do not depend on the grouping, and one process already holds
the whole global batch, so there is nothing to shuffle across — unless the process simulates
several devices (``within_process=True``: the crop head of :mod:`bnbench.models.crops`, whose
BN layers normalize groups of the process's batch), where the same steps run with a group of one
process: ``π`` drawn from the global RNG, the module run on ``X[π]``, its outputs un-shuffled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


class _GatherCat(torch.autograd.Function):
    """Concatenate every rank's ``x`` (sizes ``sizes`` along dim 0) on every rank.

    Backward: the gradient of the concatenation, summed over ranks (all-reduce), sliced to this
    rank's rows: every rank used the gathered tensor, so each contributes to every sample.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.group, ctx.sizes = group, sizes
        ctx.rank = dist.get_rank(group)
        longest = max(sizes)
        x = x.contiguous()
        if x.shape[0] < longest:
            x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        offsets = _offsets(ctx.sizes)
        return grad[offsets[ctx.rank] : offsets[ctx.rank + 1]], None, None


def gather_cat(x: Tensor, sizes: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable all-gather of unequal per-rank batches, concatenated in rank order."""
    return _GatherCat.apply(x, sizes, group)


class ShuffleBN(nn.Module):
    """Run ``module`` on a random cross-process slice of the global batch (module docstring).

    Args:
        module: the normalized part of the network; takes and returns batch-first tensors.
        group: the processes to shuffle across (default: all). A group of its own keeps these
            collectives apart from DDP's.
        within_process: shuffle a single process's batch too (its simulated devices).

    After each shuffled forward, ``last_permutation`` holds ``π`` (CPU, int64) for inspection.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None,
                 within_process: bool = False) -> None:
        super().__init__()
        self.module = module
        self.group = group
        self.within_process = within_process
        self.last_permutation: Tensor | None = None

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group or dist.group.WORLD)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.training and self.within_process and self._world() == 1:
            return self._forward_within(x, *args, **kwargs)
        if not self.training or self._world() == 1:
            return self.module(x, *args, **kwargs)
        group = self.group or dist.group.WORLD
        rank = dist.get_rank(group)
        sizes = self._sizes(x, group)
        offsets = _offsets(sizes)
        mine = slice(offsets[rank], offsets[rank + 1])
        perm = self._permutation(offsets[-1], group, x.device)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        shuffled = gather_cat(x, sizes, group)[perm[mine]]
        out = self.module(shuffled, *args, **kwargs)
        return gather_cat(out, sizes, group)[inverse[mine]]

    def _forward_within(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """One process: ``Y = module(X[π])``, returned as ``Y[π⁻¹]`` (``π`` from the global
        RNG, as the multi-process draw)."""
        perm = torch.randperm(x.shape[0]).to(x.device)
        self.last_permutation = perm.cpu()
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return self.module(x[perm], *args, **kwargs)[inverse]

    @staticmethod
    def _sizes(x: Tensor, group: dist.ProcessGroup) -> list[int]:
        mine = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, mine, group=group)
        return [int(s.item()) for s in sizes]

    def _permutation(self, total: int, group: dist.ProcessGroup, device: torch.device) -> Tensor:
        perm = torch.randperm(total).to(device)
        dist.broadcast(perm, src=dist.get_global_rank(group, 0), group=group)
        self.last_permutation = perm.cpu()
        return perm
