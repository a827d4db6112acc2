"""Images to latents for an import: decoding, fitting, the VAE, and the workers that make a pool's parts.

**Images** are decoded, converted to RGB, scaled (bicubic) so that they cover the target size (the
model's native size, or ``width`` x ``height``) and centre-cropped to it, as diffusers' Diffusion-DPO
example does (``Resize`` of the shorter side, then ``CenterCrop``); then the VAE encodes them once,
``encode_batch`` at a time, and the latent is the posterior's mean times the VAE's scaling factor
(the mean, not a sample: deterministic, so a resumed import equals an uninterrupted one). A JPEG is
decoded at 1/2, 1/4 or 1/8 of its size when that still covers the target (PIL's draft mode).

An undecodable image is refused rather than skipped (a silently smaller set would change what a sweep's
dataset size means); the message names the row and the setting that leaves it out (``exclude_rows``).

A part's rows are a pool's (``hgdpo.pool.store``) with N = 2: ``latent_00`` the winner, ``latent_01`` the
loser, scores ``[1, 0]``, the source's own image bytes as ``image_w`` / ``image_l``, and after the pool's
columns ``EXTRA_COLUMNS``: ``source_row``, ``source_id``, ``model_w`` / ``model_l``.
"""

from __future__ import annotations

import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from diffusers import AutoencoderKL
from PIL import Image

from hgdpo.config.core import from_dict
from hgdpo.errors import HgdpoError
from hgdpo.infra.quiet import quiet_libraries
from hgdpo.infra.raycluster import TorchThread
from hgdpo.interchange.config import ImportConfig
from hgdpo.interchange.sources import fetch_hpd, fetch_pickapic
from hgdpo.models import loading as models
from hgdpo.models.sampling import resolve_device_dtype, set_threads
from hgdpo.pool import store as pool
from hgdpo.pool.part_file import write_part_file

EXTRA_COLUMNS = pa.schema([("source_row", pa.int64()), ("source_id", pa.string()), ("model_w", pa.string()),
                           ("model_l", pa.string())])


def fit(image, width: int, height: int) -> np.ndarray:
    """An image as (height, width, 3) uint8: RGB, scaled (bicubic) to cover the size, centre-cropped."""
    image = image.convert("RGB")
    if image.size != (width, height):
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return np.asarray(image)


def decode_image(data: Any, where: str, row: int, width: int, height: int) -> np.ndarray:
    """Image bytes -> ``fit`` pixels; an undecodable image is refused naming the row and the way to skip it."""
    try:
        if isinstance(data, dict):  # a Hugging Face Image feature: {"bytes": ..., "path": ...}
            data = data.get("bytes")
        image = Image.open(io.BytesIO(data))
        scale = max(width / image.width, height / image.height)
        # A JPEG decodes at 1/2, 1/4 or 1/8 of its size when that still covers the target (DCT scaling):
        # a 512 px source for a 64 px model decodes 8x smaller, several times faster.
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
        return fit(image, width, height)
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as err:
        raise HgdpoError(f"{where}: the image cannot be decoded ({type(err).__name__}: {str(err)[:80]}); fix the "
                         f"source, or leave the row out with exclude_rows=[{row}]") from None


def load_vae(cfg: ImportConfig, dtype, device: str):
    """The model's VAE alone (a single-file checkpoint: through its pipeline)."""
    source = models.resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    if source.kind == "file":
        vae = models.load_pipeline(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle).vae
    else:
        try:
            vae = AutoencoderKL.from_pretrained(source.location, subfolder="vae",
                                                use_safetensors=None if cfg.allow_pickle else True)
        except (OSError, ValueError, RuntimeError) as err:
            raise HgdpoError(f"model: the VAE of {source.location} could not be loaded ({str(err)[:120]})") from None
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def encode(vae, pixels: np.ndarray, batch: int) -> np.ndarray:
    """uint8 images (n, H, W, 3) -> latents (n, C, h, w) float16 in the UNet's scaled space: the posterior's
    mean, shifted and scaled as the VAE's config says, ``batch`` images per call."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[start: start + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
            mean = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
            out.append(((mean.float() - shift) * scale).to(torch.float16).cpu().numpy())
    return np.concatenate(out)



class EncodeParts:
    """Makes and writes the imported pool's parts: loads the VAE once, then per part its pairs' images
    (read from the source), decoded, fitted and encoded, and the part written. A Ray Data actor
    (``__call__`` on batches of parts, as JSON) and the plain loop's worker (``make_all``).

    The VAE never waits for the rest: a thread reads and decodes the next part while the VAE encodes the
    current one, and another writes the previous one (PIL's decoders, pyarrow's writer and torch's kernels
    release the GIL), so a part costs about the longer of its encode and its decode + write."""

    def __init__(self, payload: dict, actor: bool = True):
        self.torch_thread = TorchThread("import-encode") if actor else None  # see TorchThread
        if self.torch_thread is not None:
            self.torch_thread.run(self._load, payload, actor)
        else:
            self._load(payload, actor)

    def _load(self, payload: dict, actor: bool) -> None:
        self.cfg = cfg = from_dict(ImportConfig, payload["config"])
        quiet_libraries()
        if actor:
            set_threads(cfg.encoder_cpus)
        device, dtype = resolve_device_dtype(cfg.dtype)
        self.vae = load_vae(cfg, dtype, device)
        self.files, self.output = payload["files"], payload["output"]
        self.latent_shape = tuple(payload["latent_shape"])
        self.width, self.height = payload["width"], payload["height"]
        self.seconds = {"read": 0.0, "decode": 0.0, "encode": 0.0, "write": 0.0}

    def load(self, chunk: dict) -> tuple[list[dict], np.ndarray]:
        """The pairs of ``chunk`` (``Plan.chunk``) and their images as (2m, H, W, 3) uint8: w, l, w, l, ..."""
        t0 = time.perf_counter()
        if self.cfg.resolved_format() == "pickapic":
            pairs = fetch_pickapic(self.cfg, self.files, chunk)
        else:
            pairs = fetch_hpd(self.cfg, self.files[0], chunk)
        t1 = time.perf_counter()
        pixels = np.stack([decode_image(p[side], p["where"], p["row"], self.width, self.height)
                           for p in pairs for side in ("w", "l")])
        self.seconds["read"] += t1 - t0
        self.seconds["decode"] += time.perf_counter() - t1
        return pairs, pixels

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(2m, H, W, 3) images -> (m, 2, C, h, w) float16 latents."""
        t0 = time.perf_counter()
        latents = encode(self.vae, pixels, self.cfg.encode_batch)
        self.seconds["encode"] += time.perf_counter() - t0
        return latents.reshape(len(pixels) // 2, 2, *self.latent_shape[1:])

    def write(self, pairs: list[dict], latents: np.ndarray) -> dict:
        """Write one part; returns its manifest entry (``name``, ``rows``, ``bytes``, ``sha256``)."""
        t0 = time.perf_counter()
        name, entry = write_part_file(self.output, part_table(pairs, latents, self.latent_shape))
        self.seconds["write"] += time.perf_counter() - t0
        return {"name": name, **entry}

    def make_all(self, chunks: list[dict]) -> Iterator[dict]:
        """Write the parts of ``chunks``, in order, yielding each part's manifest entry once it is written."""
        if not chunks:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="import-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="import-write") as writer:
            loading = reader.submit(self.load, chunks[0])
            writing = None
            for k in range(len(chunks)):
                pairs, pixels = loading.result()
                if k + 1 < len(chunks):
                    loading = reader.submit(self.load, chunks[k + 1])
                latents = self.encode(pixels)
                if writing is not None:
                    yield writing.result()
                writing = writer.submit(self.write, pairs, latents)
            yield writing.result()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks = [json.loads(str(chunk)) for chunk in batch["chunk"]]
        if self.torch_thread is None:
            entries = list(self.make_all(chunks))
        else:
            entries = self.torch_thread.run(lambda: list(self.make_all(chunks)))
        return {key: np.asarray([e[key] for e in entries]) for key in ("name", "rows", "bytes", "sha256")}


def part_table(pairs: list[dict], latents: np.ndarray, latent_shape: tuple[int, ...]) -> pa.Table:
    """The pool rows of ``pairs`` (winner first), with the source's columns after the pool's."""
    def raw(data):
        return data.get("bytes") if isinstance(data, dict) else data

    m = len(pairs)
    rows = {"prompt_id": [p["id"] for p in pairs], "prompt_index": [p["index"] for p in pairs],
            "prompt": [p["caption"] for p in pairs], "seeds": [[0, 0]] * m, "scores": [[1.0, 0.0]] * m,
            "rank": [[0, 1]] * m, "winner": [0] * m, "loser": [1] * m, "latent_index": [[0, 1]] * m,
            "latents": latents, "image_w": [raw(p["w"]) for p in pairs], "image_l": [raw(p["l"]) for p in pairs]}
    table = pool.to_table(rows, latent_shape)
    extra = {"source_row": [p["row"] for p in pairs], "source_id": [p["id"] for p in pairs],
             "model_w": [p["model_w"] for p in pairs], "model_l": [p["model_l"] for p in pairs]}
    for f in EXTRA_COLUMNS:
        table = table.append_column(f, pa.array(extra[f.name], type=f.type))
    return table

