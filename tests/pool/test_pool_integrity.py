"""A pool's parts against its manifest: refused at the door by every reader, found by verify, repaired by
rerunning the pool job (only the bad part's prompts are built again), then trained on."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from hgdpo import cli
from hgdpo.errors import HgdpoError
from hgdpo.infra import storage
from hgdpo.pool import store as pool
from hgdpo.pool.part_file import write_part_file
from hgdpo.world.prompts import write_prompts

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import build_pool  # noqa: E402
import sweep as sweep_job  # noqa: E402
import train as train_job  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
           "a yellow circle at the bottom", "a purple square in the center", "a black triangle on the left"]
TRAIN = ["max_steps=2", "global_batch=4", "micro_batch=2", "data_shards=2", "lora_rank=4", "checkpoint_every=2"]


def pool_settings(work: Path, output: Path, *extra: str) -> list[str]:
    return [f"prompts={work / 'prompts.txt'}", f"output={output}", "images_per_prompt=4", "steps=4",
            "rows_per_file=2", "--no-mlflow", *extra]


@pytest.fixture(scope="module")
def work(ray_local, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("integrity")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp


@pytest.fixture(scope="module")
def built(work) -> Path:
    """A finished pool of 6 prompts in 3 parts: copied before each damage, the reference after repairs."""
    assert build_pool.main(pool_settings(work, work / "pool")) == 0
    return work / "pool"


def parts(pool_dir: Path) -> list[Path]:
    return sorted(pool_dir.glob("part-*.parquet"))


def damaged(built: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of the pool with its second part damaged; the copy and that part's name."""
    copy = tmp_path / "pool"
    shutil.copytree(built, copy)
    part = parts(copy)[1]
    data = bytearray(part.read_bytes())
    if how == "truncated":  # a failed copy
        part.write_bytes(data[: len(data) // 2])
    elif how == "deleted":
        part.unlink()
    elif how == "altered":  # bit rot: the same size, other bytes
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(data)
    return copy, part.name


def manifest(pool_dir: Path) -> dict:
    return json.loads((pool_dir / pool.COMPLETE).read_text())


def verify(location: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["verify", location])
    return code, out.getvalue(), err.getvalue()


def train(work: Path, pool_dir: Path, output: Path) -> int:
    return train_job.main([f"pool={pool_dir}", f"output={output}", f"mlflow_uri=sqlite:///{work / 'mlflow.db'}",
                           *TRAIN])


def test_the_manifest_records_each_parts_rows_size_and_checksum(built):
    files = manifest(built)["files"]
    assert sorted(files) == [p.name for p in parts(built)] and len(files) == 3
    for part in parts(built):
        data = part.read_bytes()
        assert files[part.name] == {"rows": pq.read_metadata(part).num_rows, "bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest()}
    assert sum(f["rows"] for f in files.values()) == len(PROMPTS)
    code, out, _ = verify(str(built))
    assert code == 0 and "6 prompts in 3 parts" in out and "size, sha256, rows and prompt ids" in out


@pytest.mark.parametrize("how, problem", [("truncated", r"has \d+ bytes, not the \d+ written"),
                                          ("deleted", "is missing")])
def test_a_truncated_or_deleted_part_is_refused_by_every_reader_naming_it(built, work, tmp_path, capsys, how,
                                                                           problem):
    copy, name = damaged(built, tmp_path, how)
    assert train(work, copy, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"train.pool: {copy}: pool part {name} " in err and "rerun the pool job with the same config" in err
    assert "rebuilds only the prompts of the bad part" in err and "Traceback" not in err
    assert re.search(problem, err), err
    assert not (tmp_path / "out").exists()  # refused before any work

    write_prompts(tmp_path / "test.txt", 2, split="test", seed=5)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "integrity", "pool": str(copy), "output": str(tmp_path / "sweep"),
        "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "parameters": {"pool_size": [2, 4]},
        "train": {"max_steps": 2, "global_batch": 4, "micro_batch": 2, "data_shards": 2},
        "evaluate": {"prompts": str(tmp_path / "test.txt"), "steps": 4}}))
    assert sweep_job.main(["--config", str(sweep_file)]) == 2
    assert f"sweep.pool: {copy}: pool part {name} " in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()

    with pytest.raises(HgdpoError, match=f"pool part {name} "):
        pool.read(str(copy))
    code, _, err = verify(str(copy))
    assert code == 2 and f"pool part {name} " in err


def test_an_altered_part_of_the_same_size_is_found_by_verify(built, tmp_path, capsys):
    copy, name = damaged(built, tmp_path, "altered")
    pool.check_parts(copy)  # the readers' check needs no read: sizes alone cannot see this
    code, _, err = verify(str(copy))
    assert code == 2 and f"pool: {copy}: pool part {name} has bytes other than those written (sha256 " in err
    assert "rerun the pool job" in err
    with pytest.raises(HgdpoError, match=f"pool part {name} has bytes other than those written"):
        pool.verify(copy)


def rerun(work: Path, copy: Path, capsys, *extra: str) -> str:
    assert build_pool.main(pool_settings(work, copy, *extra)) == 0
    return capsys.readouterr().out


def assert_repaired(built: Path, copy: Path, untouched: dict[str, int]) -> None:
    """The repaired pool has the rows of the undamaged one, the other parts were not rewritten, and it verifies."""
    assert pool.read(str(copy)).equals(pool.read(str(built)))
    assert {n: (copy / n).stat().st_mtime_ns for n in untouched} == untouched
    assert verify(str(copy))[0] == 0
    # The other parts' entries are unchanged; the rebuilt prompts may land in one part or several.
    got, want = manifest(copy)["files"], manifest(built)["files"]
    assert {n: got[n] for n in untouched} == {n: want[n] for n in untouched}
    assert sum(f["rows"] for f in got.values()) == sum(f["rows"] for f in want.values())


def others(copy: Path, name: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in parts(copy) if p.name != name}


def test_a_truncated_part_is_repaired_by_rerunning_the_pool_job_and_training_then_runs(built, work, tmp_path,
                                                                                       capsys):
    """The new user's story: a failed copy, training refuses, the pool job is rerun, training runs."""
    copy, name = damaged(built, tmp_path, "truncated")
    untouched = others(copy, name)
    assert train(work, copy, tmp_path / "out") == 2
    capsys.readouterr()
    out = rerun(work, copy, capsys)
    assert f"pool: part {name} has " in out and "deleted, its prompts are built again" in out
    assert "6 prompts, 4 already built, 2 to build" in out
    assert_repaired(built, copy, untouched)
    assert train(work, copy, tmp_path / "out") == 0
    assert (tmp_path / "out" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_a_deleted_part_is_rebuilt_by_a_plain_rerun(built, work, tmp_path, capsys):
    copy, name = damaged(built, tmp_path, "deleted")
    untouched = others(copy, name)
    out = rerun(work, copy, capsys)
    assert f"pool: part {name} is missing: deleted, its prompts are built again" in out
    assert "6 prompts, 4 already built, 2 to build" in out
    assert_repaired(built, copy, untouched)


def test_an_altered_part_is_rebuilt_by_a_rerun_with_verify(built, work, tmp_path, capsys):
    copy, name = damaged(built, tmp_path, "altered")
    untouched = others(copy, name)
    assert "already complete (6 prompts, every part has its recorded size); nothing to do" in rerun(work, copy, capsys)
    out = rerun(work, copy, capsys, "--verify")
    assert f"pool: part {name} has bytes other than those written" in out and "6 prompts, 4 already built" in out
    assert_repaired(built, copy, untouched)
    assert "already complete (6 prompts, every part's checksum matches)" in rerun(work, copy, capsys, "--verify")


def test_an_unreadable_part_of_an_unfinished_pool_is_rebuilt_not_a_crash(built, work, tmp_path, capsys):
    """No manifest to compare with: the part is found by reading its ids, and built again."""
    copy, name = damaged(built, tmp_path, "truncated")
    (copy / pool.COMPLETE).unlink()
    untouched = others(copy, name)
    out = rerun(work, copy, capsys)
    assert f"pool: part {name} cannot be read (" in out and "6 prompts, 4 already built, 2 to build" in out
    assert_repaired(built, copy, untouched)


def test_a_manifest_without_sizes_is_accepted_with_a_warning_and_a_rerun_records_them(built, work, tmp_path, capsys):
    copy = tmp_path / "pool"
    shutil.copytree(built, copy)
    old = manifest(built)
    (copy / pool.COMPLETE).write_text(json.dumps({"parts": old["parts"], "rows": old["rows"]}))
    assert pool.read_meta(copy)["num_prompts"] == len(PROMPTS)
    assert "records no part sizes" in capsys.readouterr().err
    out = rerun(work, copy, capsys)
    assert "6 prompts, 6 already built, 0 to build" in out
    assert manifest(copy) == old  # each part read once: the checksums its writer took while writing it


def test_parts_on_object_storage_are_checked_and_verified(s3_env, tmp_path):
    """A pool written with the pool library on an S3-compatible server (no generation)."""
    import numpy as np

    uri = f"s3://hgdpo-test/integrity/{tmp_path.name}"
    pool.init(uri, {"format": pool.FORMAT, "num_prompts": 4})
    files = {}
    for first in (0, 2):
        rows = {"prompt_id": [f"p{first}", f"p{first + 1}"], "prompt_index": [first, first + 1], "prompt": ["x", "y"],
                "seeds": [[1, 2]] * 2, "scores": [[0.5, 0.1]] * 2, "rank": [[0, 1]] * 2, "winner": [0, 0],
                "loser": [1, 1], "latent_index": [[0, 1]] * 2, "image_w": [b"w"] * 2, "image_l": [b"l"] * 2,
                "latents": np.full((2, 2, 4, 2, 2), first, np.float16)}
        name, entry = write_part_file(uri, pool.to_table(rows, (2, 4, 2, 2)))
        assert (entry["bytes"], entry["sha256"]) == storage.digest(storage.join(uri, name))
        files[name] = entry
    names = sorted(files)
    pool.mark_complete(uri, names, 4, files)
    assert verify(uri)[0] == 0 and pool.read(uri).num_rows == 4

    data = storage.read_bytes(storage.join(uri, names[1]))
    storage.write_bytes(storage.join(uri, names[1]), data[:-10])
    with pytest.raises(HgdpoError, match=f"pool part {names[1]} has {len(data) - 10} bytes, not the {len(data)}"):
        pool.read_meta(uri)
    altered = bytearray(data)
    altered[len(data) // 2] ^= 0xFF
    storage.write_bytes(storage.join(uri, names[1]), bytes(altered))
    pool.check_parts(uri)
    code, _, err = verify(uri)
    assert code == 2 and f"pool part {names[1]} has bytes other than those written" in err
