"""The prepared accelerator check: the training paths on a device (PyTorch's kernels there:
cuDNN on CUDA) against a float64 reference on the CPU, then an autocast step. Run it when a
session has a GPU:

    python scripts/device_check.py --device cuda --out results/device_check_cuda_<date>.md
    scripts/bench.sh --threads 2          # then the cost tables (bench_cuda_<date>.md)

For every variant with its own training step (and bn/frozen as controls): the same ResNet-18
(1/4 width, small stem, ReLU → SiLU so that rounding cannot flip an activation), a few SGD
steps on the same batches, once on ``--device`` in float32 and once on the CPU in float64.
Reported: the largest error of the logits (every step), of the parameter gradients (last
step) and of the floating buffers (running statistics, CBN's history), each
relative to the reference's largest magnitude; PASS below the row's tolerance (fp32 rounding
through a few steps; bf16 Jacobians carry ~0.3 % on the compensation term). Integer buffers
(``num_batches_tracked``, CBN's ring state) must be equal. Then one bf16-autocast step per
variant on the device: a finite loss, CBN's history still float32.

Writes the table with the command line to ``--out``; exit status 1 when a row fails.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbench import bench
from bnbench.models.resnet import resnet
from bnbench.norm import convert
from bnbench.norm.brn import BatchRenorm2d

#: (variant as in ``bnbench bench --variants``, tolerance)
ROWS = [("bn", 1e-4), ("frozen", 1e-4), ("ghost", 1e-4), ("ghost:nbs=2", 1e-4), ("brn", 1e-4),
        ("naive_cbn", 1e-4), ("cbn", 1e-4), ("cbn:neg_var=drop", 1e-4),
        ("cbn:jacobian_dtype=bfloat16", 1e-2), ("domain", 1e-4)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/device_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1/8 width, batch 16 (CPU smoke)")
    p.add_argument("--out", default=None, help="markdown file for the table")
    return p.parse_args(argv)


def smooth(model: nn.Module) -> nn.Module:
    """ReLU → SiLU: a ReLU whose input is within rounding of 0 flips between two runs and changes
    a weight gradient by a whole term (seen at 1e-2); the check wants rounding-level agreement."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.SiLU())
    return model


def build(spec: str, base: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    (variant,) = bench.parse_variants(spec)
    model = convert(copy.deepcopy(base), variant.name, **variant.options)
    model = model.to(device=device, dtype=dtype).train()
    past_schedules(model)
    return model


def past_schedules(model: nn.Module) -> None:
    """BRN past its warm-up and ramps: the corrections are active."""
    for m in model.modules():
        if isinstance(m, BatchRenorm2d):
            end = max(m.warmup_iters, m.rmax_iters, m.dmax_iters) * m.schedule_scale
            m.num_batches_tracked.fill_(math.ceil(end) + 1)


def train(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    p = next(model.parameters())
    logits = []
    for x, target in batches:
        out = model(x.to(p.device, p.dtype))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out, target.to(p.device)).backward()
        opt.step()
        logits.append(out.detach())
    return logits


def rel_error(got: list[Tensor], want: list[Tensor]) -> float:
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        w = w.double().cpu()
        scale = float(w.abs().max()) or 1.0
        worst = max(worst, float((g.double().cpu() - w).abs().max()) / scale)
    return worst


def compare(spec: str, base: nn.Module, batches, device: str) -> dict[str, object]:
    tested = build(spec, base, device, torch.float32)
    ref = build(spec, base, "cpu", torch.float64)
    out = {"logits": rel_error(train(tested, batches), train(ref, batches))}
    grads = [(p.grad, q.grad) for p, q in zip(tested.parameters(), ref.parameters())
             if q.grad is not None]
    out["grads"] = rel_error([g for g, _ in grads], [r for _, r in grads])
    floats, ints_equal = [], True
    for a, b in zip(tested.state_dict().values(), ref.state_dict().values(), strict=True):
        if b.is_floating_point():
            if b.numel():
                floats.append((a, b))
        else:
            ints_equal &= torch.equal(a.cpu(), b)
    out["buffers"] = rel_error([a for a, _ in floats], [b for _, b in floats])
    out["ints_equal"] = ints_equal
    return out


def autocast_step(spec: str, base: nn.Module, batch, device: str) -> str:
    model = build(spec, base, device, torch.float32)
    x, target = batch
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x.to(device)), target.to(device))
    loss.backward()
    hist = [b.dtype for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("hist_")
            and b.is_floating_point()]
    if not torch.isfinite(loss):
        return "non-finite loss"
    if any(d != torch.float32 for d in hist):
        return "history not float32"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # fp32 means fp32: TF32 convolutions/matmuls (CUDA's default for cuDNN) would dominate the
    # comparison with ~1e-3 errors of their own.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    width, size, n = (0.125, 16, 16) if args.quick else (0.25, 16, 32)
    torch.manual_seed(0)
    base = smooth(resnet("resnet18", 10, width=width, small_input=True))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, size, size, generator=gen),
                torch.randint(0, 10, (n,), generator=gen)) for _ in range(args.steps)]
    lines = ["| variant | logits | gradients | buffers | integer buffers | tolerance | autocast "
             "bf16 step | result |", "|---|---|---|---|---|---|---|---|"]
    failed = 0
    for spec, tol in ROWS:
        try:
            r = compare(spec, base, batches, args.device)
            amp = autocast_step(spec, base, batches[0], args.device)
            ok = (max(r["logits"], r["grads"], r["buffers"]) < tol and r["ints_equal"]
                  and amp == "ok")
            cells = [f"{r[k]:.1e}" for k in ("logits", "grads", "buffers")]
            cells += ["equal" if r["ints_equal"] else "DIFFER", f"{tol:g}", amp]
        except Exception as err:  # one row's failure is reported, the others still run
            ok, cells = False, [f"error: {type(err).__name__}: {err}".replace("|", "/")[:200]]
            cells += [""] * 5
        failed += not ok
        lines.append(f"| {spec} | " + " | ".join(cells) + f" | {'PASS' if ok else 'FAIL'} |")
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu ({torch.get_num_threads()} threads)")
    head = [f"$ python {shlex.join(['scripts/device_check.py', *(argv or sys.argv[1:])])}", "",
            f"# Training paths on {args.device} against a float64 CPU reference", "",
            f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}; torch "
            f"{torch.__version__}; device: {device}",
            f"- resnet18 width {width}, {size} px, batch {n}, {args.steps} SGD steps (lr 0.01, "
            "momentum 0.9); errors relative to the reference's largest magnitude", ""]
    text = "\n".join([*head, *lines, ""])
    print(text)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)  # atomic: no half-written table
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
