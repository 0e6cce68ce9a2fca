"""Content features for items (genres, tags, text): vectors for items nobody has interacted with yet.

Each item's metadata becomes a set of sparse features (``genres=Comedy``,
``tags=funny``, hashed words of its text), each weighted ``1/sqrt(n)``. A
ridge regression from features to the item vectors and biases that
interactions have taught the model (items with at least ``min_count``
events) is refit online, and every cold item (fewer events) gets the
regression's prediction as its vector and bias: a new comedy starts where
the comedies users liked are, so it can be recommended before anyone clicks it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping

import numpy as np
from recstream.embeddings.ids import IdMap
from recstream.embeddings.model import OnlineMF

_WORD = re.compile(r"[a-z0-9]+")


def metadata_features(features: Mapping[str, object] | None, text: str | None = None,
                      text_buckets: int = 2048) -> list[str]:
    """Feature names of one item's metadata.

    Lists and ``|``-joined strings give one feature per element; numbers and
    other scalars one feature; text is a hashed bag of words (a fixed number of
    buckets, so the vocabulary cannot grow without bound).

    >>> metadata_features({"genres": "Comedy|Drama", "tags": ["funny"], "year": 1995}, "Toy Story", 16)
    ['genres=Comedy', 'genres=Drama', 'tags=funny', 'year=1995', 'text#8', 'text#14']
    """
    out: list[str] = []
    for key, value in (features or {}).items():
        values = value if isinstance(value, (list, tuple)) else str(value).split("|")
        out += [f"{key}={str(v).strip().lower() if key == 'tags' else str(v).strip()}" for v in values
                if str(v).strip()]
    if text:
        buckets = sorted({zlib.crc32(w.encode()) % text_buckets for w in _WORD.findall(text.lower())})
        out += [f"text#{b}" for b in buckets]
    return list(dict.fromkeys(out))


class ItemContent:
    """Which features each item has (feature ids are collisionless, as item ids are)."""

    def __init__(self) -> None:
        self.features = IdMap()
        self._of_item: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._of_item)

    def set(self, item_row: int, names: Iterable[str]) -> None:
        self._of_item[item_row] = self.features.rows(list(names))

    def items(self) -> np.ndarray:
        return np.fromiter(self._of_item.keys(), dtype=np.int64, count=len(self._of_item))

    def matrix(self, item_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR (indptr, feature rows, weights 1/sqrt(n)) of those items' features."""
        lists = [self._of_item.get(int(i), np.zeros(0, np.int64)) for i in item_rows]
        counts = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        indptr = np.concatenate([[0], np.cumsum(counts)])
        columns = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        weights = np.repeat(1.0 / np.sqrt(np.maximum(counts, 1)), counts)
        return indptr, columns, weights

    def to_arrays(self) -> dict[str, np.ndarray]:
        rows = self.items()
        indptr, columns, _ = self.matrix(rows)
        blob, ends = self.features.to_arrays()
        return {"items": rows, "indptr": indptr, "features": columns, "name_bytes": blob, "name_ends": ends}

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.features = IdMap.from_arrays(arrays["name_bytes"], arrays["name_ends"])
        indptr = arrays["indptr"]
        self._of_item = {int(item): np.array(arrays["features"][indptr[n]:indptr[n + 1]], dtype=np.int64)
                         for n, item in enumerate(arrays["items"].tolist())}


def _dense(indptr: np.ndarray, columns: np.ndarray, weights: np.ndarray, n_features: int) -> np.ndarray:
    out = np.zeros((len(indptr) - 1, n_features), dtype=np.float64)
    out[np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), columns] = weights
    return out


class ContentProjector:
    """Ridge regression from item features to ``[item vector, item bias]``."""

    def __init__(self, regularization: float = 1.0) -> None:
        self.regularization = regularization
        self.weights: np.ndarray | None = None  # (n_features, dim + 1)

    def fit(self, model: OnlineMF, content: ItemContent, min_count: int) -> int:
        """Refit on the warm items that have features; returns how many were used."""
        rows = content.items()
        rows = rows[model.interaction_counts(rows) >= min_count]
        n_features = len(content.features)
        if len(rows) == 0 or n_features == 0:
            return 0
        X = _dense(*content.matrix(rows), n_features)
        Y = np.hstack([model.items.vectors[rows], model.items.biases[rows, None]]).astype(np.float64)
        gram = X.T @ X + self.regularization * np.eye(n_features)
        self.weights = np.linalg.solve(gram, X.T @ Y)
        return len(rows)

    def predict(self, content: ItemContent, item_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = _dense(*content.matrix(item_rows), len(content.features))
        if self.weights is None:
            raise ValueError("fit the projector first")
        out = X @ self.weights[: X.shape[1]]
        return out[:, :-1].astype(np.float32), out[:, -1].astype(np.float32)


def refresh_cold_items(model: OnlineMF, content: ItemContent, projector: ContentProjector,
                       min_count: int = 5) -> int:
    """Refit the projector, then give every cold item with features its content vector and bias.

    Returns the number of items refreshed (they count as changed for the index).
    """
    if projector.fit(model, content, min_count) == 0:
        return 0
    rows = content.items()
    rows = rows[(rows < len(model.items)) & (model.interaction_counts(rows) < min_count)]
    if len(rows):
        vectors, biases = projector.predict(content, rows)
        model.set_item_rows(rows, vectors, biases)
    return len(rows)
