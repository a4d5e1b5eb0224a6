"""The training loop: config → data, model, optimizer → epochs → EMA vs PreciseBN validation.

One obvious path (pycls-style): :func:`train` builds everything from the config
(:func:`build_run`: data, batch plan, loader, model — what ``bnbench eval`` rebuilds from a run's
config too) and runs :func:`_train_epoch` / :func:`_validate` in turn; validation is
:func:`bnbench.evaluate.evaluate_stats`, the one evaluation path. Learning rate: ``optim.lr`` is
per 256 images and scaled by the global batch (Goyal et al. 2017), with linear warmup then cosine
or step decay.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bnbench import checkpoint as ckpt
from bnbench import distributed as D
from bnbench.config import TrainConfig, layer_options
from bnbench.data import DataSource, Loader, build_dataset
from bnbench.errors import BnbenchError
from bnbench.evaluate import (
    LABELS,
    Reader,
    evaluate_stats,
    precise_batches,
    precise_spec,
    run_specs,
    sync_population_stats,
)
from bnbench.logs import RunLog, write_json
from bnbench.models import build_model
from bnbench.norm import bn_layers, is_norm
from bnbench.plan import BatchPlan, batch_plan
from bnbench.population import update_population_stats

log = logging.getLogger("bnbench")


@dataclass
class State:
    """Everything a checkpoint restores besides model and optimizer."""

    epoch: int = 0  # next epoch to run
    iteration: int = 0
    elapsed: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)


def lr_at(cfg: DictConfig, iteration: int, iters_per_epoch: int, global_batch: int) -> float:
    """Learning rate of an iteration (a pure function, so resuming needs only the iteration)."""
    o = cfg.optim
    base = o.lr * global_batch / 256
    total = cfg.trainer.epochs * iters_per_epoch
    warmup = round(o.warmup_epochs * iters_per_epoch)
    if iteration < warmup:
        return base * _ramp(o.warmup_factor, iteration, warmup)
    if o.schedule == "cosine":
        progress = (iteration - warmup) / max(total - warmup, 1)
        lr = base * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        lr = base * o.gamma ** sum(iteration / iters_per_epoch >= s for s in o.steps)
    return lr * _freeze_warmup(cfg, iteration, iters_per_epoch)


def _freeze_warmup(cfg: DictConfig, iteration: int, iters_per_epoch: int) -> float:
    """Factor of the linear warmup after the FrozenBN switch (Rethinking §4.3: one epoch)."""
    freeze, epochs = cfg.norm.freeze_at_epoch, cfg.norm.freeze_warmup_epochs
    if freeze is None or not epochs:
        return 1.0
    start, length = freeze * iters_per_epoch, max(1, round(epochs * iters_per_epoch))
    if not start <= iteration < start + length:
        return 1.0
    return _ramp(cfg.optim.warmup_factor, iteration - start, length)


def _ramp(factor: float, done: int, length: int) -> float:
    """Linear warmup from ``factor`` to 1 over ``length`` iterations, ``done`` of them done."""
    return factor + (1 - factor) * done / length


def training_loss(model: nn.Module, output: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a training step and the ``(N, K)`` logits whose top-1 the trainer counts.

    A model whose training output is not one logits tensor owns its loss: its
    ``training_loss(output, targets, label_smoothing)`` returns both (the FPN head,
    :class:`bnbench.models.fpn.FPNClassifier`: ``Σ_l CE(z_l, y)`` over its levels, and their
    mean logits). Any other model's output is its logits, and the loss their cross-entropy. In
    eval mode every model returns ``(N, K)`` logits, so evaluation has no such hook. The output
    is float32 at least (bf16 autocast), float64 in float64 runs.
    """
    output = output if output.dtype == torch.float64 else output.float()
    own = getattr(model, "training_loss", None)
    if own is not None:
        return own(output, targets, label_smoothing)
    return F.cross_entropy(output, targets, label_smoothing=label_smoothing), output


def param_groups(model: nn.Module, weight_decay: float, no_wd_norm_bias: bool) -> list[dict]:
    """SGD groups: optionally no weight decay on normalization parameters and biases."""
    if not no_wd_norm_bias:
        return [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "weight_decay": weight_decay,
            }
        ]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if is_norm(module) or name == "bias" else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class RunParts:
    """What a run's config builds before training: data, batch plan, training loader, model."""

    data: DataSource
    plan: BatchPlan
    train_loader: Loader
    model: nn.Module


def build_run(cfg: DictConfig, *, rank: int = 0, world: int = 1,
              device: torch.device | None = None) -> RunParts:
    """The data, batch plan (for ``world`` processes), this process's training loader and the
    model (on ``device``, default the CPU, in the run's precision and memory format) of a run,
    as the trainer builds them. The layers' options depend on the iterations per epoch (CBN
    burn-in, BRN schedules), so ``bnbench eval`` rebuilds a checkpoint's model with this too."""
    device = device or torch.device("cpu")
    data = build_dataset(cfg.dataset)
    plan = batch_plan(cfg, world, data.train_size)
    train_loader = data.loader("train", plan.per_process, augment=True, shuffle=True,
                               drop_last=True, seed=cfg.trainer.seed, rank=rank,
                               world_size=world, device=device, pattern=plan.pattern)
    options = layer_options(cfg, plan, len(train_loader))
    model = build_model(cfg.model, cfg.norm.name, options, data.num_classes).to(device)
    if cfg.trainer.float64:
        model = model.double()
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return RunParts(data, plan, train_loader, model)


def restore_frozen(model: nn.Module, cfg: DictConfig, epochs_done: int) -> None:
    """Mark the layers FrozenBN in a model restored after ``epochs_done`` epochs of a run that
    switched to FrozenBN before them (``norm.freeze_at_epoch``): a checkpoint holds the frozen
    statistics, but the switch is an attribute, not a buffer."""
    freeze = cfg.norm.freeze_at_epoch
    if freeze is not None and epochs_done > freeze:
        for layer in bn_layers(model):
            layer.frozen = True


def keep_epoch(last: Path, epochs_done: int) -> Path:
    """``trainer.keep_checkpoints``: keep ``last`` as ``epoch{E}.pt`` beside it (``E`` = epochs
    done), for analyses over training (Rethinking Fig. 2). A hard link (``last.pt`` is replaced,
    not rewritten, by the next checkpoint, so the link keeps this epoch's file), else a copy;
    made under a temporary name and renamed, so a reader never sees a partial file."""
    kept = last.with_name(f"epoch{epochs_done}.pt")
    tmp = last.with_name(f".{kept.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(last, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(last, tmp)
        os.replace(tmp, kept)
    finally:
        # (a rename onto another link of the same file does nothing and leaves ``tmp``)
        tmp.unlink(missing_ok=True)
    return kept


#: Keys a resumed run may change: how it runs, not what it computes.
RESUMABLE_CHANGES = frozenset({"trainer.resume", "trainer.progress", "trainer.threads",
                               "trainer.device", "dataset.workers", "dataset.root",
                               "dataset.download", "dist.timeout_s"})


def config_changes(saved: dict[str, Any], current: dict[str, Any],
                   prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key whose value differs between a
    checkpoint's config and this run's, except :data:`RESUMABLE_CHANGES`: resuming with another
    dataset, norm or schedule would silently continue a different run. A key that a checkpoint of
    an older bnbench lacks counts as its schema default (the value the run had in effect)."""
    if not prefix:
        saved = _with_defaults(saved, OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{name}.")
        elif a != b and name not in RESUMABLE_CHANGES:
            out.append((name, a, b))
    return out


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys it lacks taken from ``defaults`` (recursively)."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _with_defaults(out[key], value)
    return out


class Trainer:
    """Holds the built objects of one run; :meth:`fit` runs it."""

    def __init__(self, cfg: DictConfig, run_dir: Path | None) -> None:
        self.cfg = cfg
        self.rank, self.world = D.rank(), D.world_size()
        self.device = D.device_for(cfg.trainer.device)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.trainer.seed)
        self.run_dir = run_dir
        t = cfg.trainer
        parts = build_run(cfg, rank=self.rank, world=self.world, device=self.device)
        self.data, self.plan, self.model = parts.data, parts.plan, parts.model
        self.global_batch = self.plan.global_batch
        self.train_loader = parts.train_loader
        self.iters_per_epoch = len(self.train_loader)
        self.net = D.wrap_model(self.model, cfg.dist, self.device)
        if t.compile:  # the whole model, public API (checkpoints keep using self.model)
            self.net = torch.compile(self.net, backend=t.compile_backend)
        self.optimizer = torch.optim.SGD(
            param_groups(self.model, cfg.optim.weight_decay, cfg.optim.no_wd_norm_bias),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
        )
        self.state = State()
        self.log = RunLog(run_dir if self.rank == 0 else None)
        self.ckpt_path = run_dir / "checkpoints" / "last.pt" if run_dir else None
        self.autocast = t.bf16  # bf16 autocast, on GPUs and CPUs alike
        # Validation reads as `bnbench eval` does: the same loaders, precision and statistics.
        self.reader = Reader(self.data, seed=t.seed, rank=self.rank, world=self.world,
                             device=self.device, float64=t.float64, autocast=self.autocast,
                             progress=self._progress)
        self.precise = precise_spec(cfg)
        self.specs = run_specs(self.model, cfg, self.plan)

    def _progress(self, batches: Iterable, total: int, desc: str) -> Iterable:
        """:func:`progress` on rank 0."""
        return progress(batches, total, desc, self.cfg.trainer.progress if self.rank == 0
                        else False)

    # -- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Rank 0 writes ``last.pt`` (and keeps it as ``epoch{E}.pt`` with
        ``trainer.keep_checkpoints``); with several processes every rank first writes its own
        buffers (CBN's window history and the EMA are per rank) and RNG state to
        ``last.rank{r}.it{iteration}.pt``, so a resume continues each rank exactly."""
        if not self.cfg.trainer.checkpoint:
            return
        sharded = self.world > 1
        folder = D.broadcast_object(str(self.ckpt_path.parent) if self.ckpt_path else None)
        if folder is None:
            return
        shard = self._shard_path(Path(folder), self.rank, self.state.iteration)
        if sharded:
            names = {name for name, _ in self.model.named_buffers()}
            buffers = {k: v for k, v in self.model.state_dict().items() if k in names}
            ckpt.save_atomic({"iteration": self.state.iteration, "buffers": buffers,
                              "rng": ckpt.rng_state()}, shard)
            D.dist.barrier()  # every shard on disk before last.pt points at this iteration
        if self.rank == 0:
            ckpt.save_atomic(
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "state": vars(self.state),
                    "rng": ckpt.rng_state(),
                    "config": OmegaConf.to_container(self.cfg),
                },
                self.ckpt_path,
            )
            if self.cfg.trainer.keep_checkpoints:
                keep_epoch(self.ckpt_path, self.state.epoch)
        if sharded:
            D.dist.barrier()  # last.pt is at this iteration: older shards can go
            for old in Path(folder).glob(f"last.rank{self.rank}.it*.pt"):
                if old != shard:
                    old.unlink(missing_ok=True)

    @staticmethod
    def _shard_path(folder: Path, rank: int, iteration: int) -> Path:
        return folder / f"last.rank{rank}.it{iteration}.pt"

    def _resume(self) -> None:
        path = D.broadcast_object(str(self.ckpt_path) if self.ckpt_path else None)
        if self.run_dir is not None:
            for partial in [*self.run_dir.glob(".*.tmp"), *self.run_dir.glob("checkpoints/.*.tmp")]:
                partial.unlink(missing_ok=True)  # a write that a kill interrupted
        if path is None or not Path(path).exists():
            finished = self.run_dir is not None and (self.run_dir / "summary.json").exists()
            if D.broadcast_object(finished):
                raise BnbenchError(f"trainer.resume: {self.run_dir} holds a finished run without "
                                   "a checkpoint (trainer.checkpoint=false): nothing to resume; "
                                   "choose another hydra.run.dir")
            dropped = self.log.rewind(0, 0)
            log.info("trainer.resume: no checkpoint in the run dir, starting from scratch%s",
                     f" ({dropped} rows of the interrupted run dropped)" if dropped else "")
            return
        data = ckpt.load(Path(path), self.device)
        changes = config_changes(data.get("config", {}), OmegaConf.to_container(self.cfg))
        if changes:
            raise BnbenchError(
                f"trainer.resume: the checkpoint {path} was trained with another config ("
                + ", ".join(f"{k}: {a} → {b}" for k, a, b in changes[:4])
                + (", …" if len(changes) > 4 else "")
                + "); resume with the run's own config, or choose another hydra.run.dir")
        try:
            self.model.load_state_dict(data["model"])
        except RuntimeError as err:
            raise BnbenchError(f"checkpoint {path} does not fit this model/norm config") from err
        self.optimizer.load_state_dict(data["optimizer"])
        self.state = State(**data["state"])
        ckpt.set_rng_state(data["rng"])
        if self.world > 1:
            shard = self._shard_path(Path(path).parent, self.rank, self.state.iteration)
            if shard.exists():
                own = ckpt.load(shard, self.device)
                self.model.load_state_dict(own["buffers"], strict=False)
                ckpt.set_rng_state(own["rng"])
            else:
                log.warning("rank %d: no %s; continuing from rank 0's buffers", self.rank,
                            shard.name)
        dropped = self.log.rewind(self.state.epoch, self.state.iteration)
        log.info("resumed from %s at epoch %d%s", path, self.state.epoch,
                 f" ({dropped} rows logged after it dropped)" if dropped else "")

    # -- one epoch ----------------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = lr_at(self.cfg, self.state.iteration, self.iters_per_epoch, self.global_batch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, net = self.cfg, self.net
        freeze = cfg.norm.freeze_at_epoch
        layers = bn_layers(self.model)
        if freeze is not None and epoch >= freeze and not all(m.frozen for m in layers):
            self._freeze(layers, at_switch=epoch == freeze)
        net.train()
        self.train_loader.set_epoch(epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        start = time.perf_counter()
        total = len(self.train_loader)
        if cfg.trainer.max_iters:
            total = max(0, min(total, cfg.trainer.max_iters - self.state.iteration))
        bar = self._progress(self.train_loader, total, f"epoch {epoch + 1}/{cfg.trainer.epochs}")
        for x, y in self.reader.cast(bar):
            lr = self._set_lr()
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                output = net(x)
            loss, logits = training_loss(self.model, output, y, cfg.optim.label_smoothing)
            if not torch.isfinite(loss):
                kept = self.ckpt_path is not None and self.ckpt_path.exists()
                raise BnbenchError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, iteration "
                    f"{self.state.iteration}; "
                    + (f"the last good checkpoint is kept at {self.ckpt_path}" if kept
                       else "no checkpoint was written before it")
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state.iteration += 1
            with torch.no_grad():
                sums += torch.stack(
                    [
                        loss.detach().double() * y.numel(),
                        (logits.argmax(1) == y).sum().double(),
                        torch.tensor(float(y.numel()), device=self.device).double(),
                    ]
                )
            if self.state.iteration % 20 == 0:
                self.log.scalar("train/loss", loss.item(), self.state.iteration)
                self.log.scalar("train/lr", lr, self.state.iteration)
            if cfg.trainer.max_iters and self.state.iteration >= cfg.trainer.max_iters:
                break
        D.all_reduce_(sums)
        n = max(sums[2].item(), 1.0)
        seconds = time.perf_counter() - start
        return {
            "loss": sums[0].item() / n,
            "top1": 100 * sums[1].item() / n,
            "lr": lr,
            "time": seconds,
            "images_per_s": n / seconds,
        }

    def _freeze(self, layers: list, *, at_switch: bool) -> None:
        """FrozenBN from here on (Fig. 6), with population statistics that every rank shares:
        PreciseBN's of the model at the switch (``norm.freeze_stats=precise``) or the ranks'
        synced EMA. After the switch epoch (a resumed run) the checkpoint holds the frozen
        statistics already."""
        cfg = self.cfg
        if at_switch and cfg.norm.freeze_stats == "precise":
            update_population_stats(self.model, self._precise_batches(),
                                    estimator=cfg.precise.estimator,
                                    layerwise=cfg.precise.layerwise)
        else:
            sync_population_stats(self.model, cfg.dist.ema_sync)
        for layer in layers:
            layer.frozen = True

    # -- validation ---------------------------------------------------------------------------
    def _precise_batches(self):
        """PreciseBN's batches for the model of this epoch (the trainer's subset)."""
        return precise_batches(self.reader, self.precise, self.plan, self.state.epoch)

    def _validate(self, epoch: int) -> dict[str, dict[str, float]]:
        """Every kind of statistics of :func:`bnbench.evaluate.run_specs` on the validation
        set, after the processes' EMA statistics are made equal."""
        sync_population_stats(self.model, self.cfg.dist.ema_sync)
        results: dict[str, dict[str, float]] = {}
        for spec in self.specs:
            start = time.perf_counter()
            results[spec.name] = evaluate_stats(self.model, self.reader, spec, self.plan,
                                                epoch=self.state.epoch)
            results[spec.name]["time"] = time.perf_counter() - start
        return results

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.trainer.resume:
            self._resume()
        iters = self.iters_per_epoch
        stop = f", stopping at iteration {cfg.trainer.max_iters}" if cfg.trainer.max_iters else ""
        log.info("model %s, norm %s, %d iterations/epoch%s", cfg.model.arch, cfg.norm.name, iters,
                 stop)
        log.info("%s", self.plan.describe())
        if self.plan.remainder:
            log.warning("trainer.batch_size=%d is not a multiple of norm.nbs=%d: every step's "
                        "last %d samples form a smaller normalization batch",
                        self.plan.per_process, self.plan.normalization, self.plan.remainder)
        for epoch in range(self.state.epoch, cfg.trainer.epochs):
            start = time.perf_counter()
            train = self._train_epoch(epoch)
            self._record("train", epoch, "batch", train)
            last = epoch + 1 == cfg.trainer.epochs or bool(cfg.trainer.max_iters)
            if (epoch + 1) % cfg.eval.every == 0 or last:
                val = self._validate(epoch)
                for kind, metrics in val.items():
                    self._record("val", epoch, kind, metrics)
                log.info(
                    "epoch %d/%d  train loss %.3f  %s",
                    epoch + 1,
                    cfg.trainer.epochs,
                    train["loss"],
                    "  ".join(f"{_label(k)} {m['top1']:.2f}%" for k, m in val.items()),
                )
            self.state.epoch = epoch + 1
            self.state.elapsed += time.perf_counter() - start
            self._checkpoint()
            if cfg.trainer.max_iters and self.state.iteration >= cfg.trainer.max_iters:
                break
        summary = self._summary()
        if self.rank == 0 and self.run_dir is not None:
            write_json(self.run_dir / "summary.json", summary)
        self.log.close()
        if D.is_distributed():
            D.dist.barrier()  # every rank done (and rank 0's files written) before any exits
        return summary

    def _record(self, split: str, epoch: int, kind: str, metrics: dict[str, float]) -> None:
        self.log.event(
            epoch=epoch + 1, iter=self.state.iteration, split=split, stats=kind, **metrics
        )
        for key in ("top1", "top5", "loss"):
            if key in metrics:
                tag = f"{split}/{key}" if split == "train" else f"{split}/{key}_{kind}"
                self.log.scalar(tag, metrics[key], self.state.iteration)
        if split == "val":
            self.state.history.setdefault(kind, []).append(metrics["top1"])

    def _summary(self) -> dict[str, Any]:
        cfg, h = self.cfg, self.state.history
        images = self.state.iteration * self.global_batch
        return {
            "model": OmegaConf.to_container(cfg.model),
            "norm": OmegaConf.to_container(cfg.norm),
            "dataset": cfg.dataset.name,
            "epochs": cfg.trainer.epochs,
            "iterations": self.state.iteration,
            "world_size": self.world,
            "batch_per_process": self.plan.per_process,
            "global_batch": self.global_batch,
            "normalization_batch": self.plan.normalization,
            "batch_plan": self.plan.as_dict(),
            "final_top1": {k: v[-1] for k, v in h.items()},
            "best_top1": {k: max(v) for k, v in h.items()},
            "wall_time_s": self.state.elapsed,
            "images_per_s": images / self.state.elapsed if self.state.elapsed else None,
        }


def _label(kind: str) -> str:
    return LABELS[kind]


def progress(iterable: Iterable, total: int, desc: str, mode: bool | None) -> Iterable:
    """Progress of a loop over batches: a tqdm bar on a terminal (or ``trainer.progress=true``);
    off a terminal (SLURM logs) with ``trainer.progress`` unset, a log line at every ~10 % with
    images/s and the ETA; nothing with ``trainer.progress=false``."""
    if mode is False:
        return iterable
    if mode or sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return _progress_lines(iterable, total, desc)


def _progress_lines(iterable: Iterable, total: int, desc: str) -> Iterator:
    every, start, images = max(1, math.ceil(total / 10)), time.perf_counter(), 0
    for done, item in enumerate(iterable, 1):
        yield item
        images += (item[0] if isinstance(item, (tuple, list)) else item).shape[0]
        if done % every == 0 and done < total:
            seconds = time.perf_counter() - start
            eta = seconds / done * (total - done)
            log.info("%s: %d/%d batches, %.0f img/s, ETA %s", desc, done, total,
                     images / seconds, _duration(eta))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def train(cfg: DictConfig, run_dir: Path | None) -> dict[str, Any]:
    """Run one training job; returns the summary (also written to ``summary.json``)."""
    trainer = Trainer(cfg, run_dir)
    summary = trainer.fit()
    if trainer.rank == 0:
        final = "  ".join(f"{v:.2f}%" if k == "none" else f"{_label(k)} {v:.2f}%"
                          for k, v in summary["final_top1"].items())  # gn/ln/in: one number
        where = f"; run dir {run_dir}" if run_dir is not None else ""
        print(f"final top-1: {final}  ({summary['wall_time_s']:.0f} s){where}", flush=True)
    return summary
