"""Training on Ray Train: the trainer, its config, the pairs it reads from a pool."""
