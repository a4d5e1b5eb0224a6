"""Run outputs: ``metrics.jsonl`` (one JSON object per event), TensorBoard, ``summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STATS_KINDS = ("ema", "precise", "batch", "none")


class RunLog:
    """Writes events of rank 0; other ranks get ``RunLog(None)``, which writes nothing."""

    def __init__(self, run_dir: Path | None, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self._metrics = None
        self._tb = None
        if run_dir is None:
            return
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
            self._tb.add_custom_scalars(
                {
                    "val": {
                        "top1: EMA vs PreciseBN": [
                            "Multiline",
                            ["val/top1_ema", "val/top1_precise", "val/top1_batch", "val/top1_none"],
                        ],
                        "loss: EMA vs PreciseBN": [
                            "Multiline",
                            ["val/loss_ema", "val/loss_precise"],
                        ],
                    }
                }
            )

    def event(self, **fields: Any) -> None:
        if self._metrics is None:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in fields.items()
        }
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
