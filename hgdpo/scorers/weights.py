"""Scorers' weights files: safetensors, or pickle (``torch.load(weights_only=True)``) with the user's
opt-in, since a pickle file can run code when loaded; their tensors' shapes, read without the weights."""

from __future__ import annotations

import pickle
from pathlib import Path

from safetensors import safe_open

from hgdpo.models.loading import PICKLE_SUFFIXES
from hgdpo.scorers.base import ScorerError


def weights_file(scorer: str, field: str, name: str, allow_pickle: bool) -> Path:
    """A weights file: it exists, and it is safetensors, or pickle with the user's opt-in."""
    path = Path(name).expanduser()
    if not path.exists():
        raise ScorerError(scorer, field, f"{path} does not exist")
    if not path.is_file():
        raise ScorerError(scorer, field, f"{path} is a folder; a weights file is expected")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ScorerError(scorer, field, f"{path} is a pickle file, which can run code when loaded; convert it "
                                             f"to .safetensors, or set allow_pickle=true if you trust it")
    elif path.suffix != ".safetensors":
        raise ScorerError(scorer, field, f"{path} is not a weights file (.safetensors; {', '.join(PICKLE_SUFFIXES)} "
                                         f"with allow_pickle=true)")
    return path


def _unwrap(obj, scorer: str, field: str, path: Path) -> dict:
    """The state dict inside a checkpoint (``{"state_dict": ...}`` as HPSv2 ships, or bare), without
    the ``module.`` prefix that DataParallel training leaves."""
    import torch  # heavy: not loaded when configs are checked

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ScorerError(scorer, field, f"{path} holds no state dict of tensors (got {type(obj).__name__} with "
                                         f"keys {list(obj)[:4] if isinstance(obj, dict) else []})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _torch_load(path: Path, scorer: str, field: str, *, mmap: bool) -> dict:
    import torch  # heavy: not loaded when configs are checked

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # a pre-zip (legacy) torch file cannot be mapped
            return _torch_load(path, scorer, field, mmap=False)
        raise ScorerError(scorer, field, f"{path} is not a readable torch checkpoint ({err})") from None
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ScorerError(scorer, field, f"{path} holds Python objects besides tensors, which are not loaded even "
                                         f"with allow_pickle ({first}); save its state_dict as .safetensors") from None
    except (EOFError, OSError, ValueError) as err:
        raise ScorerError(scorer, field, f"{path} is not a readable torch checkpoint ({err})") from None
    return _unwrap(obj, scorer, field, path)


def tensor_shapes(path: Path, scorer: str = "?", field: str = "model") -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a weights file, read without loading the weights
    (safetensors header; a pickle checkpoint memory-mapped)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # safetensors raises several types for a damaged header
            raise ScorerError(scorer, field, f"{path} is not a readable safetensors file: {err}") from None
    return {k: tuple(v.shape) for k, v in _torch_load(path, scorer, field, mmap=True).items()}


def read_state_dict(path: Path, scorer: str = "?", field: str = "model") -> dict:
    """All tensors of a weights file (safetensors, or pickle through ``torch.load(weights_only=True)``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # imports torch: heavy, as above

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise ScorerError(scorer, field, f"{path} is not a readable safetensors file: {err}") from None
        return _unwrap(state, scorer, field, path)
    return _torch_load(path, scorer, field, mmap=False)
