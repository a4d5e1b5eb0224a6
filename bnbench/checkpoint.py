"""Atomic checkpoints: written to a temporary file in the same folder, then renamed over."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from bnbench.errors import BnbenchError


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError as err:
        raise BnbenchError(f"checkpoint {path} does not exist") from err
    except Exception as err:  # a corrupt or foreign file: say which (torch's text is long)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise BnbenchError(f"checkpoint {path} is not a valid checkpoint (corrupt or truncated? "
                           f"{type(err).__name__}: {first})") from err


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
