"""Hydra configs of bnbench (shipped inside the wheel as the package ``bnbench.configs``)."""
