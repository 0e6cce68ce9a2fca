"""Durable, atomic checkpoints of the whole learned state and the input offsets it corresponds to.

A checkpoint is two files in the checkpoint directory:

- ``ckpt-<seq>.npz``: the arrays (an uncompressed npz as ``np.savez`` writes it, loadable
  without pickle; the zip's CRC-32 of each array is checked as it is read);
- ``ckpt-<seq>.json``: the metadata, including the npz's size (and, from checkpoints written
  before 2026-11-28, its SHA-256, still checked).

Each is written to a temporary name, fsynced and renamed, the npz first; the
JSON is the commit point, so a checkpoint exists only once both are complete,
and the previous one stays valid until then. On load, the newest checkpoint
whose JSON parses and whose npz has its size and reads back with every CRC
matching wins; a damaged one is reported and skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import time
import warnings
import zipfile
from collections.abc import Callable
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


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as ``np.savez`` stores them, each written from its own memory in one call.

    ``np.savez`` copies every array in 16 MB pieces before writing it; at a million users a
    checkpoint is a gigabyte, and the writer is a forked child whose life is the consumer's
    copy-on-write window, so the copies and a second pass to hash the file are left out (the zip
    keeps a CRC-32 per array, which loading checks).
    """
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(array))
                if array.nbytes:
                    out.write(memoryview(array).cast("B"))


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
        _write_atomically(data_path, lambda f: _write_npz(f, arrays))
        meta = {**meta, "format": FORMAT_VERSION, "seq": seq, "created_at_ms": int(time.time() * 1000),
                "data_file": data_path.name, "data_bytes": data_path.stat().st_size}
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
                if data_path.stat().st_size != meta["data_bytes"]:
                    raise ValueError("size mismatch")
                if "sha256" in meta and _sha256(data_path) != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                with np.load(data_path, allow_pickle=False) as npz:  # (each read checks its CRC-32)
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


def _die_with_parent(parent: int) -> None:
    """In a forked child: be killed when ``parent`` dies (Linux), and exit now if it already has.

    A writer outliving a ``kill -9`` of its service would race the restarted service's own
    checkpoints in the same directory."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent check below still covers a parent already gone
    if os.getppid() != parent:
        os._exit(1)


class BackgroundCheckpointWriter:
    """Writes one checkpoint at a time in a forked child, so the consumer pays only for the fork.

    The child sees the state as it was at the fork (copy-on-write pages: the parent's later
    writes copy only the pages they touch), writes it, reports through a pipe and exits; the
    caller collects the outcome (and commits) when it is done. The child runs only numpy, file
    and hash code, never a lock another thread of the service may have held at the fork (Kafka
    clients, logging, the model lock), and ``os._exit``s without running the parent's atexit hooks.
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._child: tuple[int, int] | None = None  # pid, read end of its pipe
        self._payload: Any = None
        self._outcome: tuple[Any, Path | None, BaseException | None] | None = None

    @property
    def busy(self) -> bool:
        if self._child is None:
            return False
        pid, _ = self._child
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            return True
        self._finish(status)
        return False

    def start(self, snapshot: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]], payload: Any = None) -> None:
        """Write ``snapshot()`` (called in the child: views of the live arrays are enough)."""
        if self.busy:
            raise RuntimeError("a checkpoint is already being written")
        read_end, write_end = os.pipe()
        parent = os.getpid()
        with warnings.catch_warnings():
            # Python 3.12+ warns on fork in a threaded process; the child avoids what makes it unsafe.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_end)
                _die_with_parent(parent)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.nice(10)  # the consumer comes first when they want the same core
                path = self.store.save(*snapshot())
                os.write(write_end, b"ok\n" + str(path).encode())
                code = 0
            except BaseException as exc:  # reported to the parent through the pipe
                os.write(write_end, f"error\n{type(exc).__name__}: {exc}".encode()[:4000])
            finally:
                os._exit(code)
        os.close(write_end)
        self._child, self._payload = (pid, read_end), payload

    def _finish(self, status: int) -> None:
        _, read_end = self._child
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        self._child = None
        kind, _, detail = report.partition("\n")
        if kind == "ok" and os.waitstatus_to_exitcode(status) == 0:
            self._outcome = (self._payload, Path(detail), None)
        else:
            reason = detail or f"the writer exited with status {os.waitstatus_to_exitcode(status)}"
            self._outcome = (self._payload, None, CheckpointWriteFailed(reason))

    def wait(self) -> None:
        if self._child is not None:
            _, status = os.waitpid(self._child[0], 0)
            self._finish(status)

    def take_outcome(self) -> tuple[Any, Path | None, BaseException | None] | None:
        """(payload, path, error) of a finished write, once; None while writing or idle."""
        if self.busy or self._outcome is None:
            return None
        outcome, self._outcome = self._outcome, None
        return outcome


class CheckpointWriteFailed(RuntimeError):
    """The checkpoint writer reported an error (the message is its own) or died."""
