"""Who is writing a run directory: an exclusive ``flock`` on ``.<name>.lock`` beside it, held by the
process that writes the run (unlearn's runs and audits) and released by the OS when that process ends,
however it ends. So a reader (``knowtrace summary``, ``unlearn audit``, ``--resume``) tells a run at work
from one whose process died without recording its end: :func:`live_state`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

_HELD: set[str] = set()  # run directories this process holds the lock of (the lock is re-entrant per process)


def lock_file(out: Path) -> Path:
    """The lock of run directory ``out``: keyed on the real directory, so a symlinked --out finds the same lock."""
    resolved = Path(out).resolve()
    return resolved.parent / f".{resolved.name}.lock"


@contextlib.contextmanager
def run_dir_lock(out: Path, wait: bool = False, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on run directory ``out`` so that two processes never write one directory
    (one's ``--overwrite`` or clean-up would delete the other's files): ``flock`` on ``.<name>.lock``
    beside it (removing the directory cannot drop it; the OS releases it if the process dies). Held
    elsewhere: an error, or with ``wait`` block until free (figure scripts then reuse the finished
    run). ``enabled=False`` (the non-main processes of a multi-process run): no lock."""
    path = lock_file(out)
    key = str(Path(out).resolve())
    if not enabled or key in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RuntimeError(f"run directory {out} is being written by another process (lock {path}); wait for it "
                               f"to finish or choose another --out") from None
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        os.close(fd)  # releases the lock


def lock_held(run: Path) -> bool:
    """Whether a process holds the run directory's lock now (is writing it)."""
    if str(Path(run).resolve()) in _HELD:
        return True
    path = lock_file(run)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def live_state(run: Path, recorded: str) -> str:
    """The state a run's manifest records, read against its lock: a ``running`` run whose lock nobody holds
    was killed (``interrupted``); ``running`` and ``trained`` runs whose lock is held are ``running``."""
    if recorded in ("running", "trained"):  # by the lock: still at work, or killed without a word
        return "running" if lock_held(run) else "interrupted" if recorded == "running" else recorded
    return recorded
