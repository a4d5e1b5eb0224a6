"""One CPU thread per test process and per process a test starts.

pytest-xdist runs three workers on CI's two cores, and torch starts one OpenMP thread per core in
every process: six spinning threads on two cores slow every worker several-fold (the device check
took 95 s that way and 6 s with one thread on a loaded machine). Set before torch is imported;
subprocesses inherit it. A value already in the environment wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
