"""One exception type for every user-facing error, and the value checks that raise it.

The CLI catches :class:`BnbenchError` and prints ``bnbench: error: <message>`` on one line with a
non-zero exit status; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math


class BnbenchError(Exception):
    """A bad input (config, option, data, environment) that the user can fix."""


def check_positive(name: str, value: object, *, integer: bool = False,
                   allow_none: bool = False) -> int | float | None:
    """``value`` if it is a finite number > 0 (an ``int`` with ``integer``), else a
    :class:`BnbenchError` naming ``name`` (the config key or flag)."""
    if value is None and allow_none:
        return None
    kinds = (int,) if integer else (int, float)
    ok = (not isinstance(value, bool) and isinstance(value, kinds)
          and math.isfinite(value) and value > 0)
    if not ok:
        kind = "integer" if integer else "number"
        raise BnbenchError(f"{name}={value}: must be a positive {kind}")
    return value
