"""The reward head the LAION aesthetic predictor and ImageReward share.

Both release an MLP of Linear layers at ``nn.Sequential`` indices 0, 2, 4, 6, 7 (widths 1024, 128, 64,
16, 1), Dropout at 1, 3 and 5 (training only) and no activations; its input is the width of what it
reads (the CLIP image embedding, 768 for ViT-L/14; ImageReward's CLS feature, 768 for BERT-base). The
aesthetic predictor's state dict names the modules ``layers.N.*``, ImageReward's ``mlp.layers.N.*``.
"""

from __future__ import annotations

LAYERS = (0, 2, 4, 6, 7)  # the Linear layers' indices
WIDTHS = (1024, 128, 64, 16, 1)  # their output widths
DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


def new_head(input_size: int = 768):
    """The head as an ``nn.Sequential`` (its state dict's keys: ``N.weight``, ``N.bias``)."""
    from torch import nn  # heavy: not loaded when configs are checked

    modules: list[nn.Module] = []
    width = input_size
    for index, out in zip(LAYERS, WIDTHS):
        while len(modules) < index:  # the Dropout in front of this Linear
            modules.append(nn.Dropout(DROPOUT[len(modules)]))
        modules.append(nn.Linear(width, out))
        width = out
    return nn.Sequential(*modules)


def head_shapes(input_size: int, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the head reading ``input_size``-d features, keys after ``prefix``."""
    shapes, width = {}, input_size
    for index, out in zip(LAYERS, WIDTHS):
        shapes[f"{prefix}{index}.weight"], shapes[f"{prefix}{index}.bias"] = (out, width), (out,)
        width = out
    return shapes
