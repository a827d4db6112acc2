"""A synthetic "miniature world" (coloured shapes with captions) and a programmatic judge.

Lets HG-DPO's claims be tested on a CPU with tiny diffusion models: ``scene`` defines scenes,
captions and their parsing, ``render`` draws them, ``judge`` plays the human rater (scores any
image against any caption), ``prompts`` makes disjoint train/test prompt sets and hard negatives.
"""
