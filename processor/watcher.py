"""The drop folder watcher: every complete file that appears is handed to the processor.

Uploads become visible by a rename when complete (the servers' contract), so a moved-in
or published file is ready at once.  A file copied in by hand appears first and is
written afterwards, perhaps by several writers one after another (``cat a >> f; cat b
>> f``): it is ready once its size and modification time have stood still for ``settle``
seconds, so a slow hand copy is ingested once, complete.  The kernel is not asked for
per-write events at all: an upload in progress writes thousands of them, and handling
them in Python took a third of the SFTP server's speed (bench/README.md).  At start
the whole tree is scanned, so a file that arrived while meterdrop was down is not missed.
The scan is handed over newest file first, ``RESCAN_BATCH`` files at a time and only
when no fresh delivery is waiting: recognising a file the ledger already has costs the
processor a query (about 1.3 ms with 5,000 files in the ledger, 3 ms with 50,000), so a
full pass over a large drop folder takes minutes, and new deliveries, and the files that
arrived while meterdrop was down (the newest), must not wait behind it.  The order does
not change the result: newest-wins compares delivery times, not processing order.
Hidden names (a leading dot) are never taken: they are uploads in progress; nor are
the temporary names upload clients write before renaming (``*.tmp``, ``*.part``,
``*.filepart``, ``*.partial``, ``*.crdownload``), nor symlinks. A delivery that a server
is about to replace (the same name delivered again) is first hard-linked into
``drop/.deliveries/`` (``keep``) and ingested from there under its own path.

A batch that fails (the processor raised: the disk holding the database is full, the
database cannot be written) is not dropped until the next start: each of its files is
tried again on its own, after 2 s, then 4, 8, ... up to 30 s between tries, for as long
as it keeps failing.  Files are ingested whole or not at all and a file already in the
ledger is recognised at once, so trying again is always safe; trying one file at a time
keeps a file that always fails from holding up the others.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger("meterdrop.watcher")
# Processes ready files; returns those it left for later (serve stopping), or None for none.
Batch = Callable[[list[Path]], "Sequence[Path] | None"]
PENDING = ".deliveries"  # under the drop root: a link to each replaced delivery until it is ingested


TEMPORARY_SUFFIXES = (".tmp", ".part", ".filepart", ".partial", ".crdownload")
RESCAN_BATCH = 100  # files of the start-up scan handed over at once, between fresh deliveries


def visible(path: Path, root: Path) -> bool:
    """Not hidden anywhere below the drop root, not a client's temporary name, not a symlink.

    A symlink planted in the drop folder (the servers refuse to make one) could point at
    any file the server may read; it is never taken, nor is a file reached through one.
    """
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return False
    return (
        bool(parts)
        and not any(part.startswith(".") for part in parts)
        and not parts[-1].lower().endswith(TEMPORARY_SUFFIXES)
        and not path.is_symlink()
        and os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)
    )


def scan(root: Path) -> Iterator[Path]:
    """Every visible file under ``root``, in name order."""
    for folder, dirs, files in os.walk(root, onerror=_unlisted):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if visible(Path(folder) / name, root):
                yield Path(folder) / name


def _unlisted(error: OSError) -> None:
    log.warning("cannot list %s (%s): its files wait until it can be read", error.filename,
                error.strerror or error)  # fmt: skip


def _named(paths: list[Path], shown: int = 3) -> str:
    """Which files a log line is about, without flooding it when a batch is large."""
    names = ", ".join(str(p) for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class DropWatcher(FileSystemEventHandler):
    """Watches ``root`` and calls ``process`` with batches of ready files, on one thread.

    ``process`` runs on the watcher's worker thread, one batch at a time, so the database
    has a single writer; files that become ready meanwhile wait for the next batch.
    """

    def __init__(self, root: Path, process: Batch, *, settle: float = 2.0, batch_wait: float = 0.2,
                 retry_first: float = 2.0, retry_max: float = 30.0) -> None:  # fmt: skip
        self.root = root
        self.process = process
        self.settle = settle
        self.batch_wait = batch_wait
        self.retry_first = retry_first
        self.retry_max = retry_max
        # files whose batch failed: when to try each again, and the wait that was used
        self._retry: dict[Path, tuple[float, float]] = {}
        self._ready: queue.Queue[Path | None] = queue.Queue()
        self._rescan: collections.deque[Path] = collections.deque()  # the start-up scan, newest first
        # created or closed by hand, waiting for its size and time to stand still
        self._quiet: dict[Path, tuple[float, tuple[int, int] | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer = Observer()
        self._worker = threading.Thread(target=self._work, name="meterdrop-ingest", daemon=True)
        self._pending = root / PENDING
        self._links = itertools.count()

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(
            self, str(self.root), recursive=True,
            event_filter=[FileCreatedEvent, FileMovedEvent, DirMovedEvent, FileClosedEvent],
        )  # fmt: skip
        self._observer.start()  # watch first, then scan: nothing falls between the two
        # Deliveries published before a stop and not ingested yet: first, before the scan.
        if self._pending.is_dir():
            for path in sorted(p for p in self._pending.rglob("*") if p.is_file() and not p.is_symlink()):
                self._ready.put(path)
        found = [(signature, path) for path in scan(self.root) if (signature := _signature(path)) is not None]
        found.sort(key=lambda item: (-item[0][1], str(item[1])))  # newest first
        self._rescan.extend(path for _, path in found)
        self._worker.start()

    def stop(self) -> None:
        """Stop watching and wait for the batch in hand; also safe before (or after a failed) ``start``."""
        self._stop.set()
        self._observer.stop()
        self._ready.put(None)
        if self._observer.is_alive():
            self._observer.join()
        if self._worker.is_alive():
            self._worker.join()

    def notify(self, path: Path) -> None:
        """A server published ``path``: it is complete now."""
        if visible(path, self.root):
            with self._lock:
                self._quiet.pop(path, None)
            self._ready.put(path)

    def keep(self, path: Path) -> None:
        """A server is about to replace the delivery at ``path`` (the same name delivered again).

        Its turn may not have come yet: an export job writing one name again and again lost
        every delivery but the last. So the file is first hard-linked into ``PENDING`` and
        the link handed over; the servers call this and then replace, one at a time. If the
        delivery was ingested already, the ledger knows it (same path, size and time) and
        the link costs one lookup. The link keeps the content and its delivery time.
        """
        if not visible(path, self.root) or not path.is_file():
            return
        target = self._pending / f"{time.time_ns():x}-{next(self._links)}" / path.relative_to(self.root)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target, follow_symlinks=False)
        except OSError as error:
            log.warning("cannot keep %s before it is replaced (%s): if it was not ingested yet, it is lost",
                        path, error.strerror or error)  # fmt: skip
            self._remove_link(target)
            return
        self._ready.put(target)

    def delivered(self, path: Path) -> Path:
        """The drop-folder path a file handed to ``process`` was delivered as (itself, or what its link keeps)."""
        try:
            relative = path.relative_to(self._pending)
        except ValueError:
            return path
        return self.root.joinpath(*relative.parts[1:])

    def _remove_link(self, path: Path) -> None:
        """Drop a link once its delivery is in the ledger, and the folders made for it."""
        try:
            relative = path.relative_to(self._pending)
        except ValueError:
            return
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder != self._pending and folder.is_relative_to(self._pending / relative.parts[0]):
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent

    # -- events ----------------------------------------------------------------------------
    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirMovedEvent):
            # A folder moved in whole (e.g. unpacked elsewhere, then moved): take its files.
            destination = Path(os.fsdecode(event.dest_path))
            if visible(destination, self.root):
                for path in scan(destination):
                    self._ready.put(path)
            return
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self.notify(Path(os.fsdecode(event.dest_path)))
        elif isinstance(event, FileCreatedEvent | FileClosedEvent):
            path = Path(os.fsdecode(event.src_path))
            if visible(path, self.root):
                with self._lock:
                    self._quiet[path] = (time.monotonic(), _signature(path))

    # -- the worker --------------------------------------------------------------------------
    def _due(self) -> list[Path]:
        """Files whose size and time have not changed for ``settle`` seconds."""
        now = time.monotonic()
        due = []
        with self._lock:
            for path, (since, seen) in list(self._quiet.items()):
                current = _signature(path)
                if current != seen:
                    self._quiet[path] = (now, current)
                elif now - since >= self.settle:
                    due.append(path)
                    del self._quiet[path]
        return due

    def _fresh(self, wait: bool) -> list[Path]:
        """Files handed over since the last batch; with ``wait``, wait a little for the first."""
        batch: list[Path] = []
        try:
            item = self._ready.get(timeout=min(self.settle, 0.5)) if wait else self._ready.get_nowait()
            if item is not None:
                batch.append(item)
            # Gather what arrives together (a burst of uploads) into one batch.
            deadline = time.monotonic() + self.batch_wait
            while (left := deadline - time.monotonic()) > 0:
                item = self._ready.get(timeout=left)
                if item is not None:
                    batch.append(item)
        except queue.Empty:
            pass
        return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._fresh(wait=not self._rescan) + self._due()
            if not batch and self._rescan:  # nothing fresh: the next slice of the start-up scan
                batch = [self._rescan.popleft() for _ in range(min(RESCAN_BATCH, len(self._rescan)))]
            unique = list(dict.fromkeys(p for p in batch if p.is_file()))
            if unique and not self._stop.is_set():
                self._attempt(unique)
            self._retry_due()

    def _attempt(self, paths: list[Path]) -> bool:
        """Process ``paths``; on failure, schedule each for a retry of its own and say so once."""
        try:
            left = set(self.process(paths) or ())
        except Exception as error:  # the watcher must outlive a failing batch: try its files again later
            first = not any(p in self._retry for p in paths)
            delay = self._schedule(paths)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            log.error("ingest of %s failed (%s); trying again in %g s", _named(paths), reason, delay,
                      exc_info=first)  # fmt: skip
            return False
        for path in paths:
            self._retry.pop(path, None)
            if path not in left:  # (left: stopping; its link stays for the next start)
                self._remove_link(path)
        return True

    def _schedule(self, paths: list[Path]) -> float:
        """Back off per file: ``retry_first`` seconds, doubling up to ``retry_max``; the longest wait."""
        now = time.monotonic()
        longest = 0.0
        for path in paths:
            previous = self._retry.get(path)
            delay = min(previous[1] * 2, self.retry_max) if previous else self.retry_first
            self._retry[path] = (now + delay, delay)
            longest = max(longest, delay)
        return longest

    def _retry_due(self) -> None:
        """Try again, one file at a time, the failed files whose wait is over."""
        now = time.monotonic()
        due = sorted((when, path) for path, (when, _) in self._retry.items() if when <= now)
        for _, path in due:
            if self._stop.is_set():
                return
            if not path.is_file():  # gone meanwhile (renamed away): nothing left to ingest
                self._retry.pop(path, None)
                continue
            if self._attempt([path]):
                log.info("ingest of %s succeeded on retry", path)
