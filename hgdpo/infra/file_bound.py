"""The bound on one file's size, and the writers that count (and bound, or hash) the bytes of a write.

**No file is larger than ``MAX_OBJECT_BYTES``** (5 GiB): the move onto the final name is one S3
``CopyObject``, which S3 refuses above 5 GiB, so ``hgdpo.infra.storage.write`` refuses a file that grows
past it (``BoundedWriter``), on every store (a run on a laptop fails where a run on a bucket would),
before anything is moved, and removes the temporary file. A table that can grow past it is written as a
folder of parts (``storage.write_parquet_parts``). The jobs' configs refuse settings that would make a
larger file (``rows_per_file`` of a pool, ``rows_per_part`` of an evaluation), naming the setting.
``HGDPO_MAX_OBJECT_BYTES`` (bytes) lowers the bound, in every process that writes (the tests; a store
with a smaller limit); it cannot raise it.
"""

from __future__ import annotations

import hashlib
import os

from hgdpo.errors import HgdpoError

MAX_OBJECT_BYTES = 5 << 30  # S3's limit on one CopyObject, which is how `write` moves a file onto its name
BOUND_ENV = "HGDPO_MAX_OBJECT_BYTES"  # lowers the bound (tests; a store with a smaller limit)


def object_bound() -> int:
    """The most bytes one file may have: ``MAX_OBJECT_BYTES``, or less when ``HGDPO_MAX_OBJECT_BYTES`` says so."""
    value = os.environ.get(BOUND_ENV, "").strip()
    if not value:
        return MAX_OBJECT_BYTES
    try:
        bound = int(value)
    except ValueError:
        raise HgdpoError(f"{BOUND_ENV}={value!r}: not a whole number of bytes") from None
    if not 0 < bound <= MAX_OBJECT_BYTES:
        raise HgdpoError(f"{BOUND_ENV}={value}: must be between 1 and {MAX_OBJECT_BYTES} ({size_text(MAX_OBJECT_BYTES)}, "
                         f"S3's limit on the copy that moves a file onto its name); it can only lower the bound")
    return bound


def bound_text(bound: int | None = None) -> str:
    """The bound on one file in words, with why it is there (for error messages)."""
    bound = object_bound() if bound is None else bound
    lowered = f", lowered by {BOUND_ENV}" if bound < MAX_OBJECT_BYTES else ""
    text = size_text(bound) if size_text(bound) in (f"{bound} B", "5 GiB") else f"{size_text(bound)} ({bound} bytes)"
    return (f"the {text} bound on one file (storage.MAX_OBJECT_BYTES{lowered}: S3 moves a written "
            f"file onto its name with one CopyObject, which refuses more than 5 GiB)")


def size_text(n: float) -> str:
    """Bytes in binary units: ``5 GiB``, ``1.4 MiB``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}".removesuffix(".0") + f" {unit}"
    return f"{int(n)} B"


class CountingWriter:
    """A writable file that passes the bytes on to ``out`` and counts them (``tell``)."""

    closed = False

    def __init__(self, out=None):
        self.out, self.size = out, 0

    def write(self, data) -> int:
        self.size += memoryview(data).nbytes
        return self.out.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:  # ``write`` closes ``out`` itself, after the last byte
        self.closed = True


class BoundedWriter(CountingWriter):
    """A writable file that refuses to grow past ``bound`` bytes: the write that would pass it raises, so a
    file over the bound fails before the rest of it is uploaded, and is never moved onto its name."""

    def __init__(self, out, location: str, bound: int):
        super().__init__(out)
        self.location, self.bound = location, bound

    def write(self, data) -> int:
        if self.size + memoryview(data).nbytes > self.bound:
            raise HgdpoError(f"{self.location}: the file grows past {bound_text(self.bound)}; nothing was written "
                             f"under its name; write it in smaller parts")
        return super().write(data)



class DigestingWriter(CountingWriter):
    """A writable file that hashes the bytes on their way to ``out``: a written file's size and sha256
    without reading it back (a pool's manifest records them; reading an object back costs a download)."""

    def __init__(self):
        super().__init__()
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return super().write(data)
