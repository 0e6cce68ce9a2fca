"""Building an Annoy index for maximum-inner-product search, out of process.

Annoy's ``dot`` metric is broken in 1.17.3 (annoy issue #619), so inner
products are reduced to angular distance: each item ``x = [q, b]`` gets one
more coordinate ``sqrt(M^2 - |x|^2)`` (``M`` the largest norm), which puts
every item on the sphere of radius ``M``; the query ``[p, 1, 0]`` then ranks
items by ``p.q + b`` exactly.

The build runs in a child process (``python -m recstream.index.build``):
``add_item`` and ``save`` hold the GIL, and a build in a thread of the
consumer slowed its update loop about 3x, against 1.06x for a subprocess.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

_ADD_SLICE = 65_536  # points converted to Python lists at a time in the build child


def mips_item_vectors(vectors: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Items as angular-search points: ``[q, b, sqrt(M^2 - |q|^2 - b^2)]``.

    >>> import numpy as np
    >>> pts = mips_item_vectors(np.array([[3.0, 0.0], [0.0, 1.0]]), np.zeros(2))
    >>> np.linalg.norm(pts, axis=1).round(6).tolist()
    [3.0, 3.0]
    """
    x = np.hstack([vectors, biases[:, None]]).astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    extra = np.sqrt(np.maximum(sq.max(initial=0.0) - sq, 0.0))
    return np.hstack([x, extra[:, None]]).astype(np.float32)


def mips_query(user_vector: np.ndarray) -> list[float]:
    """A user vector as an angular query matching :func:`mips_item_vectors`."""
    return [*user_vector.tolist(), 1.0, 0.0]


class BuildCancelled(RuntimeError):
    """The build was asked to stop (the service is shutting down); its child was killed."""


def build_in_subprocess(points: np.ndarray, out_path: Path, n_trees: int, timeout_s: float,
                        cancel: threading.Event | None = None, rows: np.ndarray | None = None) -> None:
    """Build an angular Annoy index of ``points`` into ``out_path`` in a child process; point ``n``
    gets id ``rows[n]`` (default ``n``: Annoy skips the ids no point has).

    The file appears at ``out_path`` only once complete (written to a temp
    name, then renamed), so a reader never maps a half-written index. Setting
    ``cancel`` kills the child within a tenth of a second (BuildCancelled): a
    build takes minutes on a large catalogue, and SIGTERM must not wait for it.
    """
    out_path = Path(out_path)
    points_path = out_path.with_suffix(".points.npy")
    rows_path = out_path.with_suffix(".rows.npy")
    tmp_path = out_path.with_suffix(".building")
    np.save(points_path, points)
    command = [sys.executable, "-m", "recstream.index.build", str(points_path), str(tmp_path), str(n_trees)]
    if rows is not None:
        np.save(rows_path, np.asarray(rows, dtype=np.int64))
        command.append(str(rows_path))
    errors: list[bytes] = []
    stop = cancel or threading.Event()
    try:
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as child:
            # Read as it comes: a full pipe would block the child.
            reader = threading.Thread(target=lambda: errors.append(child.stderr.read()), daemon=True)
            reader.start()
            deadline = time.monotonic() + timeout_s
            while child.poll() is None:
                if stop.wait(0.1) or time.monotonic() > deadline:
                    child.kill()
                    child.wait()
                    if stop.is_set():
                        raise BuildCancelled("index build cancelled")
                    raise subprocess.TimeoutExpired(child.args, timeout_s)
            reader.join()
            if child.returncode != 0:
                raise RuntimeError(f"index build failed: {b''.join(errors).decode(errors='replace').strip()}")
        os.replace(tmp_path, out_path)
    finally:
        points_path.unlink(missing_ok=True)
        rows_path.unlink(missing_ok=True)
        tmp_path.unlink(missing_ok=True)


def _build(points_path: str, out_path: str, n_trees: int, rows_path: str | None = None) -> None:
    from annoy import AnnoyIndex

    points = np.load(points_path, mmap_mode="r")
    ids = np.load(rows_path).tolist() if rows_path else range(len(points))
    index = AnnoyIndex(points.shape[1], "angular")
    index.set_seed(1)
    index.on_disk_build(out_path)
    add_item = index.add_item
    # In slices: one list of a million rows would hold tens of millions of Python floats at once.
    for start in range(0, len(points), _ADD_SLICE):
        for row, point in zip(ids[start:start + _ADD_SLICE], points[start:start + _ADD_SLICE].tolist()):
            add_item(row, point)
    index.build(n_trees, n_jobs=1)
    index.unload()


def _yield_cpu() -> None:
    """Run only on CPU time nobody else wants: a late index is better than a stalled stream.

    SCHED_IDLE (Linux) ranks below every normal process whatever its nice value; a build
    that cannot finish under full load is killed after ``index.build_timeout_s`` and retried.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: the lowest nice value instead
        os.nice(19)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build an angular Annoy index from a .npy of points.")
    parser.add_argument("points")
    parser.add_argument("out")
    parser.add_argument("n_trees", type=int)
    parser.add_argument("rows", nargs="?", help="a .npy of each point's id (default: its position)")
    args = parser.parse_args()
    _yield_cpu()
    _build(args.points, args.out, args.n_trees, args.rows)


if __name__ == "__main__":
    main()
