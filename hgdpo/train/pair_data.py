"""The pair dataset: a pool's selected pairs, written once on the run's storage, read record by record.

Training reads a pool through a *selection* (``hgdpo.train.pairs``: pool size n, loser rank l, dataset
size D). ``ensure`` writes, once per selection, a dataset holding for each of the D prompts the
winner's and the loser's latents and the prompt's text-encoder hidden states: the text encoder is
frozen, so it runs once per prompt here instead of at every step in every worker, and the workers
load neither it nor the pool. The dataset is written beside the run's output
(``TrainConfig.pairs_root``: by default the output's parent folder, where a rerun and the runs next
to it look) as ``pairs-<key>``, the key a digest of what determines its content: the pool
(fingerprint and manifest), the base model, n, l and D. Records are addressed by prompt index and
the data order (seed, data shards, workers) is applied when they are read, so runs that differ only
there share one dataset.

Layout (a local folder or a URI; every file written atomically through ``hgdpo.infra.storage``):

* ``records-<part>.bin``, one per pool part holding selected prompts: fixed-size records, one per
  selected row in the part's row order: winner latents (C, h, w), loser latents (C, h, w), hidden
  states (L, D), little-endian float16. The pool's latents are float16 already; the hidden states
  are the encoder's float32 output rounded to float16 (relative error at most 2^-11), half the bytes;
* ``records-<part>.parquet``: that part's rows (``index`` = prompt index, ``prompt_id``, ``prompt``,
  ``winner``/``loser`` seed positions and their scores, the record's ``offset``), written after the
  records, so its presence marks them whole: a selection that died resumes from the parts it did;
* ``index.parquet``: the D rows of all parts in prompt order, each with its record ``file``;
* ``pairs.json``, written last: the completion marker (key, settings, shapes, record size, every
  record file's size). A folder without it is not a dataset yet, whatever else it holds.

Selection streams: Ray tasks (``select_part`` inside), each loading the text encoder once, read
their pool parts a row group at a time, first the small columns (``prompt_index``, ``scores``,
``latent_index``), then, for a row group holding some of the first D prompts, only the latent
columns holding some kept row's winner or loser (``pool.read_latents``): a selection among the first
n < N images reads at most n of the N columns; the PNG columns are never read.

Workers read the records with random access (``hgdpo.train.pair_records``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from hgdpo.config.core import from_dict, to_dict
from hgdpo.errors import HgdpoError
from hgdpo.infra import storage
from hgdpo.infra.quiet import quiet_libraries
from hgdpo.models import loading as models
from hgdpo.objectives.registry import by_selection
from hgdpo.pool import store as pool
from hgdpo.pool.ospo import encode_nouns, noun_tokens
from hgdpo.train.config import TrainConfig
from hgdpo.train.pair_records import FORMAT, INDEX, MANIFEST, Layout
from hgdpo.train.pairs import PairPlan

PREFIX = "pairs-"
SMALL_COLUMNS = ["prompt_index", "prompt_id", "prompt", "scores", "latent_index"]
HIDDEN_SHAPE_KEY = b"hidden_shape"  # parquet metadata of a part's rows file


# ---------------------------------------------------------------------------------------------
# Where a selection's dataset lives


def key(meta: dict, manifest: dict, model_fingerprint: str, plan_: PairPlan) -> str:
    """What determines a dataset's content: the pool (its fingerprint, and its manifest, which changes
    when a part is rebuilt), the base model (its text encoder) and the selection (n, l, D)."""
    data = {"format": FORMAT, "pool_fingerprint": meta["fingerprint"], "pool_manifest": manifest,
            "model_fingerprint": model_fingerprint, "pool_size": plan_.pool_size, "loser_rank": plan_.loser_rank,
            "dataset_size": plan_.dataset_size}
    if plan_.selection != "rank":
        data.update(selection=plan_.selection, margin=plan_.margin)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def location(root: str, key_: str) -> str:
    return storage.join(root, f"{PREFIX}{key_}")


def _sizes(location_: str) -> dict[str, int]:
    """Sizes of the files directly in a folder (one listing; temporaries left out)."""
    fs, root = storage.resolve(location_)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return {posixpath.basename(i.path): i.size for i in infos if i.type == pafs.FileType.File
            and not posixpath.basename(i.path).startswith(storage.TMP_PREFIX)}


def read_manifest(location_: str, key_: str) -> dict | None:
    """The dataset's manifest when the dataset is complete and whole, else None (it is then written).

    A manifest of another key (a digest collision, or a folder written by hand) or a record file of
    another size than recorded (a failed copy) is refused, naming the file."""
    path = storage.join(location_, MANIFEST)
    if not storage.is_file(path):
        return None
    found = storage.read_json(path, "pair dataset manifest")
    if found.get("format") != FORMAT or found.get("key") != key_:
        raise HgdpoError(f"{path}: not the pair dataset of this selection (format {found.get('format')!r}, key "
                         f"{found.get('key')!r}, expected {key_}); delete {location_} and rerun: it is rewritten")
    sizes = _sizes(location_)
    for name, size in dict(found["files"], **{INDEX: found["index_bytes"]}).items():
        if sizes.get(name) != size:
            why = "is missing" if name not in sizes else f"has {sizes[name]} bytes, not the {size} recorded"
            raise HgdpoError(f"{storage.join(location_, name)}: pair dataset file {why}; delete {location_} and "
                             f"rerun: it is rewritten from the pool")
    return found


# ---------------------------------------------------------------------------------------------
# Selection: pool part -> records


@dataclass
class Selected:
    """The selected pairs of one row group of a pool part."""

    rows: dict[str, list]  # index, prompt_id, prompt, winner, loser, score_w, score_l
    latents_w: np.ndarray  # (m, C, h, w) float16
    latents_l: np.ndarray  # (m, C, h, w) float16


def read_selection(source, plan_: PairPlan) -> Iterator[Selected]:
    """The pairs ``plan_`` selects from one pool part, a row group at a time.

    ``source``: the part opened for random access (a pyarrow file). Per row group the small columns
    are read first; then, when a row is among the first D prompts, the latent columns its kept rows' pairs
    are in."""
    part = pq.ParquetFile(source)
    rule = by_selection(plan_.selection)
    for group in range(part.metadata.num_row_groups):
        small = part.read_row_group(group, columns=SMALL_COLUMNS + list(rule.pool_columns))
        keep = np.flatnonzero(small.column("prompt_index").to_numpy() < plan_.dataset_size)
        picked = rule.choose(small, keep, plan_.pool_size, plan_.loser_rank, plan_.margin)
        keep, chosen = picked.rows, picked.pairs
        if not len(keep):
            continue
        held = small.column("latent_index").to_pylist()
        at_w = [held[r].index(w) for r, (w, _) in zip(keep, chosen)]
        at_l = [held[r].index(l) for r, (_, l) in zip(keep, chosen)]
        latents = pool.read_latents(part, group, sorted(set(at_w) | set(at_l)))  # position -> (rows, C, h, w)
        rows = {"index": small.column("prompt_index").to_numpy()[keep].tolist(),
                "prompt_id": [small.column("prompt_id")[int(r)].as_py() for r in keep],
                "prompt": [small.column("prompt")[int(r)].as_py() for r in keep],
                "winner": [w for w, _ in chosen], "loser": [l for _, l in chosen],
                "score_w": [float(w) for w, _ in picked.scores], "score_l": [float(l) for _, l in picked.scores]}
        yield Selected(rows, np.stack([latents[k][r] for r, k in zip(keep, at_w)]),
                       np.stack([latents[k][r] for r, k in zip(keep, at_l)]))


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]):
    """The frozen text encoder's last hidden states for ``prompts``: (m, L, D) float32 on the CPU.

    As SD1.5 conditions its UNet: padded to the tokenizer's maximum length, truncated, no attention
    mask."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0].float().cpu()


ROWS_SCHEMA = pa.schema([("index", pa.int64()), ("prompt_id", pa.string()), ("prompt", pa.string()),
                         ("winner", pa.int32()), ("loser", pa.int32()), ("score_w", pa.float32()),
                         ("score_l", pa.float32()), ("offset", pa.int64())])


def _stem(part: str) -> str:
    return f"records-{part.removesuffix('.parquet')}"


def _guarded(selection: Iterator[Selected], where: str) -> Iterator[Selected]:
    """``selection``, with a part that cannot be read (a corrupt or truncated file) named in the error."""
    while True:
        try:
            selected = next(selection)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise HgdpoError(f"{where}: pool part cannot be read ({str(err).strip().splitlines()[0]}); rerun the pool "
                             f"job with the same config: it rebuilds the part") from None
        yield selected


def select_part(pool_uri: str, part: str, dest: str, plan_: PairPlan, latent_shape: tuple[int, ...],
                tokenizer, text_encoder) -> pa.Table:
    """Write one pool part's records into the dataset folder ``dest``, then its rows file; returns the rows.

    Streams: one row group of the part is in memory at a time."""
    where = storage.join(pool_uri, part)
    with storage.errors("train.pool", where):
        fs, path = storage.resolve(where)
        source = fs.open_input_file(path)
    rows: dict[str, list] = {name: [] for name in ROWS_SCHEMA.names}
    hidden_shape: list[int] = []

    def fill(out) -> None:
        offset = 0
        for selected in _guarded(read_selection(source, plan_), where):
            hidden = encode_prompts(tokenizer, text_encoder, selected.rows["prompt"]).numpy()  # (m, L, D)
            hidden_shape[:] = hidden.shape[1:]
            layout = Layout(tuple(latent_shape), tuple(hidden_shape), nouns=by_selection(plan_.selection).needs_nouns)
            nouns = None
            if layout.nouns:
                nouns = np.stack([encode_nouns(noun_tokens(tokenizer, p), hidden.shape[1])
                                  for p in selected.rows["prompt"]])  # (m, L)
            out.write(layout.pack(selected.latents_w, selected.latents_l, hidden, nouns))
            for name, values in selected.rows.items():
                rows[name].extend(values)
            rows["offset"].extend((offset + layout.record_bytes * np.arange(len(hidden))).tolist())
            offset += layout.record_bytes * len(hidden)

    stem = _stem(part)
    with source:
        storage.write(storage.join(dest, f"{stem}.bin"), fill)
    if not rows["index"]:  # none of the first D prompts is in this part: its rows file alone says so
        storage.delete(storage.join(dest, f"{stem}.bin"))
    table = pa.table({name: pa.array(rows[name], type=ROWS_SCHEMA.field(name).type) for name in ROWS_SCHEMA.names})
    table = table.replace_schema_metadata({HIDDEN_SHAPE_KEY: json.dumps(hidden_shape).encode()})
    storage.write_parquet(storage.join(dest, f"{stem}.parquet"), table)
    return table


def _select_task(payload: dict) -> list[tuple[str, pa.Table]]:
    """A Ray task: the text encoder loaded once, then ``select_part`` for each of ``payload["parts"]``."""
    cfg = from_dict(TrainConfig, payload["train"])
    plan_ = PairPlan(**payload["plan"])
    quiet_libraries()
    tokenizer, text_encoder = models.load_text_encoder(cfg.model, model_config=cfg.model_config,
                                                       allow_pickle=cfg.allow_pickle)
    return [(part, select_part(cfg.pool, part, payload["dest"], plan_, tuple(payload["latent_shape"]),
                               tokenizer, text_encoder)) for part in payload["parts"]]


# ---------------------------------------------------------------------------------------------
# The driver: write once, or find


@dataclass(frozen=True)
class PairData:
    """A complete pair dataset: where it is, its manifest, and whether this call wrote it."""

    location: str
    manifest: dict
    written: bool


def ensure(cfg, meta: dict, plan_: PairPlan, model_fingerprint: str, log=print) -> PairData:
    """The pair dataset of ``cfg``'s selection: found complete beside the output, or written now.

    Written by Ray tasks (as many as the cluster has CPUs, up to one per pool part), each loading the
    text encoder once; parts finished by an earlier, interrupted call are kept. Two runs writing the
    same dataset at once write the same records under the same names, each file atomically."""
    complete = pool.state(cfg.pool).complete
    key_ = key(meta, complete, model_fingerprint, plan_)
    where = location(cfg.pairs_root(), key_)
    found = read_manifest(where, key_)
    if found is not None:
        log(f"train: pairs: reusing {where} ({found['rows']} pairs)")
        return PairData(where, found, written=False)
    parts = list(complete["parts"])
    done = {name.removesuffix(".parquet") for name in _sizes(where) if name.endswith(".parquet")}
    todo = [p for p in parts if _stem(p) not in done]
    one = by_selection(plan_.selection).per_prompt == "one"
    what = f"{plan_.dataset_size} pairs" if one else f"the {plan_.selection} pairs of {plan_.dataset_size} prompts"
    log(f"train: pairs: selecting {what} (n={plan_.pool_size}, loser rank {plan_.loser_rank}) "
        f"from {len(todo)} of {len(parts)} pool parts into {where}")
    tables = dict(_run_tasks(cfg, plan_, todo, where, meta["latent_shape"][1:]))
    for part in parts:
        if part not in tables:
            tables[part] = storage.read_parquet(storage.join(where, f"{_stem(part)}.parquet"))
    manifest = _finish(where, key_, cfg, meta, plan_, parts, tables)
    log(f"train: pairs: wrote {where} ({manifest['rows']} pairs, {sum(manifest['files'].values()) / 2**20:.1f} MiB)")
    return PairData(where, manifest, written=True)


def _run_tasks(cfg, plan_: PairPlan, parts: list[str], dest: str, latent_shape) -> list[tuple[str, pa.Table]]:
    """``select_part`` for ``parts`` on Ray tasks of one CPU each; an error of ours comes back as itself."""
    if not parts:
        return []
    tasks = max(1, min(len(parts), int(ray.cluster_resources().get("CPU", 1))))
    # "DEFAULT": not the caller's placement group (inside a sweep's Tune trial, one without CPUs, where
    # child tasks would otherwise be placed and could never run).
    remote = ray.remote(num_cpus=1, scheduling_strategy="DEFAULT")(_select_task)
    # Tasks run in their own folder: a relative pool path is made absolute here.
    train = dict(to_dict(cfg), pool=storage.absolute(cfg.pool))
    payloads = [{"train": train, "plan": asdict(plan_), "dest": dest, "latent_shape": list(latent_shape),
                 "parts": parts[k::tasks]} for k in range(tasks)]
    try:
        return [item for result in ray.get([remote.remote(p) for p in payloads]) for item in result]
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, HgdpoError):
            raise HgdpoError(str(err.cause)) from None
        raise


def _finish(where: str, key_: str, cfg, meta: dict, plan_: PairPlan, parts: list[str],
            tables: dict[str, pa.Table]) -> dict:
    """Check that every one of the D prompts has exactly one record, then write the index and, last,
    the manifest."""
    pieces, hidden_shape = [], None
    for part in parts:
        table = tables[part]
        if table.num_rows:
            hidden_shape = json.loads(table.schema.metadata[HIDDEN_SHAPE_KEY])
            table = table.replace_schema_metadata(None)
            pieces.append(table.append_column("file", pa.array([f"{_stem(part)}.bin"] * table.num_rows)))
    index = pa.concat_tables(pieces).sort_by("index") if pieces else None
    got = index.column("index").to_numpy() if index is not None else np.zeros(0, np.int64)
    rows = plan_.dataset_size
    rule = by_selection(plan_.selection)
    if rule.per_prompt != "one":  # the pairs the rule took, renumbered 0..rows-1 in prompt order
        twice = rule.per_prompt == "at most one" and len(np.unique(got)) != len(got)
        if twice or (len(got) and got.max() >= plan_.dataset_size):
            raise HgdpoError(f"train.pool: {cfg.pool}: a prompt index has two rows; the pool is inconsistent with its "
                             f"manifest")
        rows = len(got)
        if index is not None:
            index = index.append_column("prompt_index", index.column("index")).set_column(
                0, "index", pa.array(np.arange(rows), pa.int64()))
        if not rows and plan_.selection == "ospo":
            raise HgdpoError(f"train.pool: the self-judge kept none of the first {plan_.dataset_size} prompts of "
                             f"{cfg.pool} (no seed whose image passes every question while its negative fails one); "
                             f"lower train.ospo_margin or build the pool with more images per prompt")
        if not rows:
            raise HgdpoError(f"train.pool: the {plan_.selection} selection took no pair from the first "
                             f"{plan_.dataset_size} prompts of {cfg.pool}")
    elif not np.array_equal(got, np.arange(plan_.dataset_size)):
        missing = sorted(set(range(plan_.dataset_size)) - set(got.tolist()))
        what = f"prompt index {missing[0]} has no row" if missing else "a prompt index has two rows"
        raise HgdpoError(f"train.pool: {cfg.pool}: {what} among the first {plan_.dataset_size} prompts; "
                         f"the pool is inconsistent with its manifest")
    layout = Layout(tuple(meta["latent_shape"][1:]), tuple(hidden_shape), nouns=rule.needs_nouns)
    storage.write_parquet(storage.join(where, INDEX), index)
    sizes = _sizes(where)
    files = {name: sizes.get(name) for name in sorted(set(index.column("file").to_pylist()))}
    counts = Counter(index.column("file").to_pylist())
    for name, size in files.items():
        if size != counts[name] * layout.record_bytes:
            raise HgdpoError(f"{storage.join(where, name)}: {size} bytes, not {counts[name]} records of "
                             f"{layout.record_bytes}; delete {where} and rerun: it is rewritten")
    selection = {"pool_size": plan_.pool_size, "loser_rank": plan_.loser_rank, "dataset_size": plan_.dataset_size}
    if plan_.selection != "rank":  # another rule (ospo, kto), and how many pairs it took from the D prompts (rows)
        selection.update(rule=plan_.selection, margin=plan_.margin)
    manifest = {
        "format": FORMAT, "key": key_, "pool": storage.absolute(cfg.pool), "pool_fingerprint": meta["fingerprint"],
        "base_model": meta.get("base_model"), "selection": selection,
        "rows": rows, "latent_shape": list(layout.latent_shape), "hidden_shape": list(layout.hidden_shape),
        "dtype": "float16", "record": ["latents_w", "latents_l", "hidden_states"] + ["nouns"] * layout.nouns,
        "nouns": layout.nouns, "record_bytes": layout.record_bytes,
        "files": {k: int(v) for k, v in files.items()}, "index_bytes": int(sizes[INDEX]),
    }
    storage.write_json(storage.join(where, MANIFEST), manifest)
    return manifest
