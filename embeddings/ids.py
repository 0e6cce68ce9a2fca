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
    """Assigns each distinct external id a row of its own until it is forgotten.

    Unlike the hashing trick, two ids never share a row, so one user's
    clicks never move another user's vector (Monolith's "collisionless"
    tables). Ids are kept as strings: ``5`` and ``"5"`` are the same id,
    because JSON producers are not consistent about it.

    A forgotten id (:meth:`forget`, for bounded memory) leaves its row to the next new id:
    freed rows are reused lowest first, before the table grows. ``len`` counts rows, free ones
    included (arrays indexed by row are that long); :attr:`live` counts ids.

    >>> ids = IdMap()
    >>> ids.rows(["a", "b", "a", 5]).tolist()
    [0, 1, 0, 2]
    >>> ids.rows(["5"]).tolist()
    [2]
    >>> len(ids), ids.id_of(1)
    (3, 'b')
    >>> ids.get("missing") is None
    True
    >>> ids.forget(np.array([0, 2]))
    >>> ids.assign(["c", "b", "d", "e"])[0].tolist(), ids.live, len(ids)
    ([0, 1, 2, 3], 4, 4)
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._row_of: dict[str, int] = {}
        self._ids: list[str] = []
        # The encoded ids (see to_arrays); appended to while ids only grow, redone after a row is reused.
        self._encoded: tuple[bytes, np.ndarray] = (b"", np.zeros(0, dtype=np.int64))
        self._stale = False  # a row's id changed since the encoding (a forgotten id, a reused row)
        self._free = np.zeros(0, dtype=np.int64)  # rows of forgotten ids, ascending: reused lowest first
        for key in ids:
            self._add(str(key))

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def live(self) -> int:
        """Ids held (rows minus free rows)."""
        return len(self._ids) - len(self._free)

    @property
    def free(self) -> np.ndarray:
        """Rows of forgotten ids not yet reused, ascending (do not mutate)."""
        return self._free

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
        """Rows for ``keys`` (int64), adding the ids seen for the first time, in order of first appearance."""
        return self.assign(keys)[0]

    def assign(self, keys: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
        """Rows for ``keys`` (int64) and the rows given to ids seen for the first time (in order
        of first appearance: freed rows first, then new ones at the end).

        One C-level pass looks all keys up; only the keys not found (new ids, and keys that are
        not strings) are looked at one by one.
        """
        if isinstance(keys, CodedIds):
            rows, new = self.assign(keys.values)
            return rows[keys.codes], new
        found = self._lookup(keys)
        if None not in found:
            return np.array(found, dtype=np.int64), np.zeros(0, dtype=np.int64)
        rows = np.array(found, dtype=np.float64)  # None becomes NaN; rows stay exact far past 2**31
        missing = np.flatnonzero(np.isnan(rows))
        new = [keys[n] for n in missing.tolist()]
        new = [k if k.__class__ is str else str(k) for k in new]
        row_of = self._row_of
        # New ids in order of first appearance (dict.fromkeys keeps it); a key that was not a
        # string may name an id already known.
        fresh = [k for k in dict.fromkeys(new) if k not in row_of]
        reused, self._free = self._free[: len(fresh)], self._free[len(fresh):]
        given = np.concatenate([reused, np.arange(len(self._ids), len(self._ids) + len(fresh) - len(reused))])
        row_of.update(zip(fresh, given.tolist()))
        if len(reused):
            ids = self._ids
            for row, key in zip(reused.tolist(), fresh):
                ids[row] = key
            self._stale = True
        self._ids += fresh[len(reused):]
        rows[missing] = list(map(row_of.__getitem__, new))
        return rows.astype(np.int64), given

    def _lookup(self, keys: Sequence[object]) -> list[int | None]:
        try:
            return list(map(self._row_of.get, keys))
        except TypeError:  # an unhashable key: it is its text that is the id
            return [self._row_of.get(k) if k.__class__ is str else None for k in keys]

    def new_id_positions(self, keys: Sequence[object], limit: int) -> int:
        """Where in ``keys`` the ``limit + 1``-th distinct id not in the map first appears
        (``len(keys)`` if fewer are new): the events before it add at most ``limit`` ids.

        >>> IdMap(["a"]).new_id_positions(["a", "b", "b", "c", "d"], 1)
        3
        """
        if isinstance(keys, CodedIds):
            codes = keys.codes
            values = keys.values  # in order of first appearance
            unknown = [n for n, row in enumerate(self._lookup(values)) if row is None]
            if len(unknown) <= limit:
                return len(codes)
            return int(np.argmax(codes == unknown[limit]))
        seen: set = set()
        row_of = self._row_of
        for position, key in enumerate(keys):
            text = key if key.__class__ is str else str(key)
            if text not in row_of and text not in seen:
                if len(seen) == limit:
                    return position
                seen.add(text)
        return len(keys)

    def forget(self, rows: np.ndarray) -> None:
        """Drop the ids of ``rows`` (held ones); their rows go to the free list."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) == 0:
            return
        ids, row_of = self._ids, self._row_of
        for row in rows.tolist():
            del row_of[ids[row]]
            ids[row] = ""
        self._free = np.union1d(self._free, rows)
        self._stale = True

    def get(self, key: object) -> int | None:
        """Row of ``key``, or None if it was never seen (or forgotten)."""
        return self._row_of.get(str(key))

    def id_of(self, row: int) -> str:
        return self._ids[row]

    def ids_of(self, rows: Iterable[int]) -> list[str]:
        ids = self._ids
        return [ids[r] for r in rows]

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids as (UTF-8 bytes, end offsets): compact, and loadable without pickle. A free
        row holds the empty id (see :attr:`free`).

        Only ids added since the previous call are encoded: a checkpoint of a
        million users does not re-encode them all every time (unless rows were reused).
        """
        if self._stale:  # encode anew
            self._encoded, self._stale = (b"", np.zeros(0, dtype=np.int64)), False
        blob, ends = self._encoded
        new = [k.encode() for k in self._ids[len(ends):]]
        if new:
            base = int(ends[-1]) if len(ends) else 0
            added = base + np.cumsum(np.fromiter(map(len, new), dtype=np.int64, count=len(new)))
            blob, ends = blob + b"".join(new), np.concatenate([ends, added])
            self._encoded = (blob, ends)
        return np.frombuffer(blob, dtype=np.uint8), ends

    def encoded(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ids of ``rows`` encoded as :meth:`to_arrays` does: (bytes, end offsets, each row's
        place in them). That is the whole map's encoding while ids are only added; once rows
        were reused, only these ids, until the next :meth:`to_arrays` (a checkpoint), so that a
        publishing round does not re-encode a million ids for a few thousand.

        >>> ids = IdMap(["a", "b", "c"]); ids.forget(np.array([1])); _ = ids.rows(["bee"])
        >>> blob, ends, at = ids.encoded(np.array([2, 1, 2]))
        >>> [blob[(ends[n - 1] if n else 0):ends[n]].tobytes().decode() for n in at.tolist()]
        ['c', 'bee', 'c']
        """
        rows = np.asarray(rows, dtype=np.int64)
        if not self._stale:
            blob, ends = self.to_arrays()
            return blob, ends, rows
        unique, at = np.unique(rows, return_inverse=True)
        keys = [key.encode() for key in self.ids_of(unique.tolist())]
        ends = np.cumsum(np.fromiter(map(len, keys), dtype=np.int64, count=len(keys)))
        return np.frombuffer(b"".join(keys), dtype=np.uint8), ends, at.astype(np.int64)

    @classmethod
    def from_arrays(cls, blob: np.ndarray, ends: np.ndarray, free: np.ndarray | None = None) -> IdMap:
        """Inverse of :meth:`to_arrays` (and :attr:`free`).

        >>> IdMap.from_arrays(*IdMap(["a", "bé", "7"]).to_arrays()).ids
        ['a', 'bé', '7']
        >>> ids = IdMap(["a", "b", "c"]); ids.forget(np.array([0, 1]))
        >>> back = IdMap.from_arrays(*ids.to_arrays(), ids.free)
        >>> back.get("c"), back.get("a"), back.free.tolist()
        (2, None, [0, 1])
        """
        data = blob.tobytes()
        starts = [0, *ends[:-1].tolist()]
        if free is None or len(free) == 0:
            return cls(data[a:b].decode() for a, b in zip(starts, ends.tolist()))
        out = cls()
        out._ids = [data[a:b].decode() for a, b in zip(starts, ends.tolist())]
        out._free = np.unique(np.asarray(free, dtype=np.int64))
        held = np.ones(len(out._ids), dtype=bool)
        held[out._free] = False
        out._row_of = {out._ids[row]: row for row in np.flatnonzero(held).tolist()}
        return out

    @property
    def ids(self) -> list[str]:
        """All ids in row order (do not mutate)."""
        return self._ids
