"""The drop folder watcher: every complete file that appears is handed to the processor.

Uploads become visible by a rename when complete (the servers' contract), so a moved-in
or published file is ready at once.  A file copied in by hand appears first and is
written afterwards, perhaps by several writers one after another (``cat a >> f; cat b
>> f``): it is ready once its size and modification time have stood still for ``settle``
seconds, so a slow hand copy is ingested once, complete.  The kernel is not asked for
per-write events at all: an upload in progress writes thousands of them, and handling
them in Python took a third of the SFTP server's speed (bench/README.md).  At start
the whole tree is scanned, so a file that arrived while meterdrop was down is not missed.
Hidden names (a leading dot) are never taken: they are uploads in progress; nor are
the temporary names upload clients write before renaming (``*.tmp``, ``*.part``,
``*.filepart``, ``*.partial``, ``*.crdownload``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
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
Batch = Callable[[list[Path]], None]


TEMPORARY_SUFFIXES = (".tmp", ".part", ".filepart", ".partial", ".crdownload")


def visible(path: Path, root: Path) -> bool:
    """Not hidden anywhere below the drop root, and not a client's temporary name."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return False
    return (
        bool(parts)
        and not any(part.startswith(".") for part in parts)
        and not parts[-1].lower().endswith(TEMPORARY_SUFFIXES)
    )


def scan(root: Path) -> Iterator[Path]:
    """Every visible file under ``root``, in name order."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if visible(Path(folder) / name, root):
                yield Path(folder) / name


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

    def __init__(self, root: Path, process: Batch, *, settle: float = 2.0, batch_wait: float = 0.2) -> None:
        self.root = root
        self.process = process
        self.settle = settle
        self.batch_wait = batch_wait
        self._ready: queue.Queue[Path | None] = queue.Queue()
        # created or closed by hand, waiting for its size and time to stand still
        self._quiet: dict[Path, tuple[float, tuple[int, int] | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer = Observer()
        self._worker = threading.Thread(target=self._work, name="meterdrop-ingest", daemon=True)

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(
            self, str(self.root), recursive=True,
            event_filter=[FileCreatedEvent, FileMovedEvent, DirMovedEvent, FileClosedEvent],
        )  # fmt: skip
        self._observer.start()  # watch first, then scan: nothing falls between the two
        for path in scan(self.root):
            self._ready.put(path)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._observer.stop()
        self._ready.put(None)
        self._observer.join()
        self._worker.join()

    def notify(self, path: Path) -> None:
        """A server published ``path``: it is complete now."""
        if visible(path, self.root):
            with self._lock:
                self._quiet.pop(path, None)
            self._ready.put(path)

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

    def _work(self) -> None:
        while not self._stop.is_set():
            batch: list[Path] = []
            try:
                item = self._ready.get(timeout=min(self.settle, 0.5))
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
            batch += self._due()
            unique = list(dict.fromkeys(p for p in batch if p.is_file()))
            if unique and not self._stop.is_set():
                try:
                    self.process(unique)
                except Exception:  # the watcher must outlive one bad batch; the ledger has the rest
                    log.exception(
                        "ingest of %d file(s) failed; they will be retried at the next start", len(unique)
                    )
