"""Run outputs: ``metrics.jsonl`` (one JSON object per event), TensorBoard, ``summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STATS_KINDS = ("ema", "precise", "batch", "none")


class RunLog:
    """Writes events of rank 0; other ranks get ``RunLog(None)``, which writes nothing. Files are
    opened at the first write, after a resumed run has :meth:`rewind`-ed them."""

    def __init__(self, run_dir: Path | None, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.tensorboard = tensorboard
        self._metrics = None
        self._tb = None
        self._purge_step: int | None = None

    def rewind(self, epoch: int, iteration: int) -> int:
        """Forget what a killed run logged after its checkpoint (epoch ``epoch``, iteration
        ``iteration``; 0, 0 without one): ``metrics.jsonl`` keeps the rows of epochs ≤
        ``epoch`` (rewritten atomically), TensorBoard purges steps after ``iteration``. Then
        the resumed run's files equal an uninterrupted run's. Returns the rows dropped."""
        if self.run_dir is None:
            return 0
        path = self.run_dir / "metrics.jsonl"
        rows = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        kept = [row for row in rows if _complete_row(row, epoch)]
        if len(kept) != len(rows):
            write_text(path, "".join(f"{row}\n" for row in kept))
        self._purge_step = iteration + 1
        return len(rows) - len(kept)

    def _open(self) -> None:
        if self._metrics is not None or self.run_dir is None:
            return
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._purge_step)
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
        self._open()
        if self._metrics is None:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in fields.items()
        }
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._open()
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically (a temporary file beside it, then renamed over it), so that a
    reader never sees half of it; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, data: dict[str, Any], *, allow_nan: bool = True) -> Path:
    """Write JSON atomically (:func:`write_text`); ``allow_nan=False`` refuses NaN (not JSON)."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=allow_nan)
                      + "\n")


def _complete_row(row: str, epoch: int) -> bool:
    """A ``metrics.jsonl`` line that a checkpoint at ``epoch`` covers (a torn last line is not)."""
    try:
        return json.loads(row)["epoch"] <= epoch
    except (ValueError, KeyError, TypeError):
        return False
