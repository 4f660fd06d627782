"""One lock per GPU around the work that must not overlap a timed launch.

Timed stages (screen, benchmark) hold it exclusively; correctness checks and a spare worker's
CUDA start-up and warm-up hold it shared, so they may overlap each other but never a timing.
The lock is an advisory flock on a file named after the device, so every worker process on the
machine (of this search or another) honours it, and it dies with the process that holds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def gpu_lock(path: str | os.PathLike | None, exclusive: bool, wait: bool = True):
    """Hold the device's lock for the block; a no-op without a path (nothing else shares the GPU).

    wait=False: take it only if it is free now; the block gets True when it holds the lock."""
    if not path:
        yield True
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock
