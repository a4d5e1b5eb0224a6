"""Validation: accuracy under each kind of normalization statistics.

Kinds (``stats`` in ``metrics.jsonl``): ``ema`` — the population statistics trained by EMA;
``precise`` — PreciseBN statistics recomputed on training samples (:mod:`bnbench.population`);
``batch`` — mini-batch statistics at inference (Rethinking §4.2); ``none`` — layers without
batch statistics (GN/LN/IN), one accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench.norm import bn_layers


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], autocast: bool = False
) -> dict[str, float]:
    """Top-1, top-5 (%) and mean cross-entropy over ``batches``, summed over all processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss
    for x, y in batches:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            logits = model(x).float()
        if y.numel() == 0:
            continue
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == y[:, None]
        totals += torch.stack(
            [
                torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
                hits[:, 0].sum().double(),
                hits.any(1).sum().double(),
                F.cross_entropy(logits, y, reduction="sum").double(),
            ]
        )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    n = max(totals[0].item(), 1.0)
    return {
        "top1": 100 * totals[1].item() / n,
        "top5": 100 * totals[2].item() / n,
        "loss": totals[3].item() / n,
    }


@torch.no_grad()
def sync_population_stats(model: nn.Module, mode: str = "average") -> None:
    """Make the EMA statistics of all processes equal: average them, or take rank 0's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for layer in bn_layers(model) for b in (layer.running_mean, layer.running_var)]
    if not buffers:
        return
    flat = torch.cat([b.flatten().double() for b in buffers])
    if mode == "average":
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    else:
        dist.broadcast(flat, src=0)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
