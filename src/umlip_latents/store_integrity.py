"""Integrity of feature-store entries and shards, and one writer per entry.

- :func:`file_records` / :func:`verify_files`: the size and sha256 of each file an entry or a
  shard holds, recorded when it is written. Sizes are checked on every open; the sha256 on the
  first open of a file (path, size, modification time) in a process, so a damaged file (random
  bytes, reordered rows, truncated, missing) is found and a memory-mapped read stays cheap.
- :func:`acquire` / :func:`release`: an exclusive ``fcntl.flock`` on a lock file beside the
  entry. A second writer waits for the first, then finds the finished entry. The lock files
  stay (removing one while another process waits on it would let two writers in).
"""

from __future__ import annotations

import os
from pathlib import Path

from .datasets import sha256_file
from .errors import EntryDamaged, StoreError

#: files whose sha256 this process has verified: (path, size, mtime_ns, sha256)
_VERIFIED: set = set()


def file_records(folder: Path, names: list[str]) -> dict:
    """``{name: {"size": bytes, "sha256": hex}}`` of the files ``names`` in ``folder``."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in names}


def verify_files(folder: Path, records: dict, what: str) -> None:
    """Check each recorded file of ``folder``: present, of its size, and (once per process) its sha256.

    Raises
    ------
    EntryDamaged
        Naming ``what`` (the entry or shard) and the file.
    """
    for name, record in records.items():
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            raise EntryDamaged(f"{what}: {name} is missing") from None
        if st.st_size != record["size"]:
            raise EntryDamaged(f"{what}: {name} has {st.st_size} bytes, {record['size']} were written "
                               "(truncated or replaced)")
        stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns, record["sha256"])
        if stamp in _VERIFIED:
            continue
        if sha256_file(path) != record["sha256"]:
            raise EntryDamaged(f"{what}: {name} does not match the sha256 recorded when it was written "
                               "(changed on disk)")
        _VERIFIED.add(stamp)


def acquire(lock: Path, what: str) -> int:
    """Hold an exclusive lock on the file ``lock`` (created with its folders), waiting for another holder.

    Returns the descriptor to pass to :func:`release`.

    Raises
    ------
    StoreError
        When the folder cannot be written (a read-only store, a path through a file).
    """
    import fcntl

    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise StoreError(f"{what}: cannot write the feature store at {lock.parent} ({exc.strerror or exc}); "
                         "set UMLIP_LATENTS_STORE (or store=...) to a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    """Release a lock taken by :func:`acquire`."""
    os.close(fd)  # closing the descriptor drops its flock
