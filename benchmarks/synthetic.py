"""Inputs the benchmarks share: a tiny model of SD1.5's architecture, and pools written directly.

Both have the real shapes (latents 4 x 128 x 88 for 704x1024 images, N = 20) at a fraction of the
compute, so what a run holds, sends and writes can be measured on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SD15_704x1024 = {"images_per_prompt": 20, "width": 704, "height": 1024}


def tiny_sd15(dst: Path) -> Path:
    """The embedded pipeline's text encoder with a UNet and VAE shaped like SD1.5's, tiny in width: four
    UNet levels, a VAE of scale factor 8 with its mid-block attention, so latents and images have the
    real shapes. The UNet attends to the text at its third level only: at 704x1024 SD1.5's first level
    attends over 11264 positions, which takes minutes per prompt on a CPU (a GPU's fused kernels are
    built for it) and changes neither the bytes nor the memory measured here."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from hgdpo.models import embedded

    if (dst / "model_index.json").exists():
        return dst
    unet = UNet2DConditionModel(
        sample_size=64, layers_per_block=2, block_out_channels=(8, 8, 16, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=embedded.TEXT_HIDDEN, attention_head_dim=2)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4, sample_size=512)
    text = CLIPTextModel.from_pretrained(embedded.pipeline_dir() / "text_encoder")
    embedded.save_pipeline(dst, text, vae, unet)
    return dst


def write_pool(dst: Path, prompts_file: Path, model: Path, rows: int, rows_per_file: int = 64, seed: int = 0,
               format_1: bool = False) -> Path:
    """A complete pool of ``rows`` prompts at the paper's shapes, written with the pool library (no
    generation): standard-normal float16 latents for all N images, random scores, tiny PNGs (training
    never reads the images). Its metadata is the pool job's own (``pool_builder.prepare``), so training
    accepts it for ``model``. Kept and reused when it is already complete. ``format_1``: in the earlier
    format (``hgdpo-pool/1``: one ``latents`` column, one row group a part), for a baseline revision
    that reads only that."""
    from hgdpo.pool import store as pool
    from hgdpo.pool.build import prepare
    from hgdpo.pool.config import PoolConfig
    from hgdpo.pool.part_file import write_part_file

    if (dst / pool.COMPLETE).exists():
        return dst
    cfg = PoolConfig(prompts=str(prompts_file), output=str(dst), model=str(model), max_prompts=rows,
                     rows_per_file=rows_per_file, **SD15_704x1024)
    items, meta = prepare(cfg, log=lambda *_: None, mlflow=False)
    pool.init(str(dst), meta | ({"format": "hgdpo-pool/1"} if format_1 else {}))
    shape, n = tuple(meta["latent_shape"]), cfg.images_per_prompt
    rng = np.random.default_rng(seed)
    png = pool.png_bytes(np.zeros((8, 8, 3), np.uint8))
    names, files = [], {}
    for start in range(0, len(items), rows_per_file):
        chunk = items[start: start + rows_per_file]
        scores = rng.normal(20.0, 1.0, (len(chunk), n)).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable").astype(np.int32)
        table = pool.to_table({
            "prompt_id": [p.id for p in chunk], "prompt_index": [p.index for p in chunk],
            "prompt": [p.text for p in chunk], "seeds": rng.integers(0, 2**31, (len(chunk), n)),
            "scores": scores, "rank": order, "winner": order[:, 0], "loser": order[:, -1],
            "latent_index": np.tile(np.arange(n, dtype=np.int32), (len(chunk), 1)),
            "latents": rng.standard_normal((len(chunk), *shape), dtype=np.float32).astype(np.float16),
            "image_w": [png] * len(chunk), "image_l": [png] * len(chunk)}, shape)
        name, entry = _write_format_1(dst, table) if format_1 else write_part_file(str(dst), table)
        names.append(name)
        files[name] = entry
    pool.mark_complete(str(dst), sorted(names), len(items), files)
    return dst


def _write_format_1(dst: Path, table) -> tuple[str, dict]:
    """A part as ``hgdpo-pool/1`` wrote it: all K latents of a row in one ``latents`` column."""
    from hgdpo.infra import storage
    from hgdpo.pool import store as pool
    from hgdpo.pool.part_file import part_name

    latents = pool.latents_of(table)
    column = pool.tensor_array(latents, pool.latents_type(latents.shape[1:]))
    table = pool.without_latents(table).append_column("latents", column)
    name = part_name(table.column("prompt_id").to_pylist(), table.column("prompt_index").to_pylist())
    size, sha256 = storage.write_parquet(storage.join(str(dst), name), table, compression="zstd")
    return name, {"rows": table.num_rows, "bytes": size, "sha256": sha256}
