"""bnbench: reproduce and vary the experiments of "Rethinking 'Batch' in BatchNorm" and
"Cross-Iteration Batch Normalization"."""

__version__ = "0.1.0"
