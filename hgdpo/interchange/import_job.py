"""The import job: a public preference set (Pick-a-Pic v2, HPDv2, an hgdpo export) as a pool of pairs.

**Import** writes a *pool* (``hgdpo.pool.store``, format ``hgdpo-pool/2``) with N = 2 images a row
(``hgdpo.interchange.encoding``). Because it is a pool, training, ``hgdpo verify``, export and sweeps
read an import with no reader of their own, and it gets the pool's manifest, atomic parts, resume and
repair. Its ``pool.json`` has ``source``: the format, the location, and how many rows were read and
dropped, and why.

**Streamed.** A first pass (``hgdpo.interchange.selection``) reads only the small columns and checks
every row; the encoders read the images for the ``rows_per_file`` pairs of the part they make. On Ray
Data, ``EncodeParts`` actors (one per GPU: each loads the VAE once) make and write the parts, reading and
decoding the next part and writing the last one in threads while the VAE encodes;
``import_pairs(cfg, local=True)`` is the same in one process.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
from diffusers import AutoencoderKL, UNet2DConditionModel

from hgdpo.config.core import to_dict
from hgdpo.errors import HgdpoError
from hgdpo.infra import storage, tracking
from hgdpo.infra.raycluster import ensure_ray
from hgdpo.interchange.config import ImportConfig
from hgdpo.interchange.encoding import EncodeParts
from hgdpo.interchange.selection import Plan, plan
from hgdpo.interchange.sources import source_files
from hgdpo.models import loading as models
from hgdpo.pool import store as pool

PARTS_PER_CALL = 4  # parts an encoder actor makes per call


@dataclass
class ImportResult:
    output: str
    total: int
    built: int  # pairs encoded by this run
    seconds: float
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def pairs_per_second(self) -> float:
        return self.built / self.seconds if self.seconds else 0.0


def _size(location: str) -> int | None:
    fs, inner = storage.resolve(location)
    return fs.get_file_info(inner).size


def latent_size(cfg: ImportConfig, source: models.ModelSource) -> tuple[list[int], int, int]:
    """(2, C, h, w) of a pair's latents and the image width and height, from the model's configs."""
    base = source.location if source.kind != "file" else (cfg.model_config or models.SD15_HUB_CONFIG)
    try:
        unet = UNet2DConditionModel.load_config(base, subfolder="unet")
        vae = AutoencoderKL.load_config(base, subfolder="vae")
    except Exception as err:  # diffusers raises several types for a missing or unreadable config
        raise HgdpoError(f"model: cannot read the UNet/VAE configs of {base}: {str(err)[:120]}") from None
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    width, height = cfg.width or unet["sample_size"] * factor, cfg.height or unet["sample_size"] * factor
    if width % factor or height % factor:
        raise HgdpoError(f"import.width/height: {width}x{height} must be multiples of the VAE factor {factor}")
    return [2, unet["in_channels"], height // factor, width // factor], width, height


def prepare(cfg: ImportConfig, log=print) -> tuple[Plan, dict, list[str]]:
    """Every check before work: output, source (every row), model; returns the plan, the pool metadata
    and the source files."""
    storage.check_writable(cfg.output, "import.output")
    source = models.check_model(cfg.model, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle)
    files = source_files(cfg)
    planned = plan(cfg, log)
    latent_shape, width, height = latent_size(cfg, source)
    digest = hashlib.sha256(json.dumps([(storage.name(f), _size(f)) for f in files]).encode()).hexdigest()[:16]
    settings = dict(cfg.data_settings(), source=storage.name(cfg.source), images=None)
    fingerprint = dict(settings, source_digest=digest, model_fingerprint=models.fingerprint(source), width=width,
                       height=height, images_per_prompt=2, loser_rank=2, keep="all", rows_per_file=cfg.rows_per_file)
    meta = {
        "format": pool.FORMAT,
        "config": dict(to_dict(cfg), keep="all", images_per_prompt=2, loser_rank=2),
        "fingerprint": fingerprint,
        "versions": tracking.versions(),
        "num_prompts": len(planned),
        "images_per_prompt": 2,
        "latent_shape": latent_shape,
        "width": width,
        "height": height,
        "base_model": {"name": cfg.model, "fingerprint": fingerprint["model_fingerprint"]},
        "source": {"format": cfg.resolved_format(), "location": storage.absolute(cfg.source), "files": len(files),
                   "rows_read": planned.read, "pairs": len(planned), "dropped": planned.dropped},
    }
    return planned, meta, files


OUR_ERROR = re.compile(r"hgdpo\.errors\.(?:HgdpoError|ConfigError): (.+)")


def _our_error(err: BaseException) -> HgdpoError | None:
    """The ``HgdpoError`` a Ray actor raised, from the exception Ray Data hands back: its chain of causes, or,
    where Ray kept only the remote traceback's text (a failed map UDF), its last line."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, HgdpoError):
            return err
        found = OUR_ERROR.findall(str(err))
        if found:
            return HgdpoError(found[-1].strip())
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _ray_parts(cfg: ImportConfig, chunks: list[dict], payload: dict) -> Iterator[dict]:
    import ray  # late: Ray reads its logging settings (hgdpo.infra.quiet) when imported

    ensure_ray()
    # A call makes up to PARTS_PER_CALL parts (its reading and writing overlap its encoding), fewer when there is
    # not enough work for every actor; a lost actor redoes at most those parts (rewritten whole, the same bytes).
    per_call = max(1, min(PARTS_PER_CALL, math.ceil(len(chunks) / cfg.encoder_actors)))
    ds = ray.data.from_items([{"chunk": json.dumps(c)} for c in chunks],
                             override_num_blocks=math.ceil(len(chunks) / per_call))
    ds = ds.map_batches(EncodeParts, fn_constructor_kwargs={"payload": payload}, batch_size=per_call,
                        compute=ray.data.ActorPoolStrategy(size=min(cfg.encoder_actors, len(chunks))),
                        num_gpus=cfg.encoder_gpus, num_cpus=cfg.encoder_cpus, batch_format="numpy")
    try:
        yield from ds.iter_rows()
    except Exception as err:  # an error of ours inside an actor comes back wrapped by Ray
        ours = _our_error(err)
        if ours is None:
            raise
        raise HgdpoError(str(ours)) from None


def _indexes(output: str, parts: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The pool indexes of each part that can be read (its ``prompt_index`` column alone), and why the others
    cannot."""
    found: dict[str, np.ndarray] = {}
    unreadable: dict[str, str] = {}
    for name in parts:
        try:
            found[name] = storage.read_parquet(storage.join(output, name), columns=["prompt_index"]) \
                .column("prompt_index").to_numpy()
        except (OSError, ValueError, pa.ArrowException) as err:
            unreadable[name] = f"cannot be read ({str(err).strip().splitlines()[0] if str(err).strip() else err})"
    return found, unreadable


def _covered(output: str, found: dict[str, np.ndarray], total: int) -> np.ndarray:
    """Which of the ``total`` pairs have a row; refuses a pair in two parts, or an index beyond the plan."""
    done = np.zeros(total, bool)
    for name, indexes in found.items():
        if len(indexes) and (indexes.max() >= total or done[indexes].any()):
            raise HgdpoError(f"{output}/{name}: holds pairs of another part or of no pair of this import; the pool is "
                             f"corrupt: delete {output} and import again")
        done[indexes] = True
    return done


def import_pairs(cfg: ImportConfig, log=print, local: bool = False) -> ImportResult:
    """Import (or finish, or repair) the preference set ``cfg`` describes as a pool of pairs. ``local``: in
    this process, without Ray."""
    planned, meta, files = prepare(cfg, log)
    output = storage.absolute(cfg.output)
    st = pool.state(output)
    if st.meta is not None:
        old, new = st.meta.get("fingerprint", {}), meta["fingerprint"]
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff or "source" not in st.meta:
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff[:4]) or "not an import"
            raise HgdpoError(f"import.output: {output} holds a pool written with another config ({detail}); choose "
                             f"another output or rerun with that config")
    bad: dict[str, str] = {}
    if st.complete is not None:
        bad = pool.bad_parts(output, st)
        if not bad:
            log(f"import: {output} is already complete ({st.complete['rows']} pairs); nothing to do")
            return ImportResult(output, len(planned), 0, 0.0, skipped=True)
        pool.unmark_complete(output)  # first: the pool never looks complete without its bad parts
    storage.probe_write(output, "import.output")
    if st.meta is None:
        pool.init(output, meta)
    elif pool.remove_temporaries(output):
        log("import: removed half-written files left by an interrupted run")
    found, unreadable = _indexes(output, [n for n in st.parts if n not in bad])
    for name, why in {**bad, **unreadable}.items():
        log(f"import: part {name} {why}: deleted, its pairs are encoded again")
        storage.delete(storage.join(output, name))
    done = _covered(output, found, len(planned))
    files_entries = {n: e for n, e in (st.complete or {}).get("files", {}).items() if n in found}
    chunks = [planned.chunk(i, min(i + cfg.rows_per_file, len(planned)))
              for i in range(0, len(planned), cfg.rows_per_file)]
    pending = [c for c in chunks if not done[c["index"]: c["index"] + len(c["row"])].all()]
    todo = sum(len(c["row"]) for c in pending)
    log(f"import: {len(planned)} pairs in {len(chunks)} parts, {len(chunks) - len(pending)} parts already "
        f"written, {len(pending)} to encode -> {output}")
    payload = {"config": dict(to_dict(cfg), output=output), "files": files, "output": output,
               "latent_shape": meta["latent_shape"], "width": meta["width"], "height": meta["height"]}
    result = ImportResult(output, len(planned), 0, 0.0)
    maker = EncodeParts(payload, actor=False) if local and pending else None
    start = shown = time.perf_counter()  # the local VAE is loaded before, a Ray actor's VAE after: as it is seen
    if pending:
        if local:
            entries = maker.make_all(pending)
        else:
            entries = _ray_parts(cfg, pending, payload)
        for entry in entries:
            files_entries[str(entry["name"])] = {"rows": int(entry["rows"]), "bytes": int(entry["bytes"]),
                                                 "sha256": str(entry["sha256"])}
            result.built += int(entry["rows"])
            now = time.perf_counter()
            if now - shown > 5 or result.built == todo:
                shown = now
                log(f"import: {result.built}/{todo} pairs encoded, {result.built / (now - start):.1f} pairs/s")
        if local:
            result.timings = dict(maker.seconds)
    result.seconds = time.perf_counter() - start
    st = pool.state(output)
    found, unreadable = _indexes(output, st.parts)
    done = _covered(output, found, len(planned))
    if unreadable or not done.all():
        raise HgdpoError(f"import: {int((~done).sum())} pairs have no row after the run (first: pair "
                         f"{int(np.argmin(done))}); rerun to finish")
    pool.mark_complete(output, st.parts, len(planned), files_entries)
    log(f"import: complete, {len(planned)} pairs in {len(st.parts)} parts at {output}")
    return result

