"""Sweeps: the paper's ablations as Ray Tune trials."""
