"""Parsing one item-metadata record (``{"item_id", "features", "text"}``): the topic's and the file's format."""

from __future__ import annotations

import orjson

_SCALARS = (str, int, float, bool)


def parse_item_metadata(value: bytes | None) -> tuple[str, dict | None, str | None]:
    """``(item_id, features, text)`` of one record, or a ValueError naming what is wrong.

    Feature values must be scalars or flat lists of scalars: that is all
    ``metadata_features`` turns into features, and a nested value (a thousand
    levels fit in 2 KB) would make it recurse until Python gives up, on the
    consumer thread, for every restart that reads the record again.

    >>> parse_item_metadata(b'{"item_id": 7, "features": {"genres": ["Drama"], "year": 1995}, "text": "Heat"}')
    ('7', {'genres': ['Drama'], 'year': 1995}, 'Heat')
    >>> parse_item_metadata(b'{"item_id": "a", "features": {"g": [["x"]]}}')
    Traceback (most recent call last):
    ...
    ValueError: features.g must be a string, a number or a list of them
    """
    if value is None:
        raise ValueError("empty message (null value)")
    try:
        item = orjson.loads(value)
    except orjson.JSONDecodeError as exc:  # also past orjson's nesting limit (1024)
        raise ValueError(f"invalid JSON: {exc}") from None
    if item.__class__ is not dict:
        raise ValueError("not a JSON object")
    item_id = item.get("item_id")
    if item_id.__class__ not in (str, int) or item_id == "":  # (bool is not int here)
        raise ValueError("item_id must be a non-empty string or an integer")
    features, text = item.get("features"), item.get("text")
    if features is not None:
        if features.__class__ is not dict:
            raise ValueError("features must be an object")
        for key, v in features.items():
            if not (isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v))):
                raise ValueError(f"features.{key} must be a string, a number or a list of them")
    if text is not None and text.__class__ is not str:
        raise ValueError("text must be a string")
    return str(item_id), features, text
