"""Durable, atomic checkpoints of the whole learned state and the input offsets it corresponds to.

A checkpoint is two files in the checkpoint directory:

- ``ckpt-<seq>.npz``: the arrays (plain ``np.savez``, loadable without pickle);
- ``ckpt-<seq>.json``: the metadata, including the npz's size and SHA-256.

Each is written to a temporary name, fsynced and renamed, the npz first; the
JSON is the commit point, so a checkpoint exists only once both are complete,
and the previous one stays valid until then. On load, the newest checkpoint
whose JSON parses and whose npz matches its checksum wins; a damaged one is
reported and skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class IncompatibleCheckpoint(ValueError):
    """The stored state cannot be used with the current configuration."""


@dataclass
class Checkpoint:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # 0600: checkpoints hold user ids and histories, readable by the service's user alone.
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """Writes and finds checkpoints in one directory, keeping the newest ``keep``."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # also when an older version made it with the umask's mode
        self.keep = keep

    def _existing(self) -> list[tuple[int, Path]]:
        found = []
        for meta in self.directory.glob("ckpt-*.json"):
            try:
                found.append((int(meta.stem.split("-")[1]), meta))
            except (IndexError, ValueError):
                continue
        return sorted(found, reverse=True)

    def save(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
        """Write a new checkpoint durably; returns the path of its metadata file.

        Refuses (ValueError) state holding NaN or inf: restored, it would poison the model again
        after every restart, and the previous checkpoint is a better place to resume from."""
        for name, array in arrays.items():
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                raise ValueError(f"{name} holds NaN or inf: refusing to write it to a checkpoint")
        existing = self._existing()
        seq = existing[0][0] + 1 if existing else 1
        data_path = self.directory / f"ckpt-{seq:012d}.npz"
        meta_path = data_path.with_suffix(".json")
        _write_atomically(data_path, lambda f: np.savez(f, **arrays))
        meta = {**meta, "format": FORMAT_VERSION, "seq": seq, "created_at_ms": int(time.time() * 1000),
                "data_file": data_path.name, "data_bytes": data_path.stat().st_size, "sha256": _sha256(data_path)}
        _write_atomically(meta_path, lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode()))
        _fsync_dir(self.directory)
        for _, old_meta in existing[self.keep - 1:]:
            self._remove(old_meta)
        return meta_path

    def record_commit(self, offsets: dict[str, int]) -> None:
        """Remember the offsets this state dir committed to its group (merged with earlier ones).

        On assign a group offset equal to ours is known to be ours, not another
        member's progress: after falling back to an older checkpoint, the events
        since it are then read again instead of skipped.
        """
        merged = {**self.last_commits(), **offsets}
        _write_atomically(self.directory / "commits.json", lambda f: f.write(json.dumps(merged).encode()))

    def last_commits(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads((self.directory / "commits.json").read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _remove(self, meta_path: Path) -> None:
        meta_path.unlink(missing_ok=True)
        meta_path.with_suffix(".npz").unlink(missing_ok=True)

    def load_latest(self) -> Checkpoint | None:
        """The newest intact checkpoint, or None if there is none."""
        for _, meta_path in self._existing():
            try:
                meta = json.loads(meta_path.read_text())
                data_path = self.directory / meta["data_file"]
                if data_path.stat().st_size != meta["data_bytes"] or _sha256(data_path) != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                with np.load(data_path, allow_pickle=False) as npz:
                    arrays = {name: npz[name] for name in npz.files}
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
                log.error("checkpoint %s is damaged (%s); falling back to the previous one", meta_path.name, exc)
                continue
            return Checkpoint(arrays, meta, meta_path)
        return None


class StateDirInUse(RuntimeError):
    """Another process holds the state dir: two writers would interleave their checkpoints."""


class StateDirLock:
    """An exclusive lock on a state dir (``flock`` on ``<dir>/lock``), held while the process uses
    it; the kernel drops it when the process dies, so a crash leaves no stale lock behind.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> first = StateDirLock(d)
    >>> try:
    ...     StateDirLock(d)
    ... except StateDirInUse as exc:
    ...     print(str(exc).split(" is ")[1].split(" (")[0])
    in use by another recstream process
    >>> first.release(); StateDirLock(d).release()
    """

    def __init__(self, state_dir: str | Path) -> None:
        directory = Path(state_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / "lock"
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise StateDirInUse(f"state dir {directory} is in use by another recstream process (pid {holder}); "
                                "stop it, or give this one another --state-dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    __del__ = release  # a service that failed to start must not keep the dir locked


class BackgroundCheckpointWriter:
    """Writes one checkpoint at a time on a thread of its own, so the consumer only pays for the
    snapshot; the caller collects the outcome (and commits) when it is done."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._thread: threading.Thread | None = None
        self._outcome: tuple[Any, Path | None, BaseException | None] | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], payload: Any = None) -> None:
        if self.busy:
            raise RuntimeError("a checkpoint is already being written")

        def write() -> None:
            try:
                self._outcome = (payload, self.store.save(arrays, meta), None)
            except BaseException as exc:  # reported to the caller by take_outcome()
                self._outcome = (payload, None, exc)

        self._thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def take_outcome(self) -> tuple[Any, Path | None, BaseException | None] | None:
        """(payload, path, error) of a finished write, once; None while writing or idle."""
        if self.busy or self._outcome is None:
            return None
        outcome, self._outcome = self._outcome, None
        return outcome
