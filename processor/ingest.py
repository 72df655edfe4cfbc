"""One delivered file into the database, exactly once, whole or not at all.

Every file ends in the ledger as ``ingested``, ``duplicate`` or ``rejected`` with a
reason; its rows and its ledger entry commit in one DuckDB transaction, so a crash at
any point leaves all of it or none of it, and running again finishes the job.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import polars as pl

from processor import catalog, panoramic
from processor.csvfile import HEADER_LIMIT, read_blocks, read_header
from processor.errors import Rejected
from processor.headers import normalise_all
from processor.store import PROVENANCE, Delivery, Store

Status = Literal["ingested", "duplicate", "rejected", "unchanged"]
RowsCallback = Callable[[int], None]


@dataclass(frozen=True)
class Outcome:
    """What happened to one file; ``unchanged`` means the ledger already had it."""

    path: str
    status: Status
    format: str | None = None
    rows: int = 0
    detail: str | None = None
    file_id: int | None = None


def _sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def delivery_time(path: Path) -> datetime:
    """A file's delivery time: its modification time, which the servers set on completion."""
    return datetime.fromtimestamp(path.stat().st_mtime_ns // 1000 / 1_000_000, tz=UTC)


def _unrecognised(head: bytes, header_names: list[str]) -> Rejected:
    shown = ", ".join(name.strip() for name in header_names[:12])
    more = f" (+{len(header_names) - 12} more)" if len(header_names) > 12 else ""
    return Rejected(f"unrecognised format: CSV header [{shown}{more}] is not a known export")


def _sniff(head: bytes) -> None:
    """Refuse what is plainly not a CSV export before any parsing."""
    if not head:
        raise Rejected("unrecognised format: empty file")
    if b"\x00" in head:
        raise Rejected(f"unrecognised format: binary data (starts with {head[:8].hex(' ')})")


class Ingester:
    """Loads files into one Store; ``on_rows`` hears of rows as blocks are written."""

    def __init__(self, store: Store, on_rows: RowsCallback | None = None) -> None:
        self.store = store
        self.on_rows = on_rows or (lambda n: None)

    def ingest(self, path: Path) -> Outcome:
        path = Path(os.path.abspath(path))
        name = str(path)
        try:
            size = path.stat().st_size
            sha = _sha256(path)
            delivered_at = delivery_time(path)
        except OSError as error:
            return Outcome(name, "rejected", detail=f"cannot read file: {error.strerror or error}")
        known = self.store.known(name, sha)
        if known is not None and known.status != "rejected":
            return Outcome(
                name,
                "unchanged",
                known.format,
                known.rows or 0,
                f"already {known.status} as file #{known.id}",
                known.id,
            )
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
        try:
            with self.store.transaction():
                file_id = known.id if known else self.store.next_file_id()
                format_name, rows, note = self._load(path, file_id, entry.delivered_at)
                self.store.record(entry, file_id=file_id, status="ingested", format_name=format_name,
                                  rows=rows, error=None, note=note)  # fmt: skip
        except (Rejected, pl.exceptions.PolarsError, OSError) as error:
            reason = error.reason if isinstance(error, Rejected) else f"cannot parse: {error}"
            rejected_as = error.format_name if isinstance(error, Rejected) else None
            with self.store.transaction():
                file_id = known.id if known else self.store.next_file_id()
                self.store.record(entry, file_id=file_id, status="rejected", format_name=rejected_as,
                                  rows=None, error=reason, note=None)  # fmt: skip
            return Outcome(name, "rejected", rejected_as, 0, reason, file_id)
        return Outcome(name, "ingested", format_name, rows, note, file_id)

    def _load(self, path: Path, file_id: int, delivered_at: datetime) -> tuple[str, int, str | None]:
        with path.open("rb") as stream:
            head = stream.read(HEADER_LIMIT)
        _sniff(head)
        header = read_header(head)
        fields = normalise_all(header.names)
        fmt = panoramic.detect(fields)
        if fmt is None:
            raise _unrecognised(head, header.names)
        provenance = [
            pl.lit(file_id, pl.Int64).alias("file_id"),
            pl.lit(delivered_at, pl.Datetime("us", "UTC")).alias("delivered_at"),
            pl.lit(str(path)).alias("source_path"),
        ]
        total = 0
        if fmt == "catalog":
            columns = self.store.add_catalog_columns(catalog.vendor_columns(fields))
            snapshot = pl.lit(delivered_at.date()).alias("snapshot_date")
            for block in read_blocks(path, header):
                rows = catalog.catalog_rows(fields, block.frame, block.first_line)
                rows = rows.with_columns(snapshot, *provenance)
                rows = rows.select(
                    pl.col(c) if c in rows.columns else pl.lit(None, pl.String).alias(c) for c in columns
                )
                self._write(catalog.TABLE, rows, catalog.KEY)
                total += block.frame.height
            return catalog.FORMAT, total, None
        ignored = panoramic.check_header(fmt, fields)
        for block in read_blocks(path, header):
            rows = panoramic.typed_rows(fmt, fields, block.frame, block.first_line)
            rows = rows.with_columns(*provenance).select(*fmt.column_names(), *PROVENANCE)
            self._write(fmt.table, rows, fmt.key)
            total += block.frame.height
        note = f"ignored columns not in {fmt.label}: {', '.join(ignored)}" if ignored else None
        return fmt.name, total, note

    def _write(self, table: str, rows: pl.DataFrame, key: Iterable[str]) -> None:
        """Within a file the last row for a key wins, so only that one reaches the merge."""
        unique = rows.unique(subset=list(key), keep="last", maintain_order=False)
        self.store.merge(table, unique, list(key))
        self.on_rows(rows.height)


def expand(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named, and the files under folders named (recursively, in name order).

    Hidden files and folders (a leading dot) inside folders are skipped: upload clients
    and editors keep their unfinished work there.
    """
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path
