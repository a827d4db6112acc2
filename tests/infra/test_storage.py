"""The storage layer on a local disk and on a real S3-compatible server (moto, on 127.0.0.1).

Every stage writes through it, so these are its promises: a file that exists is whole (a writer
that fails half-way leaves nothing under the name, on both stores), listings ignore temporaries,
folders copy between stores with their marker file last, URIs stay URIs, credentials stay out of
locations, and a store that cannot be used gives an error naming the setting.
"""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
from servers import ACCESS_KEY, SECRET_KEY

from hgdpo.config.core import from_dict
from hgdpo.errors import ConfigError, HgdpoError
from hgdpo.infra import storage
from hgdpo.pool import store as pool
from hgdpo.pool.part_file import write_part
from hgdpo.train.config import TrainConfig


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh folder: on the local disk, or a prefix in the session's bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("s3_env")
    return f"s3://hgdpo-test/storage/{tmp_path.name}"


def test_json_bytes_parquet_round_trip_and_listing(root):
    storage.write_json(storage.join(root, "a.json"), {"x": [1, 2]})
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    table = pa.table({"k": [1, 2, 3]})
    storage.write_parquet(storage.join(root, "c.parquet"), table)
    assert storage.read_json(storage.join(root, "a.json")) == {"x": [1, 2]}
    assert storage.read_bytes(storage.join(root, "sub", "b.bin")) == b"\x00\x01"
    assert storage.read_parquet(storage.join(root, "c.parquet")).equals(table)
    assert storage.listdir(root) == ["a.json", "c.parquet", "sub"]
    assert storage.listdir(root, recursive=True) == ["a.json", "c.parquet", "sub/b.bin"]
    assert storage.is_file(storage.join(root, "a.json")) and storage.is_dir(storage.join(root, "sub"))
    assert not storage.exists(storage.join(root, "nothing")) and storage.listdir(storage.join(root, "nothing")) == []
    storage.delete(storage.join(root, "sub"))
    assert storage.listdir(root) == ["a.json", "c.parquet"]


def test_a_writer_that_fails_half_way_leaves_nothing_under_the_name(root):
    target = storage.join(root, "part.parquet")
    storage.write_bytes(target, b"the old, whole content")

    def half(out):
        out.write(b"PAR1 half of a file")
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError, match="the writer died"):
        storage.write(target, half)
    assert storage.read_bytes(target) == b"the old, whole content"  # replaced whole or not at all
    with pytest.raises(RuntimeError):
        storage.write(storage.join(root, "new.json"), half)
    assert not storage.exists(storage.join(root, "new.json"))
    assert storage.listdir(root) == ["part.parquet"]  # and the temporary file is gone


def test_temporaries_are_invisible_and_removed(root):
    storage.write_bytes(storage.join(root, "keep.json"), b"{}")
    storage.write_bytes(storage.join(root, f"{storage.TMP_PREFIX}dead-writer-part.parquet"), b"half")
    assert storage.listdir(root) == ["keep.json"]
    assert storage.remove_temporaries(root) == 1
    assert storage.remove_temporaries(root) == 0
    assert storage.listdir(root) == ["keep.json"]


def test_copy_tree_between_stores_puts_the_marker_last(root, tmp_path):
    source = tmp_path / "adapter"
    (source / "nested").mkdir(parents=True)
    (source / "weights.safetensors").write_bytes(b"w" * 1000)
    (source / "nested" / "x.txt").write_text("x")
    (source / "info.json").write_text("{}")
    copied = storage.copy_tree(str(source), storage.join(root, "adapter"), last="info.json")
    assert copied[-1] == "info.json" and sorted(copied) == ["info.json", "nested/x.txt", "weights.safetensors"]
    with storage.local_copy(storage.join(root, "adapter")) as local:
        assert (local / "weights.safetensors").read_bytes() == b"w" * 1000
        assert (local / "nested" / "x.txt").read_text() == "x"
        kept = local
    assert kept.exists() == (not storage.is_uri(root))  # a download is removed afterwards
    with pytest.raises(HgdpoError, match="missing.json is missing"):
        storage.copy_tree(str(source), storage.join(root, "other"), last="missing.json")


def test_a_pool_round_trips_through_s3(s3_env, tmp_path):
    uri = f"s3://hgdpo-test/pools/{tmp_path.name}"
    rows = {"prompt_id": ["a", "b"], "prompt_index": [0, 1], "prompt": ["x", "y"], "seeds": [[1, 2], [3, 4]],
            "scores": [[0.5, 0.1], [0.2, 0.9]], "rank": [[0, 1], [1, 0]], "winner": [0, 1], "loser": [1, 0],
            "latent_index": [[0, 1], [0, 1]], "image_w": [b"w", b"w"], "image_l": [b"l", b"l"]}
    rows["latents"] = np.arange(2 * 2 * 4 * 2 * 2, dtype=np.float16).reshape(2, 2, 4, 2, 2)
    pool.init(uri, {"format": pool.FORMAT, "x": 1})
    part = write_part(uri, pool.to_table(rows, (2, 4, 2, 2)))
    assert pool.state(uri).parts == [part] and pool.done_prompt_ids(uri, [part]) == {"a", "b"}
    pool.mark_complete(uri, [part], 2)
    table = pool.read(uri)
    assert table.column("prompt_id").to_pylist() == ["a", "b"]
    np.testing.assert_array_equal(pool.latents_of(table), rows["latents"])
    assert pool.read_meta(uri)["x"] == 1


def test_uris_stay_uris_and_local_paths_keep_working():
    assert storage.join("s3://b/run", "pool", "part.parquet") == "s3://b/run/pool/part.parquet"
    assert storage.join("s3://b/run/", "pool") == "s3://b/run/pool"
    assert storage.parent("s3://b/run/trials/x") == "s3://b/run/trials" and storage.name("s3://b/run/x/") == "x"
    minio = "s3://b/run?endpoint_override=127.0.0.1:9000&scheme=http"  # pyarrow's options stay at the end
    assert storage.join(minio, "pool") == "s3://b/run/pool?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.parent(storage.join(minio, "pool")) == minio and storage.name(minio) == "run"
    assert storage.join("s3://bucket", "x") == "s3://bucket/x" and storage.parent("s3://bucket/x") == "s3://bucket"
    assert storage.is_local("file:///data/x") and storage.is_local("runs/x") and not storage.is_local("gs://b/x")
    assert storage.join("runs/demo", "pool") == "runs/demo/pool"  # relative paths stay relative
    assert storage.absolute("s3://b/x") == "s3://b/x" and storage.absolute("runs").startswith("/")


@pytest.mark.parametrize("uri", [f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/run",
                                 f"s3://bucket/run?access_key={ACCESS_KEY}&secret_key={SECRET_KEY}"])
def test_credentials_inside_a_location_are_refused_without_repeating_them(uri):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"pool": uri, "output": "s3://bucket/out"})
    message = str(err.value)
    assert message.startswith("train.pool: credentials inside the URI are refused")
    assert SECRET_KEY not in message and ACCESS_KEY not in message


def test_pickled_filesystems_carry_no_credentials(s3_env):
    """Ray ships filesystems to workers: with credentials from the environment, none travel with them."""
    fs, _ = storage.resolve("s3://hgdpo-test/x")
    blob = pickle.dumps(fs)
    assert SECRET_KEY.encode() not in blob and ACCESS_KEY.encode() not in blob


def test_unusable_stores_are_refused_naming_the_setting(s3_env, monkeypatch, tmp_path):
    with pytest.raises(HgdpoError, match=r"^x\.output: s3://no-such-bucket-hg/run: the bucket does not exist"):
        storage.check_writable("s3://no-such-bucket-hg/run", "x.output")
    storage.check_writable(f"s3://hgdpo-test/{tmp_path.name}", "x.output")
    storage.probe_write(f"s3://hgdpo-test/{tmp_path.name}", "x.output")  # the probe is deleted at once
    assert storage.listdir(f"s3://hgdpo-test/{tmp_path.name}") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(HgdpoError, match="is a file, not a folder"):
        storage.check_writable(str(tmp_path / "file"), "x.output")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(HgdpoError, match=r"^x\.pool: .*cannot reach the store's endpoint \(AWS_ENDPOINT_URL="):
        storage.check_reachable("s3://hgdpo-test/run", "x.pool")


def test_json_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / "pool.json").write_text("{not json")
    with pytest.raises(HgdpoError, match=r"pool\.json: corrupt pool metadata, not valid JSON"):
        storage.read_json(str(tmp_path / "pool.json"), "pool metadata")


def test_a_file_over_the_bound_is_refused_before_the_move_and_leaves_nothing(root, monkeypatch):
    """S3 commits a write with one CopyObject, which refuses objects over 5 GiB: ``write`` refuses any file
    past the bound (here lowered to 1,000 bytes), naming it and the bound, and the old file stays whole."""
    monkeypatch.setenv(storage.BOUND_ENV, "1000")
    target = storage.join(root, "big.bin")
    storage.write_bytes(target, b"o" * 1000)  # at the bound: written
    with pytest.raises(HgdpoError) as err:
        storage.write_bytes(target, b"n" * 1001)
    message = str(err.value)
    assert message.startswith(f"{target}: the file grows past the 1000 B bound on one file (storage.MAX_OBJECT_BYTES, "
                              f"lowered by {storage.BOUND_ENV}: S3 moves") and "smaller parts" in message
    assert storage.read_bytes(target) == b"o" * 1000  # replaced whole or not at all
    with pytest.raises(HgdpoError, match=r"new\.parquet: the file grows past the 1000 B bound"):
        storage.write_parquet(storage.join(root, "new.parquet"), pa.table({"x": [b"z" * 2000]}))
    assert storage.listdir(root) == ["big.bin"] and storage.remove_temporaries(root) == 0  # no temporary left


@pytest.mark.parametrize("value, message", [("6442450944", "it can only lower the bound"),
                                            ("0", "must be between 1 and"), ("5GB", "not a whole number")])
def test_the_bound_can_be_lowered_not_raised(monkeypatch, tmp_path, value, message):
    assert storage.object_bound() == storage.MAX_OBJECT_BYTES == 5 << 30
    monkeypatch.setenv(storage.BOUND_ENV, value)
    with pytest.raises(HgdpoError, match=message):
        storage.write_bytes(str(tmp_path / "x"), b"x")


def test_parquet_parts_read_as_one_table_and_only_when_complete(root, monkeypatch):
    """A folder of parts (manifest last) reads like the single file it replaces; without its manifest, or with
    a part cut short, it is refused; a shorter rewrite leaves none of the old parts."""
    monkeypatch.setenv(storage.BOUND_ENV, "4000")
    rng = np.random.default_rng(0)
    table = pa.table({"i": list(range(9)), "png": [rng.bytes(300) for _ in range(9)]})  # 2.7 kB, incompressible
    location = storage.join(root, "scores.parquet")
    storage.write_parquet(location, table.slice(0, 3))  # the layout before parts: one file under the name
    assert storage.read_parquet(location).equals(table.slice(0, 3)) and storage.is_parquet(location)
    with pytest.raises(HgdpoError, match=r"grows past the 3\.9 KiB \(4000 bytes\) bound"):
        storage.write_parquet(storage.join(root, "whole.parquet"), pa.concat_tables([table] * 2))
    manifest = storage.write_parquet_parts(location, (table.slice(i, 3) for i in range(0, 9, 3)))
    assert manifest["parts"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest["rows"] == 9 and storage.listdir(location) == [storage.PARTS_MANIFEST, *manifest["parts"]]
    assert storage.read_parquet(location).equals(table) and storage.is_parquet(location)
    assert storage.read_parquet(location, columns=["i"]).column("i").to_pylist() == list(range(9))
    assert [t.num_rows for t in storage.iter_parquet(location)] == [3, 3, 3]

    part = storage.join(location, "part-00001.parquet")
    whole = storage.read_bytes(part)
    storage.write_bytes(part, whole[:-10])
    with pytest.raises(HgdpoError, match=r"part part-00001\.parquet has \d+ bytes, not the \d+ its writer wrote"):
        storage.read_parquet(location)
    storage.write_bytes(part, whole)
    storage.delete(storage.join(location, storage.PARTS_MANIFEST))  # as a writer that died before its manifest
    assert not storage.is_parquet(location)
    with pytest.raises(HgdpoError, match="without _COMPLETE.json: its writer did not finish"):
        storage.read_parquet(location)

    storage.write_parquet_parts(location, [table.slice(0, 2)])
    assert storage.listdir(location) == [storage.PARTS_MANIFEST, "part-00000.parquet"]
    assert storage.read_parquet(location).equals(table.slice(0, 2))
