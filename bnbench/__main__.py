"""``python -m bnbench`` (what torchrun runs: ``torchrun -m bnbench train ...``)."""

from bnbench.cli import entry

entry()
