"""A pair dataset's records (``hgdpo.train.pair_data`` writes them) and how training workers read them.

A record is a pair's winner latents (C, h, w), loser latents (C, h, w) and its prompt's hidden states
(L, D), little-endian float16 (``Layout``), and, for objectives that weigh by object masks, its prompt's
noun of each token (L,). Workers read with random access (``PairReader``): each looks up only its own
shards' prompts in ``index.parquet`` and reads their records with ``read_at`` (a pread on a local disk, a
ranged GET on an object store), the next step's records in a thread while the current step computes
(``prefetched``), so a worker holds two steps of pairs whatever the pool's size.
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from hgdpo.errors import HgdpoError
from hgdpo.infra import storage

FORMAT = "hgdpo-pairs/1"
MANIFEST = "pairs.json"
INDEX = "index.parquet"
OPEN_FILES = 32  # record files a reader keeps open (a local disk has a limit; a store costs a request per open)


@dataclass(frozen=True)
class Layout:
    """The bytes of one record: winner latents, loser latents, hidden states, float16 each."""

    latent_shape: tuple[int, ...]  # (C, h, w)
    hidden_shape: tuple[int, ...]  # (L, D)
    nouns: bool = False  # ospo: the prompt's noun of each token (L,) after the hidden states (hgdpo.pool.ospo.encode_nouns)

    @property
    def latent_size(self) -> int:
        return int(np.prod(self.latent_shape))

    @property
    def record_bytes(self) -> int:
        return 2 * (2 * self.latent_size + int(np.prod(self.hidden_shape)) + self.nouns * self.hidden_shape[0])

    def pack(self, lat_w: np.ndarray, lat_l: np.ndarray, hidden: np.ndarray, nouns: np.ndarray | None = None) -> bytes:
        """m records: ``lat_*`` (m, C, h, w), ``hidden`` (m, L, D), ``nouns`` (m, L) when the layout has them,
        as their float16 bytes."""
        m = len(lat_w)
        parts = (lat_w, lat_l, hidden) + ((nouns,) if self.nouns else ())
        flat = [np.asarray(a, dtype="<f2").reshape(m, -1) for a in parts]
        return np.concatenate(flat, axis=1).tobytes()

    def unpack(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(m, record) float16 values -> latents_w (m, C, h, w), latents_l, hidden (m, L, D), nouns (m, L) or None."""
        m, k, h = len(data), self.latent_size, int(np.prod(self.hidden_shape))
        nouns = data[:, 2 * k + h:] if self.nouns else None
        return (data[:, :k].reshape(m, *self.latent_shape), data[:, k: 2 * k].reshape(m, *self.latent_shape),
                data[:, 2 * k: 2 * k + h].reshape(m, *self.hidden_shape), nouns)


@dataclass
class Batch:
    """The records of some pairs, in the order asked: float16 arrays."""

    latents_w: np.ndarray  # (m, C, h, w)
    latents_l: np.ndarray  # (m, C, h, w)
    hidden: np.ndarray  # (m, L, D)
    nouns: np.ndarray | None = None  # (m, L): ospo's noun of each token (hgdpo.pool.ospo.encode_nouns)


class PairReader:
    """Random access to a pair dataset's records, for the prompts a worker owns.

    Only the ``index``, ``file`` and ``offset`` columns of the index are read, and only ``owned``
    prompts' entries kept (a few bytes a prompt); records are read when asked for."""

    def __init__(self, location_: str, manifest: dict, owned: Callable[[np.ndarray], np.ndarray]):
        self.location = location_
        self.layout = Layout(tuple(manifest["latent_shape"]), tuple(manifest["hidden_shape"]),
                             nouns=bool(manifest.get("nouns")))
        self._fs, self._root = storage.resolve(location_)
        with storage.errors("train.pairs_folder", location_):
            index = pq.read_table(posixpath.join(self._root, INDEX), columns=["index", "file", "offset"],
                                  filesystem=self._fs)
        prompt = index.column("index").to_numpy()
        mine = owned(prompt)
        files = index.column("file").combine_chunks().dictionary_encode()
        self._names = files.dictionary.to_pylist()
        self._file = np.full(int(manifest["rows"]), -1, np.int32)
        self._offset = np.zeros(int(manifest["rows"]), np.int64)
        self._file[prompt[mine]] = files.indices.to_numpy()[mine]
        self._offset[prompt[mine]] = index.column("offset").to_numpy()[mine]
        self._open: OrderedDict[int, object] = OrderedDict()

    def _handle(self, file: int):
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        if len(self._open) >= OPEN_FILES:
            self._open.popitem(last=False)[1].close()
        with storage.errors("train.pairs_folder", self.location):
            handle = self._fs.open_input_file(posixpath.join(self._root, self._names[file]))
        self._open[file] = handle
        return handle

    def read(self, indices: Sequence[int]) -> Batch:
        """The records of prompts ``indices`` (each owned by this reader)."""
        size = self.layout.record_bytes
        data = np.empty((len(indices), size // 2), dtype="<f2")
        for k, i in enumerate(indices):
            file = int(self._file[i])
            if file < 0:
                raise ValueError(f"prompt {i} is not among this reader's prompts")
            record = self._handle(file).read_at(size, int(self._offset[i]))
            if len(record) != size:
                raise HgdpoError(f"{storage.join(self.location, self._names[file])}: a pair record ends early (the "
                                 f"file was cut short); delete {self.location} and rerun: it is rewritten")
            data[k] = np.frombuffer(record, dtype="<f2")
        return Batch(*self.layout.unpack(data))

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def prefetched(load: Callable[[int], object], keys: range) -> Iterator[object]:
    """``load(k)`` for each k of ``keys``, in order, the next one loading in a thread while the caller uses
    the current one: a bounded number of results (at most three) exist at any time."""
    if not len(keys):
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairs") as executor:
        pending = executor.submit(load, keys[0])
        for k in range(len(keys)):
            result = pending.result()
            if k + 1 < len(keys):
                pending = executor.submit(load, keys[k + 1])
            yield result
            del result
