"""Loading the user's SD1.5-architecture model and the PickScore scorer, as real users have them.

A model is named by one string (the ``model`` setting):

* ``embedded``: the built-in default (``hgdpo.models.embedded``), a diffusers folder like any other;
* a local diffusers pipeline folder (``model_index.json`` beside ``unet/``, ``vae/`` ...);
* a single-file checkpoint (``.safetensors``; community fine-tunes ship this way), whose component
  configs come from ``model_config`` (a diffusers folder or hub id; default SD1.5's);
* a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``).

Weights are read from safetensors only, unless ``allow_pickle`` is set: pickle files can run
arbitrary code when loaded. ``check_model`` / ``check_scorer`` validate a name cheaply (configs
only) so a job refuses a bad name before it starts any work.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hgdpo.errors import HgdpoError
from hgdpo.models import embedded

SD15_HUB_CONFIG = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, after resolving its name."""

    kind: Literal["folder", "file", "hub"]
    location: str  # absolute path for folder/file, the id for hub
    name: str  # what the user wrote


def resolve_model(name: str, *, allow_pickle: bool = False, what: str = "model") -> ModelSource:
    """Resolve a model name to a folder, a single file or a hub id; refuse what cannot be one."""
    if name == embedded.EMBEDDED:
        return ModelSource("folder", str(embedded.pipeline_dir()), name)
    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise HgdpoError(f"{what}: {path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            meta = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HgdpoError(f"{what}: {index} is not valid JSON: {err}") from None
        missing = [c for c in SD_COMPONENTS if not meta.get(c) or meta[c][0] is None]
        if not str(meta.get("_class_name", "")).startswith("StableDiffusion") or missing:
            raise HgdpoError(
                f"{what}: {path} is not a Stable Diffusion pipeline (class {meta.get('_class_name')!r}"
                + (f", missing {', '.join(missing)}" if missing else "") + ")")
        return ModelSource("folder", str(path.resolve()), name)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise HgdpoError(
                f"{what}: {path} is a pickle checkpoint, which can run code when loaded; convert it to "
                f".safetensors, or set allow_pickle=true if you trust it")
        if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
            raise HgdpoError(f"{what}: {path} is not a checkpoint (.safetensors expected)")
        if path.suffix == ".safetensors":
            _check_single_file(path, what)
        return ModelSource("file", str(path.resolve()), name)
    if HUB_ID.match(name) and not name.startswith((".", "~")):
        return ModelSource("hub", name, name)
    raise HgdpoError(f"{what}: {name} does not exist (expected `embedded`, a diffusers folder, "
                     f"a .safetensors file or a hub id)")


def _check_single_file(path: Path, what: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises several types for a damaged header
        raise HgdpoError(f"{what}: {path} is not a readable safetensors file: {err}") from None
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise HgdpoError(f"{what}: {path} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")


def _hub_error(what: str, name: str, err: Exception) -> HgdpoError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return HgdpoError(f"{what}: could not load {name!r} from the model hub or a local folder ({first})")


def check_model(name: str, *, model_config: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """Validate a model name without loading weights (configs only). Returns its source."""
    from diffusers import StableDiffusionPipeline

    source = resolve_model(name, allow_pickle=allow_pickle)
    config_source = model_config if source.kind == "file" else None
    if source.kind == "hub" or (source.kind == "file"):
        target = source.location if source.kind == "hub" else (config_source or SD15_HUB_CONFIG)
        if source.kind == "file" and config_source and Path(config_source).is_dir():
            resolve_model(config_source, what="model_config")
            return source
        try:
            StableDiffusionPipeline.load_config(target)
        except Exception as err:
            raise _hub_error("model_config" if source.kind == "file" else "model", target, err) from None
    return source


def load_tokenizer(name: str, *, model_config: str | None = None):
    """The model's CLIP tokenizer (cheap: used by the driver to check prompt lengths)."""
    from transformers import CLIPTokenizer

    source = resolve_model(name, allow_pickle=True)
    location = source.location if source.kind != "file" else (model_config or SD15_HUB_CONFIG)
    try:
        return CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
    except Exception as err:
        raise _hub_error("model", location, err) from None


def load_pipeline(name: str, *, model_config: str | None = None, allow_pickle: bool = False,
                  dtype=None, device: str = "cpu"):
    """Load a ``StableDiffusionPipeline`` (no safety checker) on ``device``."""
    import torch
    from diffusers import StableDiffusionPipeline

    source = resolve_model(name, allow_pickle=allow_pickle)
    dtype = dtype or torch.float32
    common = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if source.kind == "file":
            config = model_config or SD15_HUB_CONFIG
            pipe = StableDiffusionPipeline.from_single_file(source.location, config=config, **common)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                source.location, use_safetensors=None if allow_pickle else True, **common)
    except OSError as err:
        if source.kind == "folder" and "safetensors" in str(err):
            raise HgdpoError(f"model: {source.location} has no safetensors weights; convert them, "
                             f"or set allow_pickle=true if you trust its pickle files") from None
        raise _hub_error("model", source.location, err) from None
    except (ValueError, RuntimeError) as err:
        raise HgdpoError(f"model: {source.location} could not be loaded as an SD1.5 pipeline: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_error(source: ModelSource, err: Exception) -> HgdpoError:
    """What a failed component load means, in the words ``load_pipeline`` uses."""
    if isinstance(err, OSError):
        if source.kind == "folder" and "safetensors" in str(err):
            return HgdpoError(f"model: {source.location} has no safetensors weights; convert them, "
                              f"or set allow_pickle=true if you trust its pickle files")
        return _hub_error("model", source.location, err)
    return HgdpoError(f"model: {source.location} could not be loaded as an SD1.5 pipeline: {err}")


def _config_location(source: ModelSource, model_config: str | None) -> str:
    """Where the component configs are: the model itself, or for a single file ``model_config``."""
    return (model_config or SD15_HUB_CONFIG) if source.kind == "file" else source.location


def load_unet(name: str, *, model_config: str | None = None, allow_pickle: bool = False):
    """The model's UNet alone (float32, CPU): what a training worker needs, without the VAE and the
    text encoder of ``load_pipeline``."""
    from diffusers import UNet2DConditionModel

    source = resolve_model(name, allow_pickle=allow_pickle)
    try:
        if source.kind == "file":
            return UNet2DConditionModel.from_single_file(source.location, config=_config_location(source, model_config),
                                                         subfolder="unet")
        return UNet2DConditionModel.from_pretrained(source.location, subfolder="unet",
                                                    use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, RuntimeError) as err:
        raise _load_error(source, err) from None


def load_text_encoder(name: str, *, model_config: str | None = None, allow_pickle: bool = False):
    """The model's tokenizer and text encoder (float32, CPU, frozen), without its UNet and VAE."""
    from transformers import CLIPTextModel

    source = resolve_model(name, allow_pickle=allow_pickle)
    if source.kind == "file":  # transformers cannot read an original-layout checkpoint: diffusers' pipeline can
        pipe = load_pipeline(name, model_config=model_config, allow_pickle=allow_pickle)
        return pipe.tokenizer, pipe.text_encoder.requires_grad_(False).eval()
    tokenizer = load_tokenizer(name, model_config=model_config)
    try:
        encoder = CLIPTextModel.from_pretrained(source.location, subfolder="text_encoder",
                                                use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError, RuntimeError) as err:
        raise _load_error(source, err) from None
    return tokenizer, encoder.requires_grad_(False).eval()


def component_config(name: str, component: str, *, model_config: str | None = None) -> dict:
    """The ``scheduler``'s or the ``unet``'s config: configs only, cheap enough for the checks before any work."""
    import diffusers

    loader = {"scheduler": diffusers.DDPMScheduler, "unet": diffusers.UNet2DConditionModel}[component]
    source = resolve_model(name, allow_pickle=True)
    location = _config_location(source, model_config)
    try:
        return dict(loader.load_config(location, subfolder=component))
    except (OSError, ValueError) as err:  # a missing, unreachable or unreadable config
        raise _hub_error("model_config" if source.kind == "file" else "model", location, err) from None


def scheduler_config(name: str, *, model_config: str | None = None) -> dict:
    """The model's scheduler config (``component_config``)."""
    return component_config(name, "scheduler", model_config=model_config)


def _scorer_locations(model: str, processor: str | None) -> tuple[str, str]:
    """Resolve scorer model and processor names (``embedded`` allowed) to folders or hub ids."""
    locs = []
    for what, name in (("scorer_model", model), ("scorer_processor", processor or model)):
        loc = str(embedded.scorer_dir()) if name == embedded.EMBEDDED else name
        if not Path(loc).expanduser().exists() and not HUB_ID.match(loc):
            raise HgdpoError(f"{what}: {loc} does not exist (expected `embedded`, a folder or a hub id)")
        locs.append(loc)
    return locs[0], locs[1]


def load_scorer(model: str, processor: str | None = None, *, allow_pickle: bool = False,
                dtype=None, device: str = "cpu", attn_implementation: str | None = None):
    """Load PickScore as ``(processor, model)`` from hub ids or local folders (``embedded`` allowed).
    ``attn_implementation``: transformers' attention (``sdpa``, ``eager``); None: its default."""
    import torch
    from transformers import AutoProcessor, CLIPModel

    model_loc, proc_loc = _scorer_locations(model, processor)
    try:
        proc = AutoProcessor.from_pretrained(proc_loc)
    except Exception as err:
        raise _hub_error("scorer_processor", proc_loc, err) from None
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        clip = CLIPModel.from_pretrained(model_loc, dtype=dtype or torch.float32,
                                         use_safetensors=None if allow_pickle else True, **extra)
    except Exception as err:
        raise _hub_error("scorer_model", model_loc, err) from None
    return proc, clip.eval().to(device)


def check_scorer(model: str, processor: str | None = None, *, allow_pickle: bool = False) -> None:
    """Validate the scorer before any work: its processor and model config must load."""
    from transformers import AutoProcessor, CLIPConfig

    model_loc, proc_loc = _scorer_locations(model, processor)
    try:
        AutoProcessor.from_pretrained(proc_loc)
    except Exception as err:
        raise _hub_error("scorer_processor", proc_loc, err) from None
    try:
        CLIPConfig.from_pretrained(model_loc)
    except Exception as err:
        raise _hub_error("scorer_model", model_loc, err) from None
    loc = Path(model_loc)
    if loc.is_dir() and not allow_pickle and not list(loc.glob("*.safetensors")):
        raise HgdpoError(f"scorer_model: {loc} has no safetensors weights (set allow_pickle=true to load pickle files)")


def fingerprint(source: ModelSource) -> str:
    """A cheap identity of a model's weights: configs, file sizes and head/tail bytes of each file."""
    h = hashlib.sha256(f"{source.kind}:".encode())
    if source.kind == "hub":
        h.update(source.location.encode())
        return h.hexdigest()[:16]
    root = Path(source.location)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".complete")
    for p in files:
        rel = p.name if root.is_file() else str(p.relative_to(root))
        size = p.stat().st_size
        h.update(f"{rel}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 16))
            if size > 1 << 17:
                f.seek(-(1 << 16), 2)
                h.update(f.read())
    return h.hexdigest()[:16]
