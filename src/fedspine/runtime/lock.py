"""One process per run directory: an exclusive lock held from before the build to the summary.

Two ``fedspine run --out X`` started together would both find ``X`` empty and interleave their records;
two ``--resume`` of one directory would write the same round twice. Each run therefore holds an
exclusive ``flock`` on ``X/.lock`` for its whole life. The lock is the kernel's: it goes away with the
process, so a run killed with SIGKILL never leaves a stale lock that blocks its own ``--resume``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedspine.errors import RunDirectoryError

LOCK_FILE = ".lock"


def is_empty_run_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but (possibly) a lock file."""
    return all(p.name == LOCK_FILE for p in run_dir.iterdir())


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the directory); RunDirectoryError if another process has it.

    A directory this call created is removed again when the body fails before writing anything else,
    so bad input leaves no trace.
    """
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise RunDirectoryError(f"cannot use {run_dir} as a run directory: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryError(
                f"another fedspine process is using {run_dir}; wait for it or choose another directory"
            ) from None
        try:
            yield
        except BaseException:
            if created and is_empty_run_dir(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    finally:
        os.close(fd)


__all__ = ["LOCK_FILE", "is_empty_run_dir", "run_lock"]
