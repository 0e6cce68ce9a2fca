"""Doctest collection imports this checkout's modules under the installed package's names.

pytest would import ``embeddings/history.py`` as ``embeddings.history``: a second copy of the
module beside ``recstream.embeddings.history``, whose numba kernels, first compiled there, are
cached on disk under a module name that no other process can import (a service started after
``make test`` then fails to load its kernels). Registering every module under both names makes
the doctests run in the one ``recstream.*`` module.
"""

import importlib
import pkgutil
import sys

import recstream

for _package in ("embeddings", "evaluation", "index", "stream"):
    _parent = importlib.import_module(f"recstream.{_package}")
    sys.modules.setdefault(_package, _parent)
    for _info in pkgutil.iter_modules(_parent.__path__):
        _module = importlib.import_module(f"recstream.{_package}.{_info.name}")
        sys.modules.setdefault(f"{_package}.{_info.name}", _module)
del recstream
