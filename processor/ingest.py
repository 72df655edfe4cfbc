"""One delivered file into the database, exactly once, whole or not at all.

Every file ends in the ledger as ``ingested``, ``duplicate`` or ``rejected`` with a
reason; its rows and its ledger entry commit in one DuckDB transaction, so a crash at
any point leaves all of it or none of it, and running again finishes the job.
"""

from __future__ import annotations

import errno
import logging
import lzma
import os
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import duckdb
import polars as pl

from processor import catalog, panoramic
from processor.csvfile import BOM, HEADER_LIMIT, ONE_PIECE_BYTES, read_blocks, read_header
from processor.errors import Rejected
from processor.headers import normalise_all
from processor.readahead import Prepared, ReadAhead, Signature, sha256_file, signature
from processor.store import DELIVERY_VERSION, GREENBUTTON_KEYS, PROVENANCE, UPDATED_VERSION, Delivery, Store
from processor.timezones import system_timezone

if TYPE_CHECKING:
    from processor.greenbutton.espi import EspiResult

# The Green Button parsers (and lxml) are imported where a file needs them: a third of the
# imports' time that `meterdrop ingest` of Panoramic files would pay at every start.

log = logging.getLogger("meterdrop.ingest")
Status = Literal["ingested", "duplicate", "rejected", "unchanged"]
STATUSES: tuple[Status, ...] = ("ingested", "duplicate", "unchanged", "rejected")
ZIP_MAGIC = b"PK\x03\x04"
# Measurement files above this are appended as read, then settled; up to it a file is one block
# and one MERGE. A 243 MB file merged in 64 MiB blocks peaked at 1.16 / 1.55 GiB (first / again),
# appended at 0.88 / 0.93 GiB, 5-10% slower (bench/README.md).
APPEND_BYTES = ONE_PIECE_BYTES
CSV_SLICE_ROWS = 1_000_000  # in slices of this many rows (a 1 GB re-delivery: 4.9 GiB in one MERGE)
LARGE_FEED_BYTES = 16 * 1024 * 1024  # ESPI feeds above this are appended as parsed (about 80k readings)
PARALLEL_APPEND_BYTES = 256 * 1024 * 1024  # and up to this size beside the parser (Store.appending)
ESPI_MERGE_ROWS = 200_000  # Green Button interval rows merged per statement
GROUP_FILE_BYTES = 8 * 1024 * 1024  # files up to this size may share a transaction with others
GROUP_BYTES = 64 * 1024 * 1024  # and a group holds at most this much
UNHASHED_BINARY_BYTES = 64 * 1024 * 1024  # binary files above this are refused before hashing
RowsCallback = Callable[[int], None]
# Errors of the machine, not of the file: the file is tried again later, never rejected for them.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.ENOMEM,
                              errno.EMFILE, errno.ENFILE})  # fmt: skip
# What a damaged or unusual ZIP member raises when read: encrypted (RuntimeError), Deflate64
# (NotImplementedError), a corrupt stream (zlib.error, lzma.LZMAError, EOFError, BadZipFile).
_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, RuntimeError, NotImplementedError,
                  UnicodeDecodeError, OSError)  # fmt: skip


CHANGED_TRIES = 3  # reads of a file that changes under the ingest before it is rejected


class _ChangedWhileRead(Exception):
    """The file changed between its hash and the end of its parse: that read is dropped."""


def transient(error: BaseException) -> bool:
    """An OSError that says the disk or the machine is in trouble (full, read-only, out of files)."""
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS


@dataclass(frozen=True)
class Outcome:
    """What happened to one file; ``unchanged`` means the ledger already had it."""

    path: str
    status: Status
    format: str | None = None
    rows: int = 0
    detail: str | None = None
    file_id: int | None = None
    members: tuple[Outcome, ...] = ()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NOT_A_FILE = "not a regular file (a named pipe, socket or device): not read"


def ledger_name(path: Path) -> str:
    """The path as the ledger and the rows' ``source_path`` hold it: text, whatever its bytes.

    A name that is not UTF-8 (a file copied in from a Latin-1 system: ``caf\xe9.csv``) comes
    to Python with its stray bytes as surrogates, which DuckDB cannot store; they are
    written as ``\xe9`` instead, so the file is still ingested, under a name that shows its bytes.
    """
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return name


def delivery_time(path: Path) -> datetime:
    """A file's delivery time: its modification time, which the servers set on completion."""
    return datetime.fromtimestamp(path.stat().st_mtime_ns // 1000 / 1_000_000, tz=UTC)


def _groupable_size(path: Path) -> int | None:
    """The size of a file that may join a group: small and not a ZIP (None: it goes alone)."""
    try:
        info = path.stat()
        if info.st_size > GROUP_FILE_BYTES or not stat.S_ISREG(info.st_mode):
            return None  # (opening a named pipe would wait for a writer)
        size = info.st_size
        with path.open("rb") as stream:
            return None if stream.read(len(ZIP_MAGIC)) == ZIP_MAGIC else size
    except OSError:
        return None


def _unrecognised(header_names: list[str]) -> Rejected:
    shown = ", ".join(name.strip() for name in header_names[:12])
    more = f" (+{len(header_names) - 12} more)" if len(header_names) > 12 else ""
    return Rejected(f"unrecognised format: CSV header [{shown}{more}] is not a known export")


def looks_like_xml(head: bytes) -> bool:
    text = head.removeprefix(BOM).lstrip()
    return text.startswith(b"<") and (
        b"http://naesb.org/espi" in head or b"http://www.w3.org/2005/Atom" in head
    )


def _large_feed(head: bytes, size: int) -> bool:
    """A Green Button XML feed big enough to be appended as parsed, on DuckDB's small budget."""
    return looks_like_xml(head) and size > LARGE_FEED_BYTES


def _sniff(head: bytes) -> None:
    """Refuse what is plainly not a CSV export before any parsing."""
    if not head:
        raise Rejected("unrecognised format: empty file")
    if b"\x00" in head:
        raise Rejected(f"unrecognised format: binary data (starts with {head[:8].hex(' ')})")


@dataclass(frozen=True)
class Limits:
    """What meterdrop refuses to unpack or parse, so hostile files fail fast and small."""

    max_file_bytes: int = 4 * 1024**3
    max_archive_bytes: int = 4 * 1024**3  # total uncompressed size of one ZIP's members
    max_archive_ratio: int = 200  # uncompressed / compressed, per member over 1 MiB
    max_archive_members: int = 10_000
    max_archive_depth: int = 3


@dataclass(frozen=True)
class _Pending:
    """Rows of one file waiting for its group's merge."""

    table: str
    rows: pl.DataFrame
    key: tuple[str, ...]
    version: tuple[str, ...]


@dataclass(frozen=True)
class Loaded:
    format: str
    rows: int
    note: str | None = None
    timezone: str | None = None


class Ingester:
    """Loads files into one Store; ``on_rows`` hears of rows as blocks are written.

    ``timezone`` is the IANA zone for local-time CSV downloads (``--timezone``); when
    None, a utility's own zone or the system zone is used and recorded in the ledger.
    """

    def __init__(self, store: Store, on_rows: RowsCallback | None = None, *, timezone: str | None = None,
                 limits: Limits | None = None, read_ahead: ReadAhead | None = None) -> None:  # fmt: skip
        self.store = store
        self.read_ahead = read_ahead  # groups have their next files hashed and parsed by it
        self.on_rows = on_rows or (lambda n: None)
        self.timezone = timezone
        self.limits = limits or Limits()
        self._pending: list[_Pending] | None = None  # rows held back while a group is open
        # within one ZIP (nested ones included): content refused already, where, and why
        self._refused: dict[str, tuple[str, str]] | None = None

    def ingest(self, path: Path) -> Outcome:
        path = Path(os.path.abspath(path))
        return self._ingest(path, ledger_name(path), None, depth=0)

    def ingest_group(
        self,
        paths: Sequence[Path],
        *,
        until: float | None = None,
        names: Callable[[Path], Path] | None = None,
    ) -> list[Outcome]:
        """Ingest small files from the front of ``paths`` in one transaction; their outcomes.

        A transaction and a MERGE per table cost DuckDB a tenth of a second whatever the
        rows, which capped the server at about ten small deliveries a second. A group
        parses files one after another (each still ingested, duplicate or rejected on
        its own: a bad file's rows are dropped before anything is written), then merges
        every table's rows of the whole group at once, newest version per key first,
        and commits them with the ledger entries. The result equals ingesting the files
        one by one. The group ends at the first large file or ZIP (which go alone), at
        ``GROUP_BYTES`` or when ``until`` (a ``time.monotonic()``) has passed; at least
        one file is always taken. Should the group's merge fail, it is rolled back and
        its files are ingested one at a time. ``names`` gives the path the ledger records
        for a file read elsewhere (the watcher's link to a delivery).
        """
        if not paths:
            return []

        def name_of(path: Path) -> str:
            return ledger_name(names(path) if names is not None else path)

        first = Path(os.path.abspath(paths[0]))
        if _groupable_size(first) is None:
            return [self._ingest(first, name_of(first), None, depth=0)]
        taken: list[Path] = []
        budget = GROUP_BYTES
        try:
            with self.store.transaction():
                self._pending = []
                outcomes = []
                absolute = [Path(os.path.abspath(path)) for path in paths]
                for index, path in enumerate(absolute):
                    size = _groupable_size(path)
                    if taken and (
                        size is None or size > budget or (until is not None and time.monotonic() >= until)
                    ):
                        break
                    taken.append(path)
                    budget -= size or 0
                    outcome = self._ingest(path, name_of(path), None, depth=0)
                    outcomes.append(outcome)
                    if self.read_ahead is not None and outcome.status != "unchanged":
                        # New deliveries: the next ones are likely new too (a rescan's files,
                        # all in the ledger already, are not read ahead for nothing).
                        self.read_ahead.ahead(absolute[index + 1 :])
                self._flush_pending()
        except duckdb.Error:
            return [self._ingest(path, name_of(path), None, depth=0) for path in taken]
        finally:
            self._pending = None
        return outcomes

    def _flush_pending(self) -> None:
        """The group's rows, one MERGE per table, the newest version of each key only."""
        pending, self._pending = self._pending or [], None
        for table in dict.fromkeys(p.table for p in pending):
            parts = [p for p in pending if p.table == table and p.rows.height]
            if not parts:
                continue
            key, version = list(parts[0].key), list(parts[0].version)
            if tuple(version) == DELIVERY_VERSION:
                # One delivery's rows share delivered_at and source_path and are unique per key
                # already: ordering the deliveries (stably, so a file's blocks stay in line
                # order) is enough for the last row of a key to be its newest version.
                parts.sort(key=lambda p: (p.rows["delivered_at"][0], p.rows["source_path"][0]))
            rows = pl.concat([p.rows for p in parts], how="diagonal_relaxed")
            if len(parts) > 1:
                if tuple(version) != DELIVERY_VERSION:
                    rows = rows.sort(version)
                rows = rows.unique(subset=key, keep="last", maintain_order=False)
            self.store.merge(table, rows, key, version)

    def _ingest(self, real: Path, name: str, delivered: datetime | None, *, depth: int) -> Outcome:
        """One file; ``name`` is what the ledger calls it (``archive.zip!member`` for members).

        The file is read twice (hashed, then parsed): should it change in between (replaced
        by hand, or rewritten in place), its ledger entry could name one content's hash
        and hold the other's rows. Such a read is dropped and the file read again.
        """
        for _ in range(CHANGED_TRIES):
            try:
                return self._ingest_once(real, name, delivered, depth=depth)
            except _ChangedWhileRead:
                log.info("%s changed while it was read: reading it again", name)
        try:
            size = real.stat().st_size
        except OSError:
            size = 0
        return self._reject_unread(name, size, delivered, f"kept changing while it was read ({CHANGED_TRIES} tries); "
                                   "it is read again when it is delivered again or on the next run")  # fmt: skip

    def _ingest_once(self, real: Path, name: str, delivered: datetime | None, *, depth: int) -> Outcome:
        try:
            info = real.stat()
            size = info.st_size
            if not stat.S_ISREG(info.st_mode):  # reading a named pipe would wait for a writer, forever
                return self._reject_unread(name, size, delivered, NOT_A_FILE)
            if size > self.limits.max_file_bytes:
                return self._reject_unread(name, size, delivered, f"file of {size:,} bytes is over the "
                                           f"{self.limits.max_file_bytes:,}-byte limit")  # fmt: skip
            prepared = (
                self.read_ahead.take(real, info) if self.read_ahead is not None and depth == 0 else None
            )
            delivered_at = delivered or delivery_time(real)
            seen = self.store.known_unchanged(name, size, delivered_at)
            if seen is not None:  # a rescan at start: no need to hash it again
                return Outcome(name, "unchanged", seen.format, seen.rows or 0,
                               f"already {seen.status} as file #{seen.id}", seen.id)  # fmt: skip
            if prepared is not None:
                head, sha = prepared.head, prepared.sha256
            else:
                with real.open("rb") as stream:
                    head = stream.read(HEADER_LIMIT)
                if size > UNHASHED_BINARY_BYTES and b"\x00" in head and not head.startswith(ZIP_MAGIC):
                    # A large binary upload is refused from its first bytes: hashing 10 GiB first
                    # took 23 s for the same answer (no hash, as for a file over the size limit).
                    try:
                        _sniff(head)
                    except Rejected as error:
                        return self._reject_unread(name, size, delivered_at, error.reason)
                sha = sha256_file(real)
        except OSError as error:
            if transient(error):
                raise
            return Outcome(name, "rejected", detail=f"cannot read file: {error.strerror or error}")
        known = self.store.known(name, sha)
        if known is not None and known.status != "rejected":
            return Outcome(name, "unchanged", known.format, known.rows or 0,
                           f"already {known.status} as file #{known.id}", known.id)  # fmt: skip
        entry = Delivery(
            name, size, sha,
            delivered_at=known.delivered_at if known else delivered_at,
            first_seen_at=known.first_seen_at if known else datetime.now(UTC),
        )  # fmt: skip
        copy = self.store.ingested_copy(sha)
        if copy is not None:
            detail = f"same content as file #{copy.id} {copy.path}"
            with self.store.transaction():
                file_id = known.id if known else self.store.next_file_id()
                self.store.record(entry, file_id=file_id, status="duplicate", format_name=copy.format,
                                  rows=0, error=None, note=detail)  # fmt: skip
            return Outcome(name, "duplicate", copy.format, 0, detail, file_id)
        refused = self._refused.get(sha) if self._refused is not None else None
        if refused is not None and refused[0] != name:  # a copy inside the same ZIP: not unpacked again
            return self._reject(entry, known.id if known else None,
                                Rejected(f"same content as {refused[0]}, rejected: {refused[1]}"))  # fmt: skip
        if head.startswith(ZIP_MAGIC):
            return self._ingest_archive(real, entry, known.id if known else None, depth)
        known_id = known.id if known else None
        if not _large_feed(head, size):
            return self._store(real, name, head, size, entry, known_id, signature(info), prepared)
        report, reported = self.on_rows, 0

        def counting(rows: int) -> None:
            nonlocal reported
            reported += rows
            report(rows)

        self.on_rows = counting
        try:  # a large feed is appended, settled, committed and checkpointed on a small budget
            with self.store.frugal():
                return self._store(real, name, head, size, entry, known_id, signature(info))
        except duckdb.OutOfMemoryException as error:
            # A settle that may replace many stored rows already lifts the budget (their
            # delete marks stay until COMMIT); should anything else outgrow it, the file is
            # rolled back and done again on DuckDB's own budget: more memory, nothing lost.
            log.warning("%s ran out of DuckDB's budget for large feeds (%s); ingesting it again without it",
                        name, str(error).splitlines()[0])  # fmt: skip
        finally:
            self.on_rows = report
        report(-reported)  # the second pass reports its rows again
        return self._store(real, name, head, size, entry, known_id, signature(info))

    def _store(
        self, real: Path, name: str, head: bytes, size: int, entry: Delivery, known_id: int | None,
        read: Signature, prepared: Prepared | None = None,
    ) -> Outcome:  # fmt: skip
        """Parse a new file and store its rows with its ledger entry, or reject it.

        ``read``: the file as it was when hashed; if it is not so any more, nothing is kept.
        """
        held = len(self._pending) if self._pending is not None else 0
        try:
            with self.store.transaction():
                file_id = known_id or self.store.next_file_id()
                if _large_feed(head, size):
                    loaded = self._load_large_feed(real, name, head, size, file_id, entry.delivered_at)
                else:
                    loaded = self._load(real, name, head, size, file_id, entry.delivered_at, prepared)
                if signature(real.stat()) != read:
                    raise _ChangedWhileRead
                self.store.record(entry, file_id=file_id, status="ingested", format_name=loaded.format,
                                  rows=loaded.rows, error=None, note=loaded.note,
                                  timezone=loaded.timezone, retried=known_id is not None)  # fmt: skip
        except _ChangedWhileRead:
            if self._pending is not None:  # in a group, whose transaction goes on without this read
                del self._pending[held:]
                if _large_feed(head, size):
                    self.store.con.execute("DELETE FROM greenbutton_intervals WHERE file_id = ?", [file_id])
            raise
        except (Rejected, pl.exceptions.PolarsError, OSError) as error:
            if transient(error):  # a full disk is not the file's fault: it is tried again later
                raise
            if self._pending is not None:  # in a group: this file's rows must not reach the merge
                del self._pending[held:]
            return self._reject(entry, known_id, error)
        return Outcome(name, "ingested", loaded.format, loaded.rows, loaded.note, file_id)

    def _load_large_feed(
        self, real: Path, name: str, head: bytes, size: int, file_id: int, delivered_at: datetime
    ) -> Loaded:
        """A large ESPI feed: its readings go to their table as they are parsed, then are settled.

        Merging in frames, as small feeds do, would hold the file's whole transaction in
        memory; appending into the file's transaction and settling newest-wins once at the
        end writes each row once, and ``Store.settle`` works in slices within the small
        budget the caller set (``Store.frugal``). An error before COMMIT takes it all back;
        inside a group's transaction (reachable only with changed size settings) the rows
        this file appended are deleted, as the group goes on without them.
        """
        from processor.greenbutton.espi import EspiParser, refuse_dtd

        refuse_dtd(head)
        provenance = self._provenance(file_id, delivered_at, name)
        table = "greenbutton_intervals"
        try:
            with (
                self.store.appending(
                    table, lambda frame: self._greenbutton_rows(frame, provenance),
                    background=size <= PARALLEL_APPEND_BYTES,
                ) as put,
                real.open("rb") as stream,
            ):  # fmt: skip

                def sink(frame: pl.DataFrame) -> None:
                    put(frame)
                    self.on_rows(frame.height)

                result = EspiParser(sink).parse(stream)
        except (Rejected, pl.exceptions.PolarsError, OSError):
            if self._pending is not None:
                self.store.con.execute(f"DELETE FROM {table} WHERE file_id = ?", [file_id])
            raise
        self.store.settle(
            table, GREENBUTTON_KEYS[table], file_id, order="version_at DESC, source_line DESC",
            version=UPDATED_VERSION, slice_by="interval_start",
        )  # fmt: skip
        return self._espi_objects(result, provenance)

    def _reject(
        self, entry: Delivery, known_id: int | None, error: Exception, members: tuple[Outcome, ...] = ()
    ) -> Outcome:
        reason = error.reason if isinstance(error, Rejected) else f"cannot parse: {error}"
        rejected_as = error.format_name if isinstance(error, Rejected) else None
        with self.store.transaction():
            file_id = known_id or self.store.next_file_id()
            self.store.record(entry, file_id=file_id, status="rejected", format_name=rejected_as, rows=None,
                              error=reason, note=None)  # fmt: skip
        if self._refused is not None and entry.sha256 != "unread":
            self._refused.setdefault(entry.sha256, (entry.path, reason))
        return Outcome(entry.path, "rejected", rejected_as, 0, reason, file_id, members)

    def _reject_unread(self, name: str, size: int, delivered: datetime | None, reason: str) -> Outcome:
        """A file refused before hashing (too big, or large and binary): the ledger still gets a row."""
        now = datetime.now(UTC)
        entry = Delivery(name, size, "unread", delivered or now, now)
        return self._reject(entry, None, Rejected(reason))

    # -- formats -------------------------------------------------------------------------
    @staticmethod
    def _provenance(file_id: int | None, delivered_at: datetime, name: str) -> list[pl.Expr]:
        # The time goes in as microseconds: ``pl.lit(datetime)`` took 170 us a call (its time
        # zone is looked up each time), three of them 0.5 ms of a small file's ingest.
        since_epoch = (delivered_at - _EPOCH) // timedelta(microseconds=1)
        return [
            pl.lit(file_id, pl.Int64).alias("file_id"),
            pl.lit(since_epoch, pl.Int64).cast(pl.Datetime("us", "UTC")).alias("delivered_at"),
            pl.lit(name).alias("source_path"),
        ]

    def _load(
        self, real: Path, name: str, head: bytes, size: int, file_id: int, delivered_at: datetime,
        prepared: Prepared | None = None,
    ) -> Loaded:  # fmt: skip
        _sniff(head)
        provenance = self._provenance(file_id, delivered_at, name)
        if looks_like_xml(head):
            return self._load_espi(real, head, provenance)
        header = read_header(head)
        fields = normalise_all(header.names)
        fmt = panoramic.detect(fields)
        if fmt is None:
            from processor.greenbutton.utility_csv import detect_utility_csv

            text = head.removeprefix(BOM).decode("utf-8", errors="replace")
            if detect_utility_csv(text):
                return self._load_utility_csv(real, provenance)
            raise _unrecognised(header.names)
        total = 0
        if fmt == "catalog":
            columns = self.store.add_catalog_columns(catalog.vendor_columns(fields))
            snapshot = pl.lit(delivered_at.date()).alias("snapshot_date")
            for block in read_blocks(real, header):
                rows = catalog.catalog_rows(fields, block.frame, block.first_line)
                rows = rows.with_columns(snapshot, *provenance)
                rows = rows.select(pl.col(c) if c in rows.columns else pl.lit(None, pl.String).alias(c)
                                   for c in columns)  # fmt: skip
                self._write(catalog.TABLE, rows, catalog.KEY)
                total += block.frame.height
            return Loaded(catalog.FORMAT, total)
        ignored = panoramic.check_header(fmt, fields)
        # A file up to APPEND_BYTES is one block and one MERGE. Merged block by block, a larger
        # one's transaction would hold each block's MERGE work until COMMIT (a 187 MB file
        # re-delivered: 1.5 GiB), so its rows are appended as read instead (the database
        # writes them out as it goes) and settled newest-wins in time slices. In a group
        # (only with changed size settings) the group's merge takes them.
        appended = self._pending is None and size > APPEND_BYTES
        typed = (
            prepared.blocks
            if prepared is not None and prepared.format == fmt.name and prepared.blocks
            else (
                (panoramic.typed_rows(fmt, fields, block.frame, block.first_line), block.frame.height)
                for block in read_blocks(real, header)
            )
        )
        for rows, height in typed:
            rows = rows.with_columns(*provenance).select(*fmt.column_names(), *PROVENANCE)
            if appended:
                self.store.append(fmt.table, rows)
                self.on_rows(rows.height)
            else:
                self._write(fmt.table, rows, fmt.key)
            total += height
        if appended:
            self.store.settle(fmt.table, fmt.key, file_id, order="source_line DESC", version=DELIVERY_VERSION,
                              slice_by="measurement_time", slice_rows=CSV_SLICE_ROWS)  # fmt: skip
        note = f"ignored columns not in {fmt.label}: {', '.join(ignored)}" if ignored else None
        return Loaded(fmt.name, total, note)

    def _write(self, table: str, rows: pl.DataFrame, key: Iterable[str]) -> None:
        """Within a file the last row for a key wins, so only that one reaches the merge.

        Most files repeat no key. Counting distinct key hashes tells so in 40% of the time
        ``unique`` takes, and equal keys always hash alike: a collision only costs ``unique``.
        """
        key = tuple(key)
        repeats = rows.select(pl.struct(*key).hash().n_unique()).item() != rows.height
        unique = rows.unique(subset=list(key), keep="last", maintain_order=False) if repeats else rows
        self._merge(table, unique, key, DELIVERY_VERSION)
        self.on_rows(rows.height)

    def _write_versioned(self, table: str, rows: pl.DataFrame) -> None:
        """Green Button rows: the newest ``version_at`` (Atom updated) per key wins within a file."""
        key = list(GREENBUTTON_KEYS[table])
        unique = rows.sort("version_at", "source_line").unique(subset=key, keep="last", maintain_order=False)
        self._merge(table, unique, tuple(key), UPDATED_VERSION)

    def _merge(self, table: str, rows: pl.DataFrame, key: tuple[str, ...], version: tuple[str, ...]) -> None:
        """Merge now, or, inside a group, when the group's files are all parsed."""
        if self._pending is None:
            self.store.merge(table, rows, key, version)
        else:
            self._pending.append(_Pending(table, rows, key, version))

    def _greenbutton_rows(self, frame: pl.DataFrame, provenance: list[pl.Expr]) -> pl.DataFrame:
        return frame.with_columns(*provenance).with_columns(
            pl.coalesce("updated_at", "delivered_at").alias("version_at")
        )

    def _load_espi(self, real: Path, head: bytes, provenance: list[pl.Expr]) -> Loaded:
        from processor.greenbutton.espi import EspiParser, refuse_dtd

        refuse_dtd(head)
        pending: list[pl.DataFrame] = []

        def write_pending() -> None:
            if pending:
                rows = pl.concat(pending)
                pending.clear()
                self._write_versioned("greenbutton_intervals", self._greenbutton_rows(rows, provenance))

        def sink(frame: pl.DataFrame) -> None:
            # Typed frames are small; merging fewer, larger ones saves DuckDB's per-statement cost.
            pending.append(frame)
            if sum(f.height for f in pending) >= ESPI_MERGE_ROWS:
                write_pending()
            self.on_rows(frame.height)

        with real.open("rb") as stream:
            result = EspiParser(sink).parse(stream)
        write_pending()
        return self._espi_objects(result, provenance)

    def _espi_objects(self, result: EspiResult, provenance: list[pl.Expr]) -> Loaded:
        """The feed's usage points, reading types and summaries; a feed without any content is refused."""
        from processor.greenbutton.espi import FORMAT

        for table, records in (
            ("greenbutton_usage_points", result.usage_points),
            ("greenbutton_reading_types", result.reading_types),
            ("greenbutton_usage_summaries", result.summaries),
        ):
            if records:
                frame = pl.DataFrame(records, infer_schema_length=None).with_columns(
                    pl.int_range(1, len(records) + 1, dtype=pl.Int64).alias("source_line"),
                    pl.col("updated_at").cast(pl.Datetime("us", "UTC")),
                )
                self._write_versioned(table, self._greenbutton_rows(frame, provenance))
        if not result.readings and not (result.usage_points or result.reading_types or result.summaries):
            raise Rejected("Green Button XML without any UsagePoint, ReadingType, IntervalBlock or UsageSummary",
                           format_name=FORMAT)  # fmt: skip
        return Loaded(FORMAT, result.readings)

    def _load_utility_csv(self, real: Path, provenance: list[pl.Expr]) -> Loaded:
        from processor.greenbutton.utility_csv import parse_utility_csv, refuse_oversized

        refuse_oversized(real.stat().st_size)  # before reading it into memory
        parsed = parse_utility_csv(
            real.read_bytes(), timezone=self.timezone, fallback_timezone=system_timezone()
        )
        rows = self._greenbutton_rows(
            parsed.intervals.with_columns(pl.lit(None, pl.Datetime("us", "UTC")).alias("updated_at")),
            provenance,
        )
        self._write_versioned("greenbutton_intervals", rows)
        self.on_rows(rows.height)
        return Loaded("greenbutton_csv", rows.height, f"{parsed.layout} layout", parsed.timezone)

    # -- archives ------------------------------------------------------------------------
    def _ingest_archive(self, real: Path, entry: Delivery, known_id: int | None, depth: int) -> Outcome:
        """A ZIP is one delivery: each member is a file of its own, named ``archive.zip!member``.

        A ZIP none of whose members could be ingested is rejected, with the first reason.
        Content refused once is not unpacked again within the same ZIP (42.zip holds
        16 copies of each level: each would be refused again, 16**4 times).
        """
        outermost = self._refused is None
        if outermost:
            self._refused = {}
        try:
            members, hidden = self._archive_members(real, entry, depth)
        except (Rejected, *_MEMBER_ERRORS) as error:  # e.g. NotImplementedError: zip file version 19.1
            if transient(error):
                raise
            reason = error if isinstance(error, Rejected) else Rejected(f"unreadable ZIP: {error}")
            reason.format_name = "zip"
            return self._reject(entry, known_id, reason)
        finally:
            if outermost:
                self._refused = None
        if members and all(m.status == "rejected" for m in members):
            first = members[0]
            return self._reject(entry, known_id, members=tuple(members), error=Rejected(
                f"no member could be ingested ({len(members)} rejected); the first, {first.path}: {first.detail}",
                format_name="zip"))  # fmt: skip
        counts = {status: sum(m.status == status for m in members) for status in STATUSES}
        note = f"{len(members)} member(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        if hidden:
            shown = ", ".join(hidden[:3]) + (f" and {len(hidden) - 3} more" if len(hidden) > 3 else "")
            note += f"; skipped {len(hidden)} hidden member(s): {shown}"
        rows = sum(m.rows for m in members if m.status == "ingested")
        with self.store.transaction():
            file_id = known_id or self.store.next_file_id()
            self.store.record(entry, file_id=file_id, status="ingested", format_name="zip", rows=rows, error=None,
                              note=note)  # fmt: skip
        return Outcome(entry.path, "ingested", "zip", rows, note, file_id, tuple(members))

    def _archive_members(self, real: Path, entry: Delivery, depth: int) -> tuple[list[Outcome], list[str]]:
        """The members' outcomes, and the names of the hidden members skipped (as in folders:
        ``.DS_Store``, and the ``__MACOSX/._*`` copies a Mac adds to every ZIP it makes)."""
        limits = self.limits
        if depth >= limits.max_archive_depth:
            raise Rejected(f"ZIP nested more than {limits.max_archive_depth} levels deep")
        with zipfile.ZipFile(real) as archive:
            infos = [i for i in archive.infolist() if not i.filename.endswith("/")]  # is_dir() fails on ""
            if len(infos) > limits.max_archive_members:
                raise Rejected(f"ZIP with {len(infos):,} members (limit {limits.max_archive_members:,})")
            declared = sum(i.file_size for i in infos)
            if declared > limits.max_archive_bytes:
                raise Rejected(
                    f"zip bomb refused: {declared:,} bytes uncompressed (limit {limits.max_archive_bytes:,})"
                )
            for info in infos:
                if info.file_size > 1024**2 and info.file_size > limits.max_archive_ratio * max(
                    info.compress_size, 1
                ):
                    raise Rejected(
                        f"zip bomb refused: member {info.filename!r} expands "
                        f"{info.file_size // max(info.compress_size, 1):,}x (limit {limits.max_archive_ratio}x)"
                    )
            if any(not i.filename for i in infos):
                raise Rejected("unreadable ZIP: a member without a name")
            hidden = [i.filename for i in infos if _hidden_member(i.filename)]
            infos = [i for i in infos if not _hidden_member(i.filename)]
            outcomes = []
            budget = limits.max_archive_bytes
            with tempfile.TemporaryDirectory(prefix="meterdrop-zip-") as scratch:
                # Every member is unpacked (and so checked: CRC, bombs) before any is ingested, so
                # a ZIP refused at its last member leaves none of the others behind.
                targets = []
                for index, info in enumerate(infos):
                    # Never a path taken from the member's name: a fixed name in our own folder.
                    target = Path(scratch) / f"member-{index}"
                    budget -= _extract(archive, info, target, budget)
                    targets.append(target)
                for info, target in zip(infos, targets, strict=True):
                    outcomes.append(self._ingest(target, f"{entry.path}!{info.filename}", entry.delivered_at,
                                                 depth=depth + 1))  # fmt: skip
                    target.unlink()
            return outcomes, hidden


def _hidden_member(name: str) -> bool:
    """A member a folder of the same files would have hidden: a name starting with a dot, or __MACOSX.

    (``..`` is not a name but a step up: such members are read, under a name of our own.)
    """
    parts = name.replace("\\", "/").split("/")
    return any((part.startswith(".") and part not in (".", "..")) or part == "__MACOSX" for part in parts)


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Copy one member, refusing to write more than ``budget`` bytes whatever its header says."""
    written = 0
    with target.open("wb") as sink:  # errors writing the copy (a full disk) are the machine's: not caught
        try:
            source = archive.open(info)
        except _MEMBER_ERRORS as error:
            raise _unreadable_member(info, error) from None
        with source:
            while True:
                try:
                    chunk = source.read(1024 * 1024)
                except _MEMBER_ERRORS as error:
                    raise _unreadable_member(info, error) from None
                if not chunk:
                    break
                written += len(chunk)
                if written > budget:
                    raise Rejected(
                        f"zip bomb refused: member {info.filename!r} expands past the archive's size limit"
                    )
                sink.write(chunk)
    return written


def _unreadable_member(info: zipfile.ZipInfo, error: BaseException) -> BaseException:
    """Damaged, encrypted or unsupported content rejects the ZIP; a read error of the disk does not."""
    if transient(error):
        return error
    reason = str(error) or type(error).__name__
    return Rejected(f"unreadable ZIP member {info.filename!r}: {reason}")


def expand(paths: Iterable[Path], unreadable: Callable[[OSError], None] | None = None) -> Iterator[Path]:
    """Files named, and the files under folders named (recursively, in name order).

    Hidden files and folders (a leading dot) inside folders are skipped: upload clients
    and editors keep their unfinished work there. A folder that cannot be listed is
    passed to ``unreadable`` (its files cannot be named, so they cannot be ledgered).
    """
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path, onerror=unreadable):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path
