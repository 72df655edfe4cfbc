"""`meterdrop serve`: the SFTP and FTPS servers, the drop-folder watcher and the processor.

The hand-off between the two sides is the file system only: a server publishes a
complete upload under its final name and tells the watcher; the watcher hands ready
files to the processor, which opens the database for each batch and closes it after,
so `meterdrop query` and the DuckDB CLI can read it between batches.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fileserver.drops import sweep_partials
from fileserver.ftps import FtpsServer
from fileserver.guard import Guard, GuardPolicy
from fileserver.sftp import start_sftp_server, stop_sftp_server
from fileserver.users import UserStore
from processor.ingest import Ingester, Limits, Outcome
from processor.readahead import ReadAhead
from processor.store import StoppedWaiting, open_store, refuse_other_files
from processor.watcher import DropWatcher

log = logging.getLogger("meterdrop")


@dataclass(frozen=True)
class ServeConfig:
    data_dir: Path
    database: Path
    certs_dir: Path
    host: str
    sftp_port: int
    ftps_port: int
    passive_ports: range
    public_host: str | None
    max_upload_bytes: int | None
    timezone: str | None
    guard: GuardPolicy = field(default_factory=GuardPolicy)
    max_connections_per_ip: int = 10
    idle_timeout: int = 300
    max_file_bytes: int = Limits().max_file_bytes
    db_wait: float = 3600.0


HOLD_SECONDS = 1.0  # longest the server keeps the database to itself while others may wait
YIELD_SECONDS = 0.2  # then it lets go this long, so `meterdrop query` and the DuckDB CLI get in


def _ingest_batch(
    config: ServeConfig, paths: list[Path], stopping: threading.Event | None = None,
    names: Callable[[Path], Path] | None = None,
) -> list[Path]:  # fmt: skip
    """Ingest ready files, small ones in groups sharing a transaction (``Ingester.ingest_group``),
    letting go of the database every second so readers are not shut out.

    Once ``stopping`` is set (SIGTERM) no new slice starts: a burst's backlog could take a
    minute, and the files left (returned) are still in the drop folder or kept by the
    watcher, not in the ledger, so the next start takes them. ``names``: the watcher's
    ``delivered``, the path the ledger records for each file.
    """
    remaining = list(paths)
    limits = Limits(max_file_bytes=config.max_file_bytes)
    with ReadAhead() as read_ahead:  # the next files are parsed while a group merges, and during the pause
        while remaining:
            if stopping is not None and stopping.is_set():
                log.info("stopping: %d file(s) left for the next start", len(remaining))
                return remaining
            try:
                store = open_store(config.database, wait=config.db_wait, checkpoint_on_close=False, stop=stopping,
                                   on_wait=lambda why: log.warning("database busy (%s); waiting", why))  # fmt: skip
            except StoppedWaiting:  # another process holds the database, and SIGTERM came
                log.info("stopping: %d file(s) left for the next start", len(remaining))
                return remaining
            with store:
                ingester = Ingester(store, timezone=config.timezone, limits=limits, read_ahead=read_ahead)
                deadline = time.monotonic() + HOLD_SECONDS
                while True:  # at least one file per slice, however short the slice
                    outcomes = ingester.ingest_group(remaining, until=deadline, names=names)
                    del remaining[: len(outcomes)]
                    for outcome in outcomes:
                        _log_outcome(outcome)
                    if not remaining or time.monotonic() >= deadline:
                        break
            if remaining:
                time.sleep(YIELD_SECONDS)
    return []


def _log_outcome(outcome: Outcome) -> None:
    if outcome.status == "rejected":
        log.warning("rejected %s (%s): %s", outcome.path, outcome.format or "format unknown", outcome.detail)
    elif outcome.status == "unchanged":  # a rescan's known files: thousands at a start, so only with -v
        log.debug("unchanged %s (%s)", outcome.path, outcome.detail)
    else:
        log.info("%s %s (%s, %d rows)", outcome.status, outcome.path, outcome.format, outcome.rows)


class AlreadyServed(Exception):
    """Another ``meterdrop serve`` runs on the same data dir."""


def _serve_alone(data_dir: Path) -> IO[str]:
    """Hold ``DATA_DIR/.serve.lock`` for this process's life; AlreadyServed if another has it.

    A second server on the same data dir once swept the first one's uploads in progress
    at its start (as partials left by a crash), even when it then failed to bind.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / ".serve.lock", "a+")  # noqa: SIM115 - held open until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise AlreadyServed(f"{data_dir} is already served by process {holder} (`meterdrop serve`)") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


async def serve(config: ServeConfig) -> None:
    """Run until SIGINT or SIGTERM."""
    lock = _serve_alone(config.data_dir)  # first: the sweep below must never meet a running server
    try:
        await _serve(config)
    finally:
        lock.close()


async def _serve(config: ServeConfig) -> None:
    users = UserStore(config.data_dir)
    guard = Guard(config.guard)
    config.certs_dir.mkdir(parents=True, exist_ok=True)
    config.database.parent.mkdir(parents=True, exist_ok=True)
    refuse_other_files(config.database)  # at start, not at every batch
    drop_root = users.drop_root
    drop_root.mkdir(parents=True, exist_ok=True)
    if swept := sweep_partials(drop_root):
        log.info("removed %d unfinished upload(s) left by an earlier run", swept)
    stopping = threading.Event()
    watcher = DropWatcher(drop_root, lambda paths: _ingest_batch(config, paths, stopping, watcher.delivered))
    # Both servers bind their ports before anything starts: a port in use ends the start
    # with its reason, and no thread is left running (one left running aborted the exit).
    ftps = FtpsServer(
        host=config.host, port=config.ftps_port, passive_ports=config.passive_ports, users=users, guard=guard,
        certs_dir=config.certs_dir, public_host=config.public_host, max_upload_bytes=config.max_upload_bytes,
        max_connections_per_ip=config.max_connections_per_ip, idle_timeout=config.idle_timeout,
        on_published=watcher.notify, on_replacing=watcher.keep,
    )  # fmt: skip
    sftp = None
    try:
        sftp = await start_sftp_server(
            host=config.host, port=config.sftp_port, users=users, guard=guard, certs_dir=config.certs_dir,
            max_upload_bytes=config.max_upload_bytes, on_published=watcher.notify, on_replacing=watcher.keep,
        )  # fmt: skip
        ftps.start()
        watcher.start()  # uploads published before this wait in its queue, and its scan sees them
    except BaseException:
        if sftp is not None:
            await stop_sftp_server(sftp)
        ftps.stop()
        watcher.stop()
        raise
    sftp_port = sftp.sockets[0].getsockname()[1] if sftp.sockets else config.sftp_port
    log.info("SFTP on %s:%d, FTPS on %s:%d (passive %d-%d)", config.host, sftp_port, *ftps.address,
             config.passive_ports.start, config.passive_ports.stop - 1)  # fmt: skip
    log.info("drop folder %s, database %s", drop_root, config.database)
    if not users.everyone():
        log.warning("no users yet: add one with `meterdrop users add NAME --password-stdin`")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        stopping.set()
        await stop_sftp_server(sftp)
        ftps.stop()
        watcher.stop()
