"""Sampling images of prompts from a model, with an HG-DPO adapter at weight alpha and optionally LAN
(``hgdpo sample`` / ``jobs/sample.py``).

Image k of prompt p is ``<output>/<prompt id>_<k>.png``, from the seed derived from (seed, prompt id, k)
as in the pool, so two runs that differ only in adapter, alpha or lan compare image for image.
``samples.json`` (config, versions, files with prompt and seed) is written last: a folder without it is
unfinished. Rerunning a finished output with the same settings does nothing.
"""

from __future__ import annotations

import re

from PIL import Image

from hgdpo.config.core import to_dict
from hgdpo.errors import HgdpoError
from hgdpo.evaluate.sample_config import SampleConfig
from hgdpo.infra import storage, tracking
from hgdpo.models import lan
from hgdpo.models import loading as models
from hgdpo.models.sampling import image_seeds, native_size, resolve_device_dtype, set_sampler
from hgdpo.prompts import read_prompts

MANIFEST = "samples.json"


def file_stems(prompts) -> list[str]:
    """A file-name-safe stem per prompt id; ids that collide once made safe are refused."""
    stems, seen = [], {}
    for p in prompts:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", p.id).lstrip(".") or "_"
        if stem in seen:
            raise HgdpoError(f"prompts: ids {seen[stem]!r} and {p.id!r} give the same file name {stem!r}")
        seen[stem] = p.id
        stems.append(stem)
    return stems


def run(cfg: SampleConfig) -> dict | None:
    """Sample every prompt; return the manifest, or None when ``cfg.output`` is already finished."""
    output = cfg.output
    storage.check_writable(output, "sample.output")
    if storage.is_file(storage.join(output, MANIFEST)):
        done = storage.read_json(storage.join(output, MANIFEST), "samples manifest")
        if isinstance(done, dict) and done.get("config") == to_dict(cfg):
            return None
        raise HgdpoError(f"output: {output} holds samples made with other settings; use another output")
    # Every check before any work: prompts, model, adapter.
    prompts = read_prompts(cfg.prompts, **cfg.prompt_settings())
    stems = file_stems(prompts)
    source = models.check_model(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    adapter_info = (lan.check_adapter(cfg.adapter, cfg.model, allow_pickle=cfg.allow_pickle)
                    if cfg.adapter is not None else None)

    storage.probe_write(output, "sample.output")
    device, dtype = resolve_device_dtype(cfg.dtype)
    pipe = models.load_pipeline(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle,
                                dtype=dtype, device=device)
    if cfg.adapter is not None:
        lan.load_adapter(pipe, cfg.adapter, cfg.model, allow_pickle=cfg.allow_pickle)
    set_sampler(pipe, cfg.sampler)
    native_w, native_h = native_size(pipe)
    width, height = cfg.width or native_w, cfg.height or native_h

    files = []
    for prompt, stem in zip(prompts, stems):
        seeds = image_seeds(cfg.seed, prompt.id, cfg.images_per_prompt)
        _, images = lan.sample(pipe, prompt.text, seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                               width=width, height=height, negative_prompt=cfg.negative_prompt,
                               alpha=cfg.adapter_weight(), lan=cfg.lan)
        for k, (seed, image) in enumerate(zip(seeds, images)):
            name = f"{stem}_{k}.png"
            storage.write_png(storage.join(output, name), Image.fromarray(image))
            files.append({"file": name, "prompt_id": prompt.id, "prompt": prompt.text, "k": k, "seed": seed})

    manifest = {
        "config": to_dict(cfg), "versions": tracking.versions(), "width": width, "height": height,
        "base_model": {"name": cfg.model, "fingerprint": models.fingerprint(source)},
        "adapter": None if adapter_info is None else {
            "path": storage.absolute(cfg.adapter), "fingerprint": adapter_info.get("fingerprint"),
            "alpha": cfg.alpha, "lan": cfg.lan},
        "files": files,
    }
    storage.write_json(storage.join(output, MANIFEST), manifest)  # last: a folder with it is finished
    return manifest
