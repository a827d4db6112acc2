"""One storage layer for every stage's files: local paths and object-store URIs alike.

A *location* (``hgdpo.infra.locations``) is a local path or a URI that pyarrow resolves to a filesystem.
Pools, checkpoints, adapters, evaluations, samples and sweep state are all read and written here, so no
stage assumes a disk shared between the nodes of a cluster.

**A file that exists is whole.** Every write goes to ``.tmp-<random>-<name>`` in the same folder
and is then moved onto its name. On a local disk the move is a rename (atomic on POSIX). On an
object store it is a server-side copy (S3 ``CopyObject``, GCS rewrite), and the store creates the
destination object whole or not at all; a partial upload (pyarrow completes a multipart upload even
when the writer failed half-way) can only ever sit under a temporary name. Listings ignore
temporary names; ``remove_temporaries`` deletes the ones a crash left behind. A folder-valued output
(an adapter) is complete when its last file (named by the writer) exists. This holds for a process
that dies at any point; on a local disk nothing is fsync'ed, so a power loss may still lose the
last files written before it.

**No file is larger than ``MAX_OBJECT_BYTES``** (5 GiB, ``hgdpo.infra.file_bound``): ``write`` refuses a
file that grows past it before anything is moved. A table that can grow past it is written as a folder of
parts (``write_parquet_parts``: bounded parts, then ``_COMPLETE.json`` last); ``read_parquet`` reads a file
and such a folder alike.

The location helpers (``join``, ``name``, ``parent``, ``absolute``, ...), the bound (``MAX_OBJECT_BYTES``,
``bound_text``, ``size_text``) and ``errors`` live in their own modules and are part of this module's API
too, so that a caller reaches every file operation through ``storage``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hgdpo.errors import HgdpoError
from hgdpo.infra.file_bound import (  # noqa: F401 (MAX_OBJECT_BYTES, BOUND_ENV, bound_text, size_text: this API)
    BOUND_ENV,
    MAX_OBJECT_BYTES,
    BoundedWriter,
    DigestingWriter,
    bound_text,
    object_bound,
    size_text,
)
from hgdpo.infra.locations import (  # noqa: F401 (is_local, name, parent: this API)
    absolute,
    check_uri,
    is_local,
    is_uri,
    join,
    name,
    parent,
)
from hgdpo.infra.storage_errors import errors

TMP_PREFIX = ".tmp-"
OBJECT_STORES = ("s3", "gcs")  # pyarrow type names of stores where folders need no creation
PARTS_MANIFEST = "_COMPLETE.json"  # in a folder of parquet parts: written last, its presence marks them complete
PARTS_FORMAT = "hgdpo-parts/1"
PART_NAME = "part-{:05d}.parquet"


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it of a location. A failed request (on S3 without
    an endpoint, pyarrow asks the bucket for its region) raises ``OSError``: see ``errors``."""
    location = absolute(location)
    parts = urlsplit(location)
    if parts.scheme in ("s3", "gs") and not parts.query:
        fs = _bucket_filesystem(parts.scheme, parts.netloc, _credentials_digest())
        return fs, f"{parts.netloc}{parts.path}".rstrip("/") or parts.netloc
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except ValueError as err:
        raise HgdpoError(f"{location}: not a local path or a storage URI pyarrow can open ({err})") from None
    return fs, path.rstrip("/") or "/"


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str, credentials: str) -> pafs.FileSystem:
    """One filesystem per bucket and environment: creating one for ``s3://`` costs a request (the
    bucket's region) unless an endpoint is set, and every file operation would pay it."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def _credentials_digest() -> str:
    """A digest of the environment a filesystem is built from (so a changed one builds a new one)."""
    relevant = sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_")))
    return hashlib.sha256(repr(relevant).encode()).hexdigest()


def _info(location: str) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    """On an object store, a prefix with objects under it (an empty one does not exist)."""
    return _info(location).type == pafs.FileType.Directory


def listdir(location: str, *, recursive: bool = False) -> list[str]:
    """Names (relative paths when ``recursive``) of what is inside a folder, sorted, temporaries left out;
    an empty list when it does not exist."""
    fs, root = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=recursive))
    names = []
    for info in infos:
        rel = info.path[len(root):].lstrip("/")
        if recursive and info.type != pafs.FileType.File:
            continue
        if not any(part.startswith(TMP_PREFIX) for part in rel.split("/")):
            names.append(rel)
    return sorted(names)


def sizes(location: str) -> dict[str, int | None]:
    """Name -> size in bytes of what is directly inside a folder (None for a subfolder), temporaries left
    out, from one listing: no file is opened (on an object store, one LIST request per 1,000 names).
    Empty when the folder does not exist."""
    fs, root = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return {posixpath.basename(i.path): i.size if i.type == pafs.FileType.File else None
            for i in infos if not posixpath.basename(i.path).startswith(TMP_PREFIX)}


def digest(location: str, chunk: int = 8 << 20) -> tuple[int, str]:
    """A file's size and sha256 (hex), read in chunks (memory bounded whatever the file's size)."""
    fs, path = resolve(location)
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while data := f.read(chunk):
            h.update(data)
            size += len(data)
    return size, h.hexdigest()


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str, what: str = "file") -> Any:
    """Parsed JSON; a clear error naming the file when it is not JSON."""
    try:
        return json.loads(read_bytes(location))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HgdpoError(f"{location}: corrupt {what}, not valid JSON ({err})") from None


def write(location: str, fill: Callable[[Any], None]) -> None:
    """Write a file atomically: ``fill(stream)`` writes into a temporary file, which is then moved onto
    ``location`` (see the module docstring). On any error the temporary file is removed. A file that
    grows past ``object_bound()`` is an error naming it and the bound, raised before any move."""
    fs, path = resolve(location)
    folder, base = posixpath.split(path)
    bound = object_bound()
    if fs.type_name not in OBJECT_STORES:
        fs.create_dir(folder, recursive=True)
    tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{base}")
    try:
        with fs.open_output_stream(tmp) as out:
            fill(BoundedWriter(out, location, bound))
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


def write_bytes(location: str, data: bytes) -> None:
    write(location, lambda out: out.write(data))


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str, data: Any) -> None:
    write_text(location, json.dumps(data, indent=2, sort_keys=True, default=str))


def write_parquet(location: str, table, **kwargs) -> tuple[int, str]:
    """Write a table as one parquet file, atomically; returns its size and sha256 (``digest`` of the file),
    taken from the bytes as they were written."""
    sink = DigestingWriter()

    def fill(out) -> None:
        sink.out = out
        pq.write_table(table, sink, **kwargs)

    write(location, fill)
    return sink.size, sink.hash.hexdigest()


def parquet_rows(location: str) -> int:
    """Rows of a parquet file, from its footer."""
    fs, path = resolve(location)
    return pq.read_metadata(path, filesystem=fs).num_rows


def write_png(location: str, image) -> None:
    """A PIL image as a PNG file."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(location, buf.getvalue())


def write_parquet_parts(location: str, tables: Iterable, **kwargs) -> dict:
    """A table too large for one file (``MAX_OBJECT_BYTES``), as a folder of parquet files: each of ``tables``
    (the caller bounds their rows; at least one) atomically as ``part-00000.parquet``, ``part-00001.parquet``,
    ..., then ``_COMPLETE.json`` last (the manifest, as a pool's: ``parts`` in order, ``rows``, and per part its
    ``rows``, ``bytes`` and ``sha256``). The manifest an earlier writer left is deleted first, and a single
    file of the same name (the layout before parts) too, so until the new manifest nothing under
    ``location`` looks complete; parts of an earlier, longer write are deleted before it. Returns the
    manifest."""
    if is_file(location):
        delete(location)
    delete(join(location, PARTS_MANIFEST))
    files: dict[str, dict] = {}
    for i, table in enumerate(tables):
        part = PART_NAME.format(i)
        size, sha256 = write_parquet(join(location, part), table, **kwargs)
        files[part] = {"rows": table.num_rows, "bytes": size, "sha256": sha256}
    if not files:
        raise HgdpoError(f"{location}: no table to write (give at least one part, empty if need be)")
    for stale in listdir(location):
        if stale not in files and stale.startswith("part-") and stale.endswith(".parquet"):
            delete(join(location, stale))
    manifest = {"format": PARTS_FORMAT, "parts": list(files), "rows": sum(f["rows"] for f in files.values()),
                "files": files}
    write_json(join(location, PARTS_MANIFEST), manifest)
    return manifest


def is_parquet(location: str) -> bool:
    """A parquet file, or a folder of parts with its manifest (``write_parquet_parts``: complete)."""
    kind = _info(location).type
    return kind == pafs.FileType.File or (kind == pafs.FileType.Directory and is_file(join(location, PARTS_MANIFEST)))


def parquet_files(location: str) -> list[str]:
    """The files a parquet location holds, in order: itself when it is a file; a folder's parts, from its
    manifest, each checked to exist with its recorded size (one listing, no file opened). Refuses a folder
    without the manifest (an interrupted writer's) or with a part missing or of another size."""
    if _info(location).type != pafs.FileType.Directory:  # a file (or nothing: pyarrow's error says so, as before)
        return [location]
    manifest_path = join(location, PARTS_MANIFEST)
    if not is_file(manifest_path):
        raise HgdpoError(f"{location}: a folder of parquet parts without {PARTS_MANIFEST}: its writer did not finish")
    manifest = read_json(manifest_path, "parts manifest")
    try:
        parts, files = list(manifest["parts"]), manifest["files"]
    except (KeyError, TypeError) as err:
        raise HgdpoError(f"{manifest_path}: not a parts manifest ({err})") from None
    found = sizes(location)
    for part in parts:
        if part not in found:
            raise HgdpoError(f"{location}: part {part} is missing (listed in {PARTS_MANIFEST})")
        if found[part] != files.get(part, {}).get("bytes"):
            raise HgdpoError(f"{location}: part {part} has {found[part]} bytes, not the {files.get(part, {}).get('bytes')} "
                             f"its writer wrote (cut short or replaced)")
    return [join(location, part) for part in parts]


def iter_parquet(location: str, columns: list[str] | None = None) -> Iterator:
    """The tables of a parquet location (``parquet_files``), one file at a time (memory bounded by a part)."""
    for file in parquet_files(location):
        fs, path = resolve(file)
        yield pq.read_table(path, columns=columns, filesystem=fs)


def read_parquet(location: str, columns: list[str] | None = None):
    """A parquet file, or a folder of parts (``write_parquet_parts``) as one table."""
    tables = list(iter_parquet(location, columns))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def makedirs(location: str) -> None:
    """Create a folder (nothing to do on an object store, where prefixes need no creation)."""
    fs, path = resolve(location)
    if fs.type_name not in OBJECT_STORES:
        fs.create_dir(path, recursive=True)


def delete(location: str) -> None:
    """Delete a file or a folder with everything in it; nothing when it does not exist."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory:
        fs.delete_dir(path)


def remove_temporaries(location: str) -> int:
    """Delete the half-written files a crashed writer left directly in a folder; returns how many."""
    fs, root = resolve(location)
    stale = [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if posixpath.basename(i.path).startswith(TMP_PREFIX)]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def copy_tree(source: str, target: str, *, last: str | None = None) -> list[str]:
    """Copy every file of folder ``source`` into folder ``target`` (any two filesystems), each file
    atomically; the file ``last`` (a relative path) is copied after all others, so that its presence
    marks a complete copy. Returns the relative paths copied."""
    names = listdir(source, recursive=True)
    if last is not None:
        if last not in names:
            raise HgdpoError(f"{source}: {last} is missing")
        names = [n for n in names if n != last] + [last]
    for rel in names:
        write_bytes(join(target, *rel.split("/")), read_bytes(join(source, *rel.split("/"))))
    return names


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local folder holding the folder at ``location``: itself when local, else a temporary download
    (removed afterwards). For libraries that read only local paths (diffusers' ``load_lora_weights``)."""
    if not is_uri(location) or location.startswith("file://"):
        yield Path(resolve(location)[1])
        return
    tmp = tempfile.mkdtemp(prefix="hgdpo-")
    try:
        copy_tree(location, tmp)
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_reachable(location: str, setting: str) -> None:
    """Refuse a location whose store cannot be used (no such bucket, no access, no endpoint), before any
    work; whether it holds what the job needs is the job's own check."""
    check_uri(location, setting)
    with errors(setting, location):
        fs, path = resolve(location)
        _check_bucket(fs, path)
        fs.get_file_info(path)


def check_writable(location: str, setting: str) -> None:
    """Refuse an output location the job could not write to, before any work and without writing: the
    bucket must exist and answer (credentials, endpoint); a local folder must be creatable."""
    check_uri(location, setting)
    with errors(setting, location):
        fs, path = resolve(location)
        _check_bucket(fs, path)
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise HgdpoError(f"{setting}: {location} is a file, not a folder")
        if fs.type_name == "local":
            existing = path
            while fs.get_file_info(existing).type == pafs.FileType.NotFound and existing not in ("", "/"):
                existing = posixpath.dirname(existing)
            if not os.access(existing, os.W_OK):
                raise HgdpoError(f"{setting}: {location}: cannot write in {existing} (permission denied)")


def probe_write(location: str, setting: str) -> None:
    """Write and delete a probe file in an output folder: the first thing a stage does when its work
    starts, so read-only credentials fail now, not when the first result is saved. (On an object
    store, deleting the probe leaves an empty folder marker where there was nothing: the folder the
    stage is about to fill.)"""
    with errors(setting, location):
        makedirs(location)
        fs, path = resolve(location)
        probe = posixpath.join(path, f"{TMP_PREFIX}probe-{uuid.uuid4().hex}")
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)


def _check_bucket(fs: pafs.FileSystem, path: str) -> None:
    if fs.type_name not in OBJECT_STORES:
        return
    bucket = path.split("/", 1)[0]
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise OSError(f"bucket {bucket!r} does not exist")
