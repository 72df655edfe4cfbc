"""Reading ahead: the next small files hashed and parsed while the database merges.

In a burst of small deliveries, each 1 MB file costs about 20 ms of hashing, parsing and
typing, and its group's MERGE and COMMIT then keep the database busy for most of a
second, during which the parsing waited (bench/README.md). None of that work needs the
database, so a thread of its own does it for the files that come next, and the ingest
takes the results when it reaches each file. Only successes are kept: a file that fails
to parse here is parsed again in line, so its reason is given exactly as before.

A result is used only if the file's size, times and inode are still those seen before
and after it was read; otherwise the file is read again. What it holds is what the ingest
would have computed from the same bytes, so the outcome is the same with or without it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from processor import panoramic
from processor.csvfile import HEADER_LIMIT, read_blocks, read_header
from processor.headers import normalise_all

AHEAD_BYTES = 32 * 1024 * 1024  # files read ahead and not yet taken, at most (their parsed rows are held)
AHEAD_FILE_BYTES = 8 * 1024 * 1024  # larger files are left to the ingest (they go alone, in blocks)
Signature = tuple[int, int, int, int]


def sha256_file(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def signature(info: os.stat_result) -> Signature:
    """What changes when a file is written or replaced: size, modification and change times, inode."""
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino


@dataclass(frozen=True)
class Prepared:
    """One file as read ahead: its first bytes, its hash, and, for measurements, its typed rows."""

    signature: Signature
    head: bytes
    sha256: str
    format: str | None = None  # the measurement format the rows were typed as
    blocks: tuple[tuple[pl.DataFrame, int], ...] = ()  # (typed rows, the block's row count)


def prepare(path: Path) -> Prepared | None:
    """Read, hash and (for a measurement file) parse ``path``; None if it is not worth it or changed."""
    before = path.stat()
    if not stat.S_ISREG(before.st_mode) or before.st_size > AHEAD_FILE_BYTES:
        return None
    with path.open("rb") as stream:
        head = stream.read(HEADER_LIMIT)
    sha = sha256_file(path)
    fmt_name: str | None = None
    blocks: tuple[tuple[pl.DataFrame, int], ...] = ()
    try:
        header = read_header(head)
        fields = normalise_all(header.names)
        fmt = panoramic.detect(fields)
        if isinstance(fmt, panoramic.MeasurementFormat):
            blocks = tuple(
                (panoramic.typed_rows(fmt, fields, block.frame, block.first_line), block.frame.height)
                for block in read_blocks(path, header)
            )
            fmt_name = fmt.name
    except Exception:  # parsed again in line, where the reason is given
        fmt_name, blocks = None, ()
    if signature(path.stat()) != signature(before):
        return None  # written while it was read: the ingest reads it again
    return Prepared(signature(before), head, sha, fmt_name, blocks)


class ReadAhead:
    """Prepares the files named by ``ahead`` on one thread, in order, for ``take`` to collect.

    At most ``budget`` bytes of files are prepared and not yet taken. Files that are never
    taken (the ingest stopped early) are dropped by ``close``.
    """

    def __init__(self, budget: int = AHEAD_BYTES) -> None:
        self.budget = budget
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        self._waiting: OrderedDict[Path, tuple[Future[Prepared | None], int]] = OrderedDict()
        self._lock = threading.Lock()

    def ahead(self, paths: Sequence[Path]) -> None:
        """Start on the first of ``paths`` not started yet, while the budget lasts."""
        with self._lock:
            held = sum(size for _, size in self._waiting.values())
            for path in paths:
                if path in self._waiting:
                    continue
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if size > AHEAD_FILE_BYTES:
                    continue
                if held + size > self.budget:
                    break
                self._waiting[path] = (self._pool.submit(_quietly, path), size)
                held += size

    def take(self, path: Path, info: os.stat_result) -> Prepared | None:
        """The file as read ahead, if it was and has not changed since (waits if it is being read)."""
        with self._lock:
            waiting = self._waiting.pop(path, None)
        if waiting is None:
            return None
        prepared = waiting[0].result()
        return prepared if prepared is not None and prepared.signature == signature(info) else None

    def close(self) -> None:
        with self._lock:
            for future, _ in self._waiting.values():
                future.cancel()
            self._waiting.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quietly(path: Path) -> Prepared | None:
    """``prepare``, with any failure (the file vanished, a disk error) left for the ingest to meet."""
    try:
        return prepare(path)
    except Exception:  # the ingest reads the file itself and reports what it finds
        return None
