"""Collisionless maps from external ids to dense matrix rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class CodedIds(Sequence):
    """A column of ids given as its distinct values and a code per entry (as Arrow's
    ``dictionary_encode`` gives them): ``IdMap.rows`` then looks each distinct id up once.

    ``values`` must be in order of first appearance in ``codes``, so that new ids get their rows
    in the same order as from the plain list of ids (see :meth:`first_appearance`).

    >>> ids = CodedIds.first_appearance(["b", "a", "c"], np.array([1, 1, 0, 1]))
    >>> ids.values, ids.codes.tolist(), list(ids)
    (['a', 'b'], [0, 0, 1, 0], ['a', 'a', 'b', 'a'])
    >>> IdMap().rows(ids).tolist() == IdMap().rows(list(ids)).tolist()
    True
    """

    def __init__(self, values: list[str], codes: np.ndarray) -> None:
        self.values = values
        self.codes = codes

    @classmethod
    def first_appearance(cls, values: list, codes: np.ndarray) -> CodedIds:
        """The used ``values`` reordered by first appearance in ``codes`` (unused ones dropped)."""
        codes = np.asarray(codes, dtype=np.int64)
        peak = np.maximum.accumulate(codes) if len(codes) else codes
        if len(codes) == 0 or (codes[0] == 0 and (codes[1:] <= peak[:-1] + 1).all() and peak[-1] == len(values) - 1):
            return cls(values, codes)  # already in order, every value used (Arrow's encoding gives this)
        used, first = np.unique(codes, return_index=True)
        order = used[np.argsort(first)]
        recode = np.empty(len(values), dtype=np.int64)
        recode[order] = np.arange(len(order))
        return cls([values[c] for c in order.tolist()], recode[codes])

    def kept(self, keep: np.ndarray) -> CodedIds:
        """The entries where ``keep`` is true."""
        return CodedIds.first_appearance(self.values, self.codes[keep])

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, n):  # type: ignore[override]
        if isinstance(n, slice):
            return [self.values[c] for c in self.codes[n].tolist()]
        return self.values[self.codes[n]]

    def __iter__(self):
        values = self.values
        return (values[c] for c in self.codes.tolist())


class IdMap:
    """Assigns each distinct external id the next free row, forever.

    Unlike the hashing trick, two ids never share a row, so one user's
    clicks never move another user's vector (Monolith's "collisionless"
    tables). Ids are kept as strings: ``5`` and ``"5"`` are the same id,
    because JSON producers are not consistent about it.

    >>> ids = IdMap()
    >>> ids.rows(["a", "b", "a", 5]).tolist()
    [0, 1, 0, 2]
    >>> ids.rows(["5"]).tolist()
    [2]
    >>> len(ids), ids.id_of(1)
    (3, 'b')
    >>> ids.get("missing") is None
    True
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._row_of: dict[str, int] = {}
        self._ids: list[str] = []
        self._encoded: tuple[bytes, np.ndarray] = (b"", np.zeros(0, dtype=np.int64))  # ids are append-only
        for key in ids:
            self._add(str(key))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return str(key) in self._row_of

    def _add(self, key: str) -> int:
        row = self._row_of.get(key)
        if row is None:
            row = len(self._ids)
            self._row_of[key] = row
            self._ids.append(key)
        return row

    def rows(self, keys: Sequence[object]) -> np.ndarray:
        """Rows for ``keys`` (int64), adding the ids seen for the first time, in order of first appearance.

        One C-level pass looks all keys up; only the keys not found (new ids, and keys that are
        not strings) are looked at one by one.
        """
        if isinstance(keys, CodedIds):
            return self.rows(keys.values)[keys.codes]
        try:
            found = list(map(self._row_of.get, keys))
        except TypeError:  # an unhashable key: it is its text that is the id
            found = [self._row_of.get(k) if k.__class__ is str else None for k in keys]
        if None not in found:
            return np.array(found, dtype=np.int64)
        rows = np.array(found, dtype=np.float64)  # None becomes NaN; rows stay exact far past 2**31
        missing = np.flatnonzero(np.isnan(rows))
        new = [keys[n] for n in missing.tolist()]
        new = [k if k.__class__ is str else str(k) for k in new]
        row_of = self._row_of
        # New ids in order of first appearance (dict.fromkeys keeps it); a key that was not a
        # string may name an id already known.
        fresh = [k for k in dict.fromkeys(new) if k not in row_of]
        row_of.update(zip(fresh, range(len(self._ids), len(self._ids) + len(fresh))))
        self._ids += fresh
        rows[missing] = list(map(row_of.__getitem__, new))
        return rows.astype(np.int64)

    def get(self, key: object) -> int | None:
        """Row of ``key``, or None if it was never seen."""
        return self._row_of.get(str(key))

    def id_of(self, row: int) -> str:
        return self._ids[row]

    def ids_of(self, rows: Iterable[int]) -> list[str]:
        ids = self._ids
        return [ids[r] for r in rows]

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids as (UTF-8 bytes, end offsets): compact, and loadable without pickle.

        Only ids added since the previous call are encoded: a checkpoint of a
        million users does not re-encode them all every time.
        """
        blob, ends = self._encoded
        new = [k.encode() for k in self._ids[len(ends):]]
        if new:
            base = int(ends[-1]) if len(ends) else 0
            added = base + np.cumsum(np.fromiter(map(len, new), dtype=np.int64, count=len(new)))
            blob, ends = blob + b"".join(new), np.concatenate([ends, added])
            self._encoded = (blob, ends)
        return np.frombuffer(blob, dtype=np.uint8), ends

    @classmethod
    def from_arrays(cls, blob: np.ndarray, ends: np.ndarray) -> IdMap:
        """Inverse of :meth:`to_arrays`.

        >>> IdMap.from_arrays(*IdMap(["a", "bé", "7"]).to_arrays()).ids
        ['a', 'bé', '7']
        """
        data = blob.tobytes()
        starts = [0, *ends[:-1].tolist()]
        return cls(data[a:b].decode() for a, b in zip(starts, ends.tolist()))

    @property
    def ids(self) -> list[str]:
        """All ids in row order (do not mutate)."""
        return self._ids
