"""The Hydra task of ``bnbench train``: config → (process group) → :func:`bnbench.train.train`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bnbench import distributed as D
from bnbench.config import register, validate
from bnbench.errors import BnbenchError

register()


@hydra.main(config_path="pkg://bnbench.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one job. Returns the final PreciseBN (else EMA) top-1, for Hydra sweepers."""
    try:
        validate(cfg)
        D.init_from_env(cfg.dist.backend, cfg.trainer.device != "cpu" and torch.cuda.is_available())
        from bnbench.train import train

        run_dir = Path(HydraConfig.get().runtime.output_dir) if D.rank() == 0 else None
        summary = train(cfg, run_dir)
    except BnbenchError as err:
        where = f"rank {D.rank()}/{D.world_size()}: " if D.world_size() > 1 else ""
        print(f"bnbench: error: {where}{err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as err:  # a peer died: say so in one line instead of a gloo/NCCL traceback
        message = D.peer_failure(err)
        if message is None:
            raise
        print(f"bnbench: error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    final = summary["final_top1"]
    return final.get("precise", final.get("ema", final.get("none")))
