"""The pair dataset: what selection reads from the pool, what it writes, reuse and resume, and what a
worker reads back (``hgdpo.train.pair_data``), on a pool of the embedded model."""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hgdpo.errors import HgdpoError
from hgdpo.models import loading as models
from hgdpo.objectives.base import choose_pair
from hgdpo.pool import store as pool
from hgdpo.pool.part_file import GROUP_ROWS, write_part
from hgdpo.train import pair_data, pair_records
from hgdpo.train.config import TrainConfig
from hgdpo.train.pairs import plan as make_plan

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import build_pool  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
           "a yellow circle at the bottom", "a purple square in the center", "a black triangle on the left",
           "a red square above a blue circle", "a green circle left of a yellow square"]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """8 prompts x N=4 images, 4 prompts a part (two parts), built in this process."""
    tmp = tmp_path_factory.mktemp("pairs")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert build_pool.main([f"prompts={tmp / 'prompts.txt'}", f"output={tmp / 'pool'}", "images_per_prompt=4",
                            "steps=4", "rows_per_file=4", "--no-mlflow", "--no-ray"]) == 0
    return tmp / "pool"


def selection(pool_dir: Path, **settings):
    meta = pool.read_meta(str(pool_dir))
    values = {"pool_size": None, "loser_rank": None, "dataset_size": None} | settings
    return meta, make_plan(meta, data_shards=2, global_batch=4, seed=0, **values)


def parts(pool_dir: Path) -> list[Path]:
    return [pool_dir / name for name in pool.state(str(pool_dir)).complete["parts"]]


class CountingFile(io.FileIO):
    """A local file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.read_bytes += n or 0
        return n


def read_counted(path: Path, plan_) -> tuple[list, int]:
    file = CountingFile(str(path))
    with pa.PythonFile(file, mode="r") as source:
        selected = list(pair_data.read_selection(source, plan_))
    return selected, file.read_bytes


def column_bytes(path: Path, name: str) -> int:
    meta = pq.ParquetFile(str(path)).metadata
    return sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups)
               for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema.split(".")[0] == name)


def synthetic_part(folder: Path, first: int, rows: int = 4, n: int = 4, latent=(4, 64, 64)) -> Path:
    """A pool part at a size where the bytes of each column show (the reader's speculative read of a file's
    last 64 KiB for its footer would hide them in the embedded pool's 100 KB parts): random float16
    latents, 100 KB of incompressible bytes for each PNG."""
    rng = np.random.default_rng(first)
    index = list(range(first, first + rows))
    table = pool.to_table({
        "prompt_id": [f"p{i}" for i in index], "prompt_index": index, "prompt": [f"prompt {i}" for i in index],
        "seeds": [list(range(n))] * rows, "scores": rng.random((rows, n)).astype(np.float32),
        "rank": [list(range(n))] * rows, "winner": [0] * rows, "loser": [n - 1] * rows,
        "latent_index": [list(range(n))] * rows, "latents": rng.standard_normal((rows, n, *latent)),
        "image_w": [rng.bytes(100_000) for _ in index], "image_l": [rng.bytes(100_000) for _ in index]},
        (n, *latent))
    return folder / write_part(str(folder), table)


def test_selection_reads_the_small_columns_then_only_the_latents_of_rows_it_keeps(tmp_path):
    from hgdpo.train.pairs import PairPlan

    part = synthetic_part(tmp_path, first=4)  # prompts 4..7
    full = PairPlan(pool_size=4, loser_rank=4, dataset_size=8, data_shards=2, global_batch=4, seed=0)
    half = PairPlan(pool_size=4, loser_rank=4, dataset_size=4, data_shards=2, global_batch=4, seed=0)
    kept, read_all = read_counted(part, full)
    none, read_small = read_counted(part, half)
    latents = sum(column_bytes(part, name) for name in pool.latent_names(pq.read_schema(part)))
    images = column_bytes(part, "image_w") + column_bytes(part, "image_l")
    assert none == [] and [r for s in kept for r in s.rows["index"]] == [4, 5, 6, 7]
    assert latents > 500_000 and images > 800_000
    # D = 4 keeps no row of this part: only the small columns and the footer are read, not its latents.
    assert read_small < latents / 4
    assert read_all - read_small >= 0.45 * latents  # D = 8: at least the winner's and the loser's 2 of 4 columns
    # The PNG columns are never read (at most the footer's speculative read of the file's last 64 KiB).
    assert read_all < part.stat().st_size - images + 2**16


def test_selecting_among_the_first_n_reads_only_the_latent_columns_its_pairs_are_in(tmp_path):
    from hgdpo.train.pairs import PairPlan

    n_images, rows = 8, 2 * GROUP_ROWS
    part = synthetic_part(tmp_path, first=0, rows=rows, n=n_images)
    meta = pq.ParquetFile(str(part)).metadata
    assert meta.num_row_groups == 2
    scores = pq.read_table(str(part), columns=["scores"]).column("scores").to_pylist()
    chunk = {(g, meta.row_group(g).column(c).path_in_schema.split(".")[0]): meta.row_group(g).column(c).total_compressed_size
             for g in range(meta.num_row_groups) for c in range(meta.num_columns)}
    # Besides latents: the small columns, the footer and the reader's speculative read of the last 64 KiB.
    small = sum(size for (g, name), size in chunk.items() if name in pair_data.SMALL_COLUMNS) + meta.serialized_size
    latents = sum(size for (g, name), size in chunk.items() if name.startswith("latent_") and name != "latent_index")
    read = {}
    for n in (2, 4, n_images):
        plan_ = PairPlan(pool_size=n, loser_rank=n, dataset_size=rows, data_shards=2, global_batch=4, seed=0)
        selected, read[n] = read_counted(part, plan_)
        assert [i for s in selected for i in s.rows["index"]] == list(range(rows))
        # What must be read: in each row group, the columns holding some row's winner or loser.
        needed = sum(chunk[g, pool.latent_column(k)] for g in range(2)
                     for k in {k for r in range(g * GROUP_ROWS, (g + 1) * GROUP_ROWS)
                               for k in choose_pair(np.asarray(scores[r]), n, n)})
        assert needed <= read[n] <= needed + small + 2**16, (n, needed, read[n])
    assert read[2] < read[4] < read[n_images]
    assert read[2] < latents * 2 / n_images + small + 2**16  # at most 2 of the 8 latent columns
    assert read[n_images] < latents  # even n = N skips the columns no row of a group needs


def test_selection_picks_the_winner_and_the_loser_among_the_first_n(pool_dir):
    _, plan_ = selection(pool_dir, pool_size=3, loser_rank=2)
    table = pool.read(str(pool_dir))
    latents = pool.latents_of(table)
    got = {}
    for path in parts(pool_dir):
        with pa.OSFile(str(path)) as source:
            for s in pair_data.read_selection(source, plan_):
                for k, i in enumerate(s.rows["index"]):
                    got[i] = (s.rows["winner"][k], s.rows["loser"][k], s.latents_w[k], s.latents_l[k])
    assert sorted(got) == list(range(8))
    for row, i in enumerate(table.column("prompt_index").to_pylist()):
        scores = np.asarray(table.column("scores")[row].as_py())
        w, l = choose_pair(scores, 3, 2)
        assert w < 3 and l < 3 and scores[w] >= scores[l]
        held = table.column("latent_index")[row].as_py()
        assert got[i][:2] == (w, l)
        np.testing.assert_array_equal(got[i][2], latents[row, held.index(w)])
        np.testing.assert_array_equal(got[i][3], latents[row, held.index(l)])


def as_format_1(pool_dir: Path, dest: Path) -> Path:
    """A copy of the pool as the earlier format wrote it: all K latents of a row in one ``latents`` column."""
    import json

    dest.mkdir()
    meta = json.loads((pool_dir / pool.META).read_text())
    (dest / pool.META).write_text(json.dumps(meta | {"format": "hgdpo-pool/1"}))
    names = []
    for path in parts(pool_dir):
        table = pq.read_table(str(path))
        latents = pool.latents_of(table)
        column = pool.tensor_array(latents, pool.latents_type(latents.shape[1:]))
        table = pool.without_latents(table).append_column("latents", column)
        pq.write_table(table, str(dest / path.name), compression="zstd")
        names.append(path.name)
    pool.mark_complete(str(dest), names, sum(pq.read_metadata(str(dest / n)).num_rows for n in names))
    return dest


def test_a_pool_of_format_1_is_read_as_before_and_not_extended(pool_dir, tmp_path, capsys):
    old = as_format_1(pool_dir, tmp_path / "v1")
    assert pool.latent_names(pq.read_schema(str(min(old.glob("part-*"))))) == ["latents"]
    np.testing.assert_array_equal(pool.latents_of(pool.read(str(old))), pool.latents_of(pool.read(str(pool_dir))))
    _, plan_ = selection(old, pool_size=3, loser_rank=2)
    want = {}
    for path in parts(pool_dir):
        with pa.OSFile(str(path)) as source:
            want.update({i: (s.latents_w[k], s.latents_l[k]) for s in pair_data.read_selection(source, plan_)
                         for k, i in enumerate(s.rows["index"])})
    for path in parts(old):
        with pa.OSFile(str(path)) as source:
            for s in pair_data.read_selection(source, plan_):
                for k, i in enumerate(s.rows["index"]):
                    np.testing.assert_array_equal(s.latents_w[k], want[i][0])
                    np.testing.assert_array_equal(s.latents_l[k], want[i][1])
    # The pool job does not mix formats: an unfinished pool of format 1 is refused, naming it.
    (old / pool.COMPLETE).unlink()
    assert build_pool.main([f"prompts={pool_dir.parent / 'prompts.txt'}", f"output={old}", "images_per_prompt=4", "steps=4",
                            "rows_per_file=4", "--no-mlflow", "--no-ray"]) == 2
    assert f"{old} holds a pool of format hgdpo-pool/1" in capsys.readouterr().err


def ensure(pool_dir: Path, output: Path, **settings):
    cfg = TrainConfig(pool=str(pool_dir), output=str(output), data_shards=2, global_batch=4, micro_batch=2,
                      **settings)
    meta, plan_ = selection(pool_dir, **{k: v for k, v in settings.items()
                                         if k in ("pool_size", "loser_rank", "dataset_size")})
    model = models.fingerprint(models.resolve_model("embedded"))
    return pair_data.ensure(cfg, meta, plan_, model, log=lambda line: None), plan_


def mtimes(folder: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir()}


def expected_pairs(pool_dir: Path, plan_) -> dict[int, tuple]:
    table = pool.read(str(pool_dir))
    latents = pool.latents_of(table)
    tokenizer, encoder = models.load_text_encoder("embedded")
    hidden = pair_data.encode_prompts(tokenizer, encoder, table.column("prompt").to_pylist()).numpy()
    out = {}
    for row, i in enumerate(table.column("prompt_index").to_pylist()):
        w, l = choose_pair(np.asarray(table.column("scores")[row].as_py()), plan_.pool_size, plan_.loser_rank)
        held = table.column("latent_index")[row].as_py()
        out[i] = (latents[row, held.index(w)], latents[row, held.index(l)], hidden[row])
    return out


def test_the_dataset_holds_each_pairs_latents_and_hidden_states_and_is_written_once(ray_local, pool_dir, tmp_path):
    data, plan_ = ensure(pool_dir, tmp_path / "run-a")
    assert data.written and data.location == str(tmp_path / Path(data.location).name)  # beside the output
    assert data.manifest["rows"] == 8 and data.manifest["hidden_shape"] == [77, 32]
    reader = pair_records.PairReader(data.location, data.manifest, owned=lambda index: np.ones(len(index), bool))
    batch = reader.read([5, 0, 7])
    want = expected_pairs(pool_dir, plan_)
    for k, i in enumerate([5, 0, 7]):
        np.testing.assert_array_equal(batch.latents_w[k], want[i][0])
        np.testing.assert_array_equal(batch.latents_l[k], want[i][1])
        # float16 hidden states: the float32 encoder output, rounded (relative error at most 2^-11)
        np.testing.assert_allclose(batch.hidden[k].astype(np.float32), want[i][2], rtol=2.0**-10, atol=1e-6)
    reader.close()

    # A rerun (and a run beside it with the same selection) reuses it: nothing is rewritten.
    before = mtimes(data.location)
    again, _ = ensure(pool_dir, tmp_path / "run-b", seed=7, workers=2)
    assert not again.written and again.location == data.location and mtimes(data.location) == before
    # Another selection gets its own.
    other, _ = ensure(pool_dir, tmp_path / "run-c", pool_size=3)
    assert other.written and other.location != data.location
    assert sorted(p.name for p in tmp_path.glob("pairs-*")) == sorted({Path(data.location).name,
                                                                        Path(other.location).name})


def test_an_interrupted_selection_resumes_from_the_parts_it_finished(ray_local, pool_dir, tmp_path):
    data, _ = ensure(pool_dir, tmp_path / "run")
    folder = Path(data.location)
    first, second = sorted(folder.glob("records-*.parquet"))
    # As a job killed while writing the second part leaves it: no manifest, no index, no rows file.
    for path in (folder / pair_records.MANIFEST, folder / pair_records.INDEX, second):
        path.unlink()
    kept = first.with_suffix(".bin").stat().st_mtime_ns
    with pytest.raises(HgdpoError):  # not a dataset yet: a reader refuses it
        pair_records.PairReader(str(folder), data.manifest, owned=lambda index: np.ones(len(index), bool))
    again, _ = ensure(pool_dir, tmp_path / "run")
    assert again.written and again.manifest == data.manifest
    assert first.with_suffix(".bin").stat().st_mtime_ns == kept and second.exists()


def test_a_record_file_cut_short_is_refused_naming_it(ray_local, pool_dir, tmp_path):
    data, _ = ensure(pool_dir, tmp_path / "run")
    record = min(Path(data.location).glob("records-*.bin"))
    record.write_bytes(record.read_bytes()[:-10])
    with pytest.raises(HgdpoError, match=re.escape(f"{record}: pair dataset file has ") + ".* bytes, not the .* recorded"):
        ensure(pool_dir, tmp_path / "run")


def test_a_reader_holds_and_reads_only_its_own_shards(ray_local, pool_dir, tmp_path):
    data, plan_ = ensure(pool_dir, tmp_path / "run")
    shards = plan_.worker_shards(1, 2)
    reader = pair_records.PairReader(data.location, data.manifest,
                                  owned=lambda index: np.isin(index % plan_.data_shards, shards))
    assert shards == [1] and reader.read([1, 3, 5]).latents_w.shape == (3, 4, 16, 16)
    with pytest.raises(ValueError, match="prompt 2 is not among this reader's prompts"):
        reader.read([2])


def test_prefetched_loads_one_step_ahead_in_order():
    started: list[int] = []

    def load(k: int) -> int:
        started.append(k)
        return k * 10

    seen = []
    for value in pair_records.prefetched(load, range(3, 7)):
        time.sleep(0.05)  # let the thread run ahead if it could
        seen.append(value)
        assert max(started) <= value // 10 + 1  # never more than the next step ahead
    assert seen == [30, 40, 50, 60] and started == [3, 4, 5, 6]
    assert list(pair_records.prefetched(load, range(0))) == []


def test_encode_prompts_is_the_text_encoders_output(pool_dir):
    tokenizer, encoder = models.load_text_encoder("embedded")
    pipe = models.load_pipeline("embedded")
    ids = pipe.tokenizer(PROMPTS[:2], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = pipe.text_encoder(ids)[0]
    assert torch.equal(pair_data.encode_prompts(tokenizer, encoder, PROMPTS[:2]), want)
