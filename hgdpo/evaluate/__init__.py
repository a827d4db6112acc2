"""Evaluation: model A against baseline B on test prompts, and sampling a model's images."""
