"""The Hydra task of ``bnbench train``: config → (process group) → :func:`bnbench.train.train`.

Every way a job ends but success is one line on stderr: ``bnbench: error: …`` (exit 2) for a
bad input, a failed run or a collective that failed because another rank died or stopped
answering; ``bnbench: interrupted; …`` (exit 130) for Ctrl-C, naming the last checkpoint and the
command that resumes the run. With several processes rank 0 alone reports an interrupt, and the
processes that ``dist.nproc=N`` started leave it to their launcher (one line for the job).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bnbench import cli
from bnbench import distributed as D
from bnbench.config import register, validate
from bnbench.errors import BnbenchError

register()


def _resume_command(run_dir: Path) -> str:
    hc = HydraConfig.get()
    # a job of a sweep: its own overrides, as a single run; else the command line as given
    args = list(hc.overrides.task) if hc.mode == RunMode.MULTIRUN else sys.argv[1:]
    return cli.resume_command(args, run_dir)


def _announce(run_dir: Path) -> None:
    """Tell the ``dist.nproc`` launcher where this job runs (it reports an interrupt)."""
    path = os.environ.get(D.RUN_INFO_ENV)
    if path:
        info = {"run_dir": str(run_dir), "resume": _resume_command(run_dir)}
        Path(path).write_text(json.dumps(info))


def _remove_unstarted(run_dir: Path) -> None:
    """Remove what Hydra wrote for a job that failed before training started (its config
    folder and its log: nothing else is in the run dir), so a bad input found only once the
    data or model is built leaves nothing half-written. A dir holding anything else (a run to
    resume, a user's files) is left as it is."""
    hc = HydraConfig.get()
    ours = {name for name in (hc.output_subdir, f"{hc.job.name}.log") if name}
    if (not run_dir.is_dir() or run_dir.resolve() == Path.cwd()
            or {p.name for p in run_dir.iterdir()} - ours):
        return
    for name in ours:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    run_dir.rmdir()


def _job(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
        use_cuda = cfg.trainer.device != "cpu" and torch.cuda.is_available()
        # dist.timeout_s, once the schema has it, wins over BNBENCH_DIST_TIMEOUT_S
        D.init_from_env(cfg.dist.backend, use_cuda, OmegaConf.select(cfg, "dist.timeout_s"))
        from bnbench.train import train

        run_dir = Path(HydraConfig.get().runtime.output_dir) if D.rank() == 0 else None
        if run_dir is not None:
            _announce(run_dir)
        summary = train(cfg, run_dir)
    except BnbenchError as err:
        where = f"rank {D.rank()}/{D.world_size()}: " if D.world_size() > 1 else ""
        print(f"bnbench: error: {where}{err}", file=sys.stderr, flush=True)
        if D.launch_rank() == 0:  # (ranks > 0 of a launcher own no run dir)
            _remove_unstarted(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(2)
    except Exception as err:  # a peer died: say so in one line instead of a gloo/NCCL traceback
        message = D.peer_failure(err)  # (an interrupt pending in this process is raised here)
        if message is None:
            raise
        if message:  # (else the lowest rank still running reports it)
            print(f"bnbench: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    final = summary["final_top1"]
    return final.get("precise", final.get("ema", final.get("none")))


@hydra.main(config_path="pkg://bnbench.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one job. Returns the final PreciseBN (else EMA) top-1, for Hydra sweepers."""
    try:
        return _job(cfg)
    except KeyboardInterrupt:
        if D.rank() == 0 and not cli.under_launcher():
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            print(cli.interrupted_line(run_dir, _resume_command(run_dir)), file=sys.stderr,
                  flush=True)
        sys.exit(cli.EXIT_INTERRUPTED)
