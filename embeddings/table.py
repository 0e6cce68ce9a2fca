"""Growable embedding tables: one float32 row and one bias per id."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from recstream.embeddings.ids import IdMap
from recstream.embeddings.sgd import init_rows


def id_hashes(keys: Sequence[str]) -> np.ndarray:
    """Stable 64-bit hashes of ids (uint64; unlike ``hash()``, the same in every process).

    >>> id_hashes(["a", "b"]).dtype, len(set(id_hashes(["a", "b"]).tolist()))
    (dtype('uint64'), 2)
    """
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(key.encode(), digest_size=8).digest() for key in keys])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


class EmbeddingTable:
    """Vectors and biases for a growing set of ids, stored as dense matrices.

    Capacity doubles when full, so adding ids is amortised O(1) and the
    kernels always see plain contiguous arrays. A new id's vector is drawn
    from N(0, init_std^2) seeded by the id itself (see ``init_rows``).

    >>> t = EmbeddingTable(dim=4, init_std=0.1, seed=1)
    >>> t.rows(["x", "y", "x"]).tolist()
    [0, 1, 0]
    >>> t.vectors.shape, t.biases.shape
    ((2, 4), (2,))
    >>> u = EmbeddingTable(dim=4, init_std=0.1, seed=1)
    >>> bool((u.rows(["y"]) == 0).all() and (u.vectors[0] == t.vectors[1]).all())
    True
    """

    def __init__(self, dim: int, init_std: float, seed: int, capacity: int = 1024) -> None:
        self.dim = dim
        self.init_std = init_std
        self.seed = seed
        self.ids = IdMap()
        self._vectors = np.zeros((capacity, dim), dtype=np.float32)
        self._biases = np.zeros(capacity, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Rows of ``keys``; ids seen for the first time get a fresh row (a forgotten id's, or a new one)."""
        rows, new = self.ids.assign(keys)
        if len(new):
            self._grow(len(self.ids))
            self._vectors[new] = self.initial_vectors(new)
            self._biases[new] = 0
        return rows

    def forget(self, rows: np.ndarray) -> None:
        """Forget the ids of ``rows``: their rows are free for new ids (see ``IdMap.forget``)."""
        self.ids.forget(rows)
        self._vectors[rows] = 0
        self._biases[rows] = 0

    def initial_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The vectors ``rows`` got when their ids were first seen (a function of id and seed)."""
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        if self.init_std == 0:  # N(0, 0): no need to hash the ids (users start at the origin by default)
            return out
        init_rows(out, id_hashes(self.ids.ids_of(rows.tolist())), np.uint64(self.seed), self.init_std)
        return out

    def _grow(self, needed: int) -> None:
        capacity = self._vectors.shape[0]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        vectors = np.zeros((capacity, self.dim), dtype=np.float32)
        vectors[: len(self._vectors)] = self._vectors
        biases = np.zeros(capacity, dtype=np.float32)
        biases[: len(self._biases)] = self._biases
        self._vectors, self._biases = vectors, biases

    def to_arrays(self) -> dict[str, np.ndarray]:
        blob, ends = self.ids.to_arrays()
        return {"id_bytes": blob, "id_ends": ends, "vectors": self.vectors, "biases": self.biases,
                "free": self.ids.free}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the contents with :meth:`to_arrays` output (same dim)."""
        vectors = arrays["vectors"]
        if vectors.shape[1] != self.dim:
            raise ValueError(f"stored vectors have dim {vectors.shape[1]}, the table has {self.dim}")
        self.ids = IdMap.from_arrays(arrays["id_bytes"], arrays["id_ends"], arrays.get("free"))  # older: none free
        n = len(self.ids)
        capacity = max(1024, 1 << max(n - 1, 1).bit_length())
        self._vectors = np.zeros((capacity, self.dim), dtype=np.float32)
        self._biases = np.zeros(capacity, dtype=np.float32)
        self._vectors[:n] = vectors
        self._biases[:n] = arrays["biases"]

    @property
    def vectors(self) -> np.ndarray:
        """(n, dim) view of the live vectors; the kernels update it in place."""
        return self._vectors[: len(self.ids)]

    @property
    def biases(self) -> np.ndarray:
        return self._biases[: len(self.ids)]

    @property
    def storage(self) -> tuple[np.ndarray, np.ndarray]:
        """The full (capacity-sized) arrays, for kernels that index by row."""
        return self._vectors, self._biases
