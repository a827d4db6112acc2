"""Public preference data in and out: Pick-a-Pic v2 and HPDv2 files written here in their real formats, imported
as pools of pairs (winner first, ties dropped, the (H) subset), a pool exported Pick-a-Pic-style and imported back
(the same pairs reach training), resume of an interrupted import, streaming, and bad input."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from close import assert_same_latents, latents_differ
from PIL import Image

from hgdpo.errors import HgdpoError
from hgdpo.interchange.config import PEOPLE_KEYWORDS, ImportConfig
from hgdpo.interchange.encoding import EncodeParts, decode_image, encode, fit, load_vae
from hgdpo.interchange.import_job import _our_error, import_pairs
from hgdpo.interchange.pairs_export import EXPORT_SCHEMA
from hgdpo.interchange.selection import is_people, plan
from hgdpo.interchange.sources import iter_json
from hgdpo.pool import store as pool
from hgdpo.pool.part_file import write_part

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import export_pairs  # noqa: E402
import import_pairs as import_job  # noqa: E402


def image_bytes(seed: int, size: tuple[int, int] = (80, 64), fmt: str = "JPEG") -> bytes:
    """A noise image (width x height) in ``fmt``: each one different, so a swapped pair shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


# label_0, label_1, has_label, are_different, caption: what Pick-a-Pic v2's rows look like
ROWS = [(1.0, 0.0, True, True, "a woman reading under a tree"), (0.0, 1.0, True, True, "a red car at night"),
        (0.5, 0.5, True, True, "a tie between two castles"), (1.0, 0.0, False, True, "an unlabelled lighthouse"),
        (0.0, 1.0, True, False, "the same image twice"), (0.0, 1.0, True, True, "portrait of two old men"),
        (1.0, 0.0, True, True, "a bowl of fruit"), (0.0, 1.0, True, True, "a girl's bicycle")]
KEPT = [0, 1, 5, 6, 7]  # rows kept: not the tie, the unlabelled row or the identical pair


def write_pickapic(path: Path, rows=ROWS, seed: int = 0, **overrides) -> Path:
    records = []
    for i, (l0, l1, has, diff, caption) in enumerate(rows):
        records.append({"are_different": diff, "best_image_uid": f"u{i}", "caption": caption,
                        "created_at": 1700000000 + i, "has_label": has, "image_0_uid": f"a{i}", "image_0_url": "",
                        "image_1_uid": f"b{i}", "image_1_url": "", "jpg_0": image_bytes(seed + 2 * i),
                        "jpg_1": image_bytes(seed + 2 * i + 1), "label_0": l0, "label_1": l1, "model_0": "sdxl",
                        "model_1": "sd-2.1", "num_example_per_prompt": 1, "ranking_id": 5000 + i, "user_id": 17,
                        **{k: v[i] if isinstance(v, list) else v for k, v in overrides.items()}})
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=3)
    return path


@functools.cache
def embedded_vae():
    return load_vae(ImportConfig(source="x.parquet", output="y"), None, "cpu")


def encoded(images: list[bytes], size: int = 64) -> np.ndarray:
    """What the import must store for these images: fitted, then the embedded VAE's posterior mean, scaled."""
    return encode(embedded_vae(), np.stack([decode_image(b, "test", 0, size, size) for b in images]), 16)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("interchange")


@pytest.fixture(scope="module")
def pickapic(work):
    """A Pick-a-Pic file imported in one process (3 pairs a part: two parts)."""
    source = write_pickapic(work / "train-00000-of-00001.parquet")
    result = import_pairs(ImportConfig(source=str(source), output=str(work / "pap"), rows_per_file=3), local=True)
    return source, result


def test_pickapic_rows_become_pairs_with_the_winner_first_and_ties_dropped(pickapic, work):
    source, result = pickapic
    table = pool.read(str(work / "pap"))
    rows = [ROWS[i] for i in KEPT]
    assert table.column("prompt").to_pylist() == [r[4] for r in rows]
    assert table.column("prompt_id").to_pylist() == [str(5000 + i) for i in KEPT]  # ranking_id: a stable id
    assert table.column("source_row").to_pylist() == KEPT and table.column("prompt_index").to_pylist() == list(range(5))
    src = pq.read_table(source).to_pylist()
    winners = [src[i]["jpg_0"] if src[i]["label_0"] == 1 else src[i]["jpg_1"] for i in KEPT]
    losers = [src[i]["jpg_1"] if src[i]["label_0"] == 1 else src[i]["jpg_0"] for i in KEPT]
    assert table.column("image_w").to_pylist() == winners and table.column("image_l").to_pylist() == losers
    assert table.column("model_w").to_pylist() == ["sdxl", "sd-2.1", "sd-2.1", "sdxl", "sd-2.1"]
    latents = pool.latents_of(table)  # (5, 2, 4, 16, 16): the winner's, then the loser's
    expected = encoded([b for pair in zip(winners, losers) for b in pair]).reshape(5, 2, 4, 16, 16)
    assert_same_latents(latents, expected)  # encoded 3 pairs a part there, all 10 images at once here
    assert latents_differ(latents[:, 0], expected[:, 1])  # a swapped pair would fail
    assert table.column("scores").to_pylist() == [[1.0, 0.0]] * 5 and table.column("winner").to_pylist() == [0] * 5
    meta = pool.read_meta(str(work / "pap"))
    assert meta["source"]["dropped"] == {"tie": 1, "unlabelled": 1, "identical": 1, "not_people": 0, "excluded": 0,
                                         "beyond_max_pairs": 0}
    assert meta["num_prompts"] == 5 and meta["latent_shape"] == [2, 4, 16, 16] and result.built == 5
    assert pool.verify(str(work / "pap"))["parts"] == 2  # `hgdpo verify` reads it like any pool


def test_the_people_subset_keeps_captions_that_name_a_person(pickapic):
    source, _ = pickapic
    kept = plan(ImportConfig(source=str(source), output="unused", subset="people"), log=lambda *_: None)
    assert kept.row.tolist() == [0, 5, 7]  # "a woman reading ...", "portrait of two old men", "a girl's bicycle"
    assert kept.dropped["not_people"] == 2 and kept.winner.tolist() == [0, 1, 1]
    words = frozenset(PEOPLE_KEYWORDS)
    assert is_people("Two WOMEN dancing", words) and is_people("the king's crown", words)
    assert not is_people("a manhole cover", words) and not is_people("a shepherd's pie", words)


def test_hpdv2_json_and_image_folder(work):
    folder = work / "hpd"
    (folder / "images").mkdir(parents=True)
    entries = []
    for i, preference in enumerate([[1, 0], [0, 1], [0.5, 0.5]]):
        paths = [f"images/{i:05d}_a.jpg", f"images/{i:05d}_b.png"]
        (folder / paths[0]).write_bytes(image_bytes(100 + 2 * i, (64, 96)))
        (folder / paths[1]).write_bytes(image_bytes(101 + 2 * i, (96, 64), "PNG"))
        entries.append({"human_preference": preference, "prompt": f"hpd prompt {i}", "file_path": paths,
                        "user_hash": "x"})
    (folder / "train.json").write_text(json.dumps(entries, indent=1))
    assert import_pairs(ImportConfig(source=str(folder / "train.json"), output=str(work / "hpd-pool")),
                        local=True).built == 2
    table = pool.read(str(work / "hpd-pool"))
    assert table.column("prompt").to_pylist() == ["hpd prompt 0", "hpd prompt 1"]
    assert table.column("prompt_id").to_pylist() == ["hpdv2-0", "hpdv2-1"]
    winners = [(folder / "images/00000_a.jpg").read_bytes(), (folder / "images/00001_b.png").read_bytes()]
    assert table.column("image_w").to_pylist() == winners
    losers = [(folder / "images/00000_b.png").read_bytes(), (folder / "images/00001_a.jpg").read_bytes()]
    assert_same_latents(pool.latents_of(table).reshape(4, 4, 16, 16),
                        encoded([winners[0], losers[0], winners[1], losers[1]]))
    # JSON lines, and an array whose entries straddle the reader's chunks, give the same entries
    (folder / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    whole = list(iter_json(str(folder / "train.json")))
    assert [e for _, e, _, _ in whole] == entries == [e for _, e, _, _ in iter_json(str(folder / "train.jsonl"))]
    assert list(iter_json(str(folder / "train.json"), chunk=7)) == whole
    data = (folder / "train.json").read_bytes()
    assert [json.loads(data[start:end]) for _, _, start, end in whole] == entries  # each entry's bytes


def test_fit_scales_to_cover_then_crops_the_centre():
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, 16:112] = 255  # white but for 16 columns on each side
    out = fit(Image.fromarray(wide), 32, 32)  # scaled to 64 x 32, then its centre 32 columns (source 32..96)
    assert out.shape == (32, 32, 3) and out.min() == 255
    wide[:, :64] = 0  # left half black: the crop is centred on the boundary
    out = fit(Image.fromarray(wide), 32, 32)
    assert out[:, :12].max() < 30 and out[:, 20:].min() > 225
    assert fit(Image.fromarray(wide).convert("L"), 16, 8).shape == (8, 16, 3)


# --- Export, and back -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(work):
    """A finished pool of N = 3 images a prompt, written with the pool library as the pool job writes one (the
    export reads only its columns): renders as the PNGs, scores that make the winner and loser any of the three."""
    from hgdpo.models import loading as models
    from hgdpo.world.render import render_captions

    prompts = ["a red circle on the left", "a blue square at the top", "a green triangle", "a yellow circle"]
    rng = np.random.default_rng(7)
    scores = rng.normal(20, 1, (4, 3)).astype(np.float32)
    rank = np.argsort(-scores, axis=1, kind="stable")
    images, _ = render_captions(prompts * 2, seed=1)
    rows = {"prompt_id": [f"p{i}" for i in range(4)], "prompt_index": list(range(4)), "prompt": prompts,
            "seeds": [[11 * i + j for j in range(3)] for i in range(4)], "scores": scores, "rank": rank,
            "winner": rank[:, 0], "loser": rank[:, -1], "latent_index": [[0, 1, 2]] * 4,
            "latents": rng.normal(size=(4, 3, 4, 16, 16)), "image_w": [pool.png_bytes(im) for im in images[:4]],
            "image_l": [pool.png_bytes(im) for im in images[4:]]}
    out = str(work / "pool")
    fingerprint = models.fingerprint(models.resolve_model("embedded"))
    pool.init(out, {"format": pool.FORMAT, "config": {"keep": "all"}, "fingerprint": {"loser_rank": 3},
                    "num_prompts": 4, "images_per_prompt": 3, "latent_shape": [3, 4, 16, 16],
                    "base_model": {"name": "embedded", "fingerprint": fingerprint}})
    table = pool.to_table(rows, (3, 4, 16, 16))
    names = [write_part(out, table.slice(0, 2)), write_part(out, table.slice(2, 2))]
    pool.mark_complete(out, names, 4)
    return work / "pool"


def test_export_is_pick_a_pic_shaped_and_imports_back_to_the_same_pairs(ray_local, built, work):
    out = work / "export" / "pairs.parquet"
    assert export_pairs.main([f"pool={built}", f"output={out}"]) == 0
    exported = pq.read_table(out)
    assert exported.schema.remove_metadata() == EXPORT_SCHEMA
    assert json.loads(exported.schema.metadata[b"hgdpo"])["rows"] == 4
    source = pool.read(str(built), columns=["prompt_id", "prompt", "scores", "winner", "loser", "image_w", "image_l"])
    assert exported.column("caption").to_pylist() == source.column("prompt").to_pylist()
    assert exported.column("jpg_0").to_pylist() == source.column("image_w").to_pylist()
    assert exported.column("jpg_1").to_pylist() == source.column("image_l").to_pylist()
    assert exported.column("label_0").to_pylist() == [1.0] * 4 and exported.column("label_1").to_pylist() == [0.0] * 4
    assert exported.column("model_0").to_pylist() == ["embedded"] * 4
    scores = source.column("scores").to_pylist()
    assert exported.column("score_0").to_pylist() == pytest.approx(
        [s[w] for s, w in zip(scores, source.column("winner").to_pylist())])
    # ... as the diffusers DPO example reads it: the image labelled 1 first
    row = exported.slice(0, 1).to_pylist()[0]
    assert row["label_0"] == 1 and Image.open(io.BytesIO(row["jpg_0"])).size == (64, 64)

    # back in, on Ray Data actors (the job), and through the trainer's pair selection
    back = work / "back"
    assert import_job.main([f"source={out}", f"output={back}", "rows_per_file=3"]) == 0
    imported = pool.read(str(back))
    assert imported.column("prompt_id").to_pylist() == source.column("prompt_id").to_pylist()
    assert imported.column("prompt").to_pylist() == source.column("prompt").to_pylist()
    assert imported.column("image_w").to_pylist() == source.column("image_w").to_pylist()
    # The Ray job's actors encode each part's pairs in one batch on their own threads; here the four winners
    # are encoded together in this process: the same images, float16-rounded float32 noise apart (tests/close.py).
    # That still tells the winner from the loser and one image from another by far.
    want_w, want_l = encoded(source.column("image_w").to_pylist()), encoded(source.column("image_l").to_pylist())
    assert_same_latents(pool.latents_of(imported)[:, 0], want_w, "winners")
    assert_same_latents(pool.latents_of(imported)[:, 1], want_l, "losers")
    assert latents_differ(want_w, want_l) and latents_differ(want_w, np.roll(want_w, 1, axis=0))
    assert import_job.main([f"source={out}", f"output={back}", "rows_per_file=3"]) == 0  # finished: nothing to do

    # the trainer's checks and pair selection read it: the same pairs, the winner first
    from hgdpo.models import loading as models
    from hgdpo.train import pair_data
    from hgdpo.train.config import TrainConfig
    from hgdpo.train.trainer import prepare

    cfg = TrainConfig(pool=str(back), output=str(work / "train-back"), global_batch=2, micro_batch=2, data_shards=1)
    meta, plan_, _ = prepare(cfg)
    assert (plan_.pool_size, plan_.loser_rank, plan_.dataset_size) == (2, 2, 4)
    tokenizer, text_encoder = models.load_text_encoder("embedded")
    parts = json.loads((back / pool.COMPLETE).read_text())["parts"]
    index = pa.concat_tables([pair_data.select_part(str(back), part, str(work / "pairs-back"), plan_,
                                                    tuple(meta["latent_shape"][1:]), tokenizer, text_encoder)
                              for part in parts])
    assert index.column("prompt_id").to_pylist() == source.column("prompt_id").to_pylist()
    assert index.column("winner").to_pylist() == [0] * 4 and index.column("loser").to_pylist() == [1] * 4
    records = np.frombuffer(b"".join((work / "pairs-back" / f"records-{p.removesuffix('.parquet')}.bin").read_bytes()
                                     for p in parts), dtype="<f2").reshape(4, -1)
    size = 4 * 16 * 16
    np.testing.assert_array_equal(records[:, :size].reshape(4, 4, 16, 16), pool.latents_of(imported)[:, 0])
    np.testing.assert_array_equal(records[:, size: 2 * size].reshape(4, 4, 16, 16), pool.latents_of(imported)[:, 1])


def test_an_imported_set_exports_with_its_makers_and_source_bytes(pickapic, work):
    source, _ = pickapic
    out = work / "export-pap.parquet"
    assert export_pairs.main([f"pool={work / 'pap'}", f"output={out}"]) == 0
    exported = pq.read_table(out).to_pylist()
    src = pq.read_table(source).to_pylist()
    assert [r["prompt_id"] for r in exported] == [str(5000 + i) for i in KEPT]
    for row, i in zip(exported, KEPT):
        first = src[i]["label_0"] == 1
        assert row["jpg_0"] == (src[i]["jpg_0"] if first else src[i]["jpg_1"])
        assert (row["model_0"], row["model_1"]) == (("sdxl", "sd-2.1") if first else ("sd-2.1", "sdxl"))


# --- Resume, streaming ------------------------------------------------------------------------------

def test_an_interrupted_import_resumes_to_what_an_uninterrupted_one_writes(pickapic, work, monkeypatch):
    source, _ = pickapic
    cfg = ImportConfig(source=str(source), output=str(work / "killed"), rows_per_file=2)
    write = EncodeParts.write
    calls = []

    def dies_on_the_second_part(self, pairs, latents):
        calls.append(len(pairs))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        return write(self, pairs, latents)

    monkeypatch.setattr(EncodeParts, "write", dies_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        import_pairs(cfg, local=True, log=lambda *_: None)
    assert not (work / "killed" / pool.COMPLETE).exists()
    with pytest.raises(HgdpoError, match="incomplete"):
        pool.read(str(work / "killed"))
    monkeypatch.setattr(EncodeParts, "write", write)
    lines = []
    assert import_pairs(cfg, local=True, log=lines.append).built == 3  # the two later parts only
    assert any("1 parts already written, 2 to encode" in line for line in lines)
    whole = import_pairs(ImportConfig(source=str(source), output=str(work / "whole"), rows_per_file=2), local=True)
    assert whole.built == 5
    def checksums(name: str) -> dict:
        return {n: e["sha256"] for n, e in json.loads((work / name / pool.COMPLETE).read_text())["files"].items()}

    assert checksums("killed") == checksums("whole")  # the same parts, byte for byte


STREAM = textwrap.dedent("""
    import json, sys, tracemalloc
    import pyarrow as pa
    from hgdpo.interchange.config import ImportConfig
    from hgdpo.interchange.selection import plan
    from hgdpo.interchange.sources import fetch_pickapic, source_files
    cfg = ImportConfig(source=sys.argv[1], output="unused", rows_per_file=4)
    tracemalloc.start()
    planned = plan(cfg, log=lambda *_: None)
    files = source_files(cfg)
    got = 0
    for start in range(0, len(planned), 4):  # what an encoder does for each part
        got += sum(len(p["w"]) + len(p["l"]) for p in fetch_pickapic(cfg, files, planned.chunk(start, start + 4)))
    print(json.dumps({"peak": tracemalloc.get_traced_memory()[1] + pa.default_memory_pool().max_memory(),
                      "bytes": got}))
""")


def test_memory_is_flat_in_the_number_of_rows(work):
    """The first pass reads only small columns, and each part only its row groups' images: reading a Pick-a-Pic
    folder of 4x the rows (4 files, as the real set is split in files) peaks where 1x does, far below its size."""
    peaks, sizes = [], []
    for files in (1, 4):
        folder = work / f"stream-{files}"
        folder.mkdir()
        for f in range(files):
            rows = [(1.0, 0.0, True, True, f"caption {f} {i}") for i in range(24)]
            write_pickapic(folder / f"train-{f:05d}-of-{files:05d}.parquet", rows, seed=100 * f,
                           ranking_id=[1000 * f + i for i in range(24)])
        sizes.append(sum(p.stat().st_size for p in folder.iterdir()))
        out = subprocess.run([sys.executable, "-c", STREAM, str(folder)], capture_output=True, text=True, cwd=REPO,
                             check=True)
        measured = json.loads(out.stdout)
        images = pq.read_table(folder, columns=["jpg_0", "jpg_1"])
        assert measured["bytes"] == sum(len(b) for c in images.columns for b in c.to_pylist())  # every image read
        peaks.append(measured["peak"])
    # 4x the rows adds less than a quarter of one 1x folder's bytes (pyarrow's allocations at import vary by about
    # that much between runs); holding the files would take more than their size
    assert peaks[1] < peaks[0] + sizes[0] / 4 and peaks[1] < sizes[1] / 2, (peaks, sizes)


# --- Bad input --------------------------------------------------------------------------------------

def run_job(capsys, *argv) -> tuple[int, str]:
    code = import_job.main(list(argv))
    return code, capsys.readouterr().err


def test_a_parquet_without_the_needed_columns_is_refused(work, capsys):
    path = work / "nolabels.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""], "jpg_1": [b""]}), path)
    code, err = run_job(capsys, f"source={path}", f"output={work / 'bad1'}")
    assert code == 2 and str(path) in err and "label_0, label_1 missing" in err
    assert not (work / "bad1").exists()


def test_labels_outside_zero_half_one_are_refused_naming_file_and_row(work, capsys):
    path = write_pickapic(work / "badlabel.parquet", label_0=[1.0, 0.0, 0.7, 1, 0, 0, 1, 0],
                          label_1=[0.0, 1.0, 0.3, 0, 1, 1, 0, 1])
    code, err = run_job(capsys, f"source={path}", f"output={work / 'bad2'}")
    assert code == 2 and f"{path}: row 2: labels 0.7, 0.3" in err
    assert not (work / "bad2").exists()


def test_an_undecodable_image_is_refused_naming_the_row_and_leaves_nothing_complete(work, capsys):
    path = write_pickapic(work / "badimage.parquet",
                          jpg_1=[image_bytes(1)] * 5 + [b"not an image"] + [image_bytes(2)] * 2)
    cfg = ImportConfig(source=str(path), output=str(work / "bad3"), rows_per_file=2)
    with pytest.raises(HgdpoError, match=rf"{path}: row 5: the image cannot be decoded .* exclude_rows=\[5\]"):
        import_pairs(cfg, local=True, log=lambda *_: None)
    assert not (work / "bad3" / pool.COMPLETE).exists()
    excluded = ImportConfig(source=str(path), output=str(work / "bad3-excluded"), rows_per_file=2, exclude_rows=[5])
    assert import_pairs(excluded, local=True, log=lambda *_: None).built == 4


def test_hpdv2_paths_that_do_not_exist_are_refused(work, capsys):
    folder = work / "hpd-missing"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes(5))
    (folder / "train.json").write_text(json.dumps([
        {"prompt": "p0", "file_path": ["a.jpg", "a.jpg"], "human_preference": [1, 0]},
        {"prompt": "p1", "file_path": ["a.jpg", "gone.jpg"], "human_preference": [0, 1]}]))
    code, err = run_job(capsys, f"source={folder / 'train.json'}", f"output={work / 'bad4'}")
    assert code == 2 and f"{folder / 'train.json'}: entry 1: image 'gone.jpg' does not exist" in err
    (folder / "broken.json").write_text('[{"prompt": "p0", "file_path": ["a.jpg"], "human_preference": [1, 0]}]')
    code, err = run_job(capsys, f"source={folder / 'broken.json'}", f"output={work / 'bad4'}")
    assert code == 2 and "entry 0: file_path must be a list of two image paths" in err
    assert not (work / "bad4").exists()


def test_an_import_over_another_config_is_refused(pickapic, work, capsys):
    source, _ = pickapic
    code, err = run_job(capsys, f"source={source}", f"output={work / 'pap'}", "subset=people", "rows_per_file=3",
                        "--no-ray")
    assert code == 2 and "holds a pool written with another config (subset: 'all' there, 'people' now" in err


# --- The world's public set (Table 1) ---------------------------------------------------------------

def test_the_worlds_public_set_imports_and_its_subject_subset_is_the_world_captions(work):
    from hgdpo.world.prompts import split_of
    from hgdpo.world.public_set import write_public_set

    path = work / "world-public.parquet"
    counts = write_public_set(str(path), 24, subject_share=0.5, seed=3, log=lambda *_: None)
    rows = pq.read_table(path, columns=["caption", "subject", "label_0", "label_1", "model_0"]).to_pylist()
    assert counts["pairs"] == len(rows) == 24 and 4 <= counts["subject"] <= 20
    assert all(r["label_0"] + r["label_1"] == 1 and r["model_0"] == "world-renderer" for r in rows)
    subjects = [i for i, r in enumerate(rows) if r["subject"] and r["label_0"] != 0.5]
    assert all(split_of(rows[i]["caption"]) == "train" for i in subjects)  # never a test prompt
    people = plan(ImportConfig(source=str(path), output="unused", subset="people",
                               people_keywords=["circle", "square", "triangle"]), log=lambda *_: None)
    assert people.row.tolist() == subjects
    assert len(plan(ImportConfig(source=str(path), output="unused"), log=lambda *_: None)) == 24 - counts["ties"]


def test_the_public_sets_scores_are_the_worlds_pickscore():
    from hgdpo.models import loading as models
    from hgdpo.scorers.pickscore import pickscore
    from hgdpo.world.public_set import load_pickscore, score_pairs
    from hgdpo.world.render import render_captions

    captions = ["a red circle on the left", "a blue square and a green triangle"]
    images, _ = render_captions([captions[0], captions[1], captions[1], captions[0]], seed=4)
    processor, scorer = models.load_scorer("embedded")
    expected = [pickscore(processor, scorer, c, images[2 * k: 2 * k + 2]) for k, c in enumerate(captions)]
    np.testing.assert_allclose(score_pairs(*load_pickscore(), captions, images), np.stack(expected), rtol=1e-5)


def test_an_error_of_ours_inside_a_ray_actor_comes_back_as_itself():
    """Ray Data hands back a failed map UDF's error with only the remote traceback's text (seen with Ray 2.60:
    the job then prints the message and exits 2, as in the local path)."""
    remote = RuntimeError("ray::MapWorker(MapBatches(EncodeParts)).submit()\n  File ...\nhgdpo.errors.HgdpoError: "
                          "/d/train.parquet: row 5: the image cannot be decoded (...)\n")
    assert str(_our_error(remote)) == "/d/train.parquet: row 5: the image cannot be decoded (...)"
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = HgdpoError("inner")
    assert str(_our_error(wrapped)) == "inner" and _our_error(RuntimeError("a bug")) is None
