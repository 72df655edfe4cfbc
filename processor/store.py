"""The DuckDB database users query: reading tables, the ``files`` ledger, and the merge.

Storage design (numbers in bench/README.md): one table per category holding only the
newest version of each reading, written with ``MERGE INTO`` on the reading key and *no*
index.  A primary-key index made every insert pay an index probe (about 0.25x DuckDB's
own ``read_csv``); without it, MERGE is a hash join whose build side (the delivery) is
small, and DuckDB pushes the delivery's key range into the table scan, so a correction
of recent readings touches only recent row groups whatever the table's size.

The version of a row is ``(delivered_at, source_path, source_line)``; a row replaces the
stored one only when its version is greater, so the final table does not depend on the
order in which deliveries are processed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from processor.greenbutton.model import INTERVAL_KEY
from processor.panoramic import MEASUREMENT_FORMATS

# DuckDB's client looks for pandas four times per statement with parameters; where pandas
# is not installed each look searches sys.path again (6 ms per delivered file, bench/README.md).
# Recording the absence once makes those looks instant; an installed pandas is left alone.
if "pandas" not in sys.modules and importlib.util.find_spec("pandas") is None:
    sys.modules["pandas"] = None  # type: ignore[assignment]
# DuckDB scans an Arrow table through pyarrow.dataset when it can import it, for filter
# pushdown that our statements never use. The import (pyarrow.compute, the S3, GCS and
# Azure file systems, Parquet, Acero, Substrait) costs 18 MiB of every process's peak and
# 50-80 ms of every `meterdrop ingest`; without it DuckDB scans the table's batches itself,
# on every core, no slower (bench/README.md). A process that already imported it keeps it.
if "pyarrow.dataset" not in sys.modules:
    sys.modules["pyarrow.dataset"] = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
log = logging.getLogger("meterdrop.store")
STAGING_PREFIX = "_meterdrop_staging_"  # scratch tables of earlier versions (see _drop_leftover_staging)
_BATCH_ROWS = 122_880  # DuckDB's row group size
_ARROW_LEVEL = pl.CompatLevel.newest()  # strings as Arrow string views, polars' own layout: no copy
_DELIVERY_SCAN = "_delivery_rows"  # a local variable DuckDB scans by name (``_batches``)
MERGE_SLICE_ROWS = 100_000  # a large feed is settled this many rows at a time (``Store.settle``)
_APPEND_QUEUE = 2  # frames waiting for a background append (``Store.appending``)
FRUGAL_MEMORY = "40MB"  # DuckDB's budget while a large Green Button feed is appended and settled
_REPLACE_BYTES = 3  # and per stored row its settle may replace (``Store._room_to_replace``)
_SQL_TYPES = {"text": "VARCHAR", "int": "INTEGER", "float": "DOUBLE", "time": "TIMESTAMPTZ"}
PROVENANCE = ("file_id", "delivered_at", "source_path", "source_line")
_PROVENANCE_DDL = "file_id BIGINT, delivered_at TIMESTAMPTZ, source_path VARCHAR, source_line BIGINT"

_LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS files (
    id BIGINT PRIMARY KEY,
    path VARCHAR NOT NULL,
    size BIGINT NOT NULL,
    sha256 VARCHAR NOT NULL,
    delivered_at TIMESTAMPTZ NOT NULL,
    first_seen_at TIMESTAMPTZ NOT NULL,
    format VARCHAR,
    status VARCHAR NOT NULL CHECK (status IN ('ingested', 'duplicate', 'rejected')),
    rows BIGINT,
    error VARCHAR,
    note VARCHAR,
    ingested_at TIMESTAMPTZ,
    timezone VARCHAR
);
CREATE TABLE IF NOT EXISTS meterdrop_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
"""

_GREENBUTTON_DDL = f"""
CREATE TABLE IF NOT EXISTS greenbutton_intervals (
    usage_point VARCHAR, reading_type VARCHAR, service_kind VARCHAR, flow_direction INTEGER, uom VARCHAR,
    interval_start TIMESTAMPTZ, duration_s BIGINT, value DOUBLE, raw_value DOUBLE,
    power_of_ten_multiplier INTEGER, cost DOUBLE, currency VARCHAR, quality VARCHAR,
    updated_at TIMESTAMPTZ, version_at TIMESTAMPTZ, {_PROVENANCE_DDL}
);
CREATE TABLE IF NOT EXISTS greenbutton_usage_points (
    usage_point VARCHAR, service_kind VARCHAR, service_kind_code INTEGER, status INTEGER,
    tz_offset_s INTEGER, dst_offset_s INTEGER, dst_start_rule VARCHAR, dst_end_rule VARCHAR,
    dst_start VARCHAR, dst_end VARCHAR, updated_at TIMESTAMPTZ, version_at TIMESTAMPTZ, {_PROVENANCE_DDL}
);
CREATE TABLE IF NOT EXISTS greenbutton_reading_types (
    reading_type VARCHAR, uom_code INTEGER, uom VARCHAR, power_of_ten_multiplier INTEGER,
    flow_direction INTEGER, accumulation_behaviour INTEGER, commodity INTEGER, kind INTEGER,
    interval_length_s BIGINT, currency_code INTEGER, currency VARCHAR, data_qualifier INTEGER, phase INTEGER,
    updated_at TIMESTAMPTZ, version_at TIMESTAMPTZ, {_PROVENANCE_DDL}
);
CREATE TABLE IF NOT EXISTS greenbutton_usage_summaries (
    usage_point VARCHAR, summary VARCHAR, billing_period_start TIMESTAMPTZ, billing_period_duration_s BIGINT,
    bill_last_period DOUBLE, bill_to_date DOUBLE, cost_additional_last_period DOUBLE, currency VARCHAR,
    consumption_last_period DOUBLE, consumption_last_period_uom VARCHAR,
    current_billing_period_consumption DOUBLE, current_billing_period_consumption_uom VARCHAR,
    quality_of_reading VARCHAR, status_timestamp TIMESTAMPTZ,
    updated_at TIMESTAMPTZ, version_at TIMESTAMPTZ, {_PROVENANCE_DDL}
);
"""

# Green Button tables and their keys; their version is the Atom ``updated`` where the file has it.
GREENBUTTON_KEYS: dict[str, tuple[str, ...]] = {
    "greenbutton_intervals": INTERVAL_KEY,
    "greenbutton_usage_points": ("usage_point",),
    "greenbutton_reading_types": ("reading_type",),
    "greenbutton_usage_summaries": ("usage_point", "summary", "billing_period_start"),
}
DELIVERY_VERSION = ("delivered_at", "source_path", "source_line")
UPDATED_VERSION = ("version_at", "source_path", "source_line")

_CATALOG_DDL = f"""
CREATE TABLE IF NOT EXISTS panoramic_catalog (
    entity_kind VARCHAR, entity_id VARCHAR, snapshot_date DATE, catalog_version VARCHAR,
    {_PROVENANCE_DDL}
);
"""

# (table, quantity column, quantity name, unit SQL)
_READINGS: list[tuple[str, str, str]] = [
    ("energy_wh", "energy", "'Wh'"),
    ("power_w", "power", "'W'"),
    ("current_a", "current", "'A'"),
    ("voltage_v", "voltage", "'V'"),
    ("power_factor", "power_factor", "NULL"),
    ("reactive_power_var", "reactive_power", "'VAr'"),
    ("consumed_active_energy_wh", "consumed_active_energy", "'Wh'"),
    ("frequency_hz", "frequency", "'Hz'"),
    ("flow", "flow", "meter_unit || '/h'"),
    ("volume", "volume", "meter_unit"),
]


def _energy_readings_sql() -> str:
    parts = []
    for fmt in MEASUREMENT_FORMATS:
        names = set(fmt.column_names())
        is_pulse = "meter_id" in names
        ident, label = ("meter_id", "meter_name") if is_pulse else ("device_id", "device_name")
        phase = "phase" if "phase" in names else "NULL::VARCHAR"
        unit_cases = " ".join(
            f"WHEN '{column}' THEN {unit}" for column, _, unit in _READINGS if column in names
        )
        quantity_cases = " ".join(
            f"WHEN '{column}' THEN '{quantity}'" for column, quantity, _ in _READINGS if column in names
        )
        measured = ", ".join(column for column, _, _ in _READINGS if column in names)
        meter_unit = "meter_unit" if is_pulse else "NULL::VARCHAR AS meter_unit"
        parts.append(f"""
SELECT '{fmt.table}' AS source, {ident} AS meter_id, {label} AS meter_name, site_id, site_name,
       {phase} AS phase, CASE reading {quantity_cases} END AS quantity,
       CASE reading {unit_cases} END AS unit,
       measurement_time AS interval_start,
       measurement_time + to_minutes(resolution_minutes) AS interval_end,
       value, file_id
FROM (UNPIVOT (SELECT {ident}, {label}, site_id, site_name, {phase} AS phase, {meter_unit},
                      measurement_time, resolution_minutes, file_id, {measured} FROM {fmt.table})
      ON {measured} INTO NAME reading VALUE value)""")
    parts.append("""
SELECT 'greenbutton_intervals' AS source, usage_point AS meter_id, reading_type AS meter_name,
       NULL::VARCHAR AS site_id, NULL::VARCHAR AS site_name, NULL::VARCHAR AS phase,
       CASE WHEN uom IN ('Wh', 'therm', 'BTU', 'J', 'MJ') THEN
                CASE flow_direction WHEN 19 THEN 'energy_exported' WHEN 4 THEN 'energy_net' ELSE 'energy' END
            WHEN uom IN ('W', 'VA') THEN 'power'
            WHEN uom IN ('VArh', 'VAh') THEN 'reactive_energy'
            WHEN uom IN ('m3', 'ft3', 'gal') THEN 'volume'
            ELSE coalesce(uom, 'unknown') END AS quantity,
       uom AS unit, interval_start, interval_start + to_seconds(duration_s) AS interval_end, value, file_id
FROM greenbutton_intervals WHERE value IS NOT NULL""")
    return "CREATE OR REPLACE VIEW energy_readings AS" + "\nUNION ALL BY NAME".join(parts)


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    path: str
    sha256: str
    status: str
    format: str | None
    rows: int | None
    error: str | None
    delivered_at: datetime
    first_seen_at: datetime


@dataclass(frozen=True)
class Delivery:
    """A file as the ledger identifies it: where, what content, and when it was delivered."""

    path: str
    size: int
    sha256: str
    delivered_at: datetime
    first_seen_at: datetime


class NotADatabase(Exception):
    """``--db`` names a file that holds something else (a CSV, say): DuckDB would not write to it."""


_DUCKDB_MAGIC = b"DUCK"  # at byte 8 of every DuckDB database file, after a checksum


def refuse_other_files(path: Path | str) -> None:
    """Raise NotADatabase unless ``path`` is missing, empty or a DuckDB database file.

    DuckDB opens an existing CSV, Parquet or JSON file as an in-memory database with the
    file as a view: an ingest into ``--db exports.csv`` reported its rows and stored none.
    """
    try:
        with open(path, "rb") as stream:
            head = stream.read(12)
    except OSError:
        return  # missing, a folder, no permission: DuckDB says what is wrong itself
    if head and head[8:12] != _DUCKDB_MAGIC:
        raise NotADatabase(
            f"{path} is not a DuckDB database (it starts with {head[:8]!r}); point --db at a meterdrop "
            "database, or at a new file name to start one"
        )


def held_by_another(error: BaseException) -> bool:
    """DuckDB's "Could not set lock on file ...: Conflicting lock is held in ..." (not merely a
    message that says "lock": the file's own path may)."""
    text = str(error)
    return "Could not set lock on file" in text or "Conflicting lock is held" in text


class StoppedWaiting(Exception):
    """``open_store`` gave up waiting for the database because ``stop`` was set (SIGTERM)."""


def open_store(
    path: Path | str,
    *,
    read_only: bool = False,
    wait: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
    checkpoint_on_close: bool = True,
    stop: threading.Event | None = None,
) -> Store:
    """Open the database, waiting up to ``wait`` seconds while another process holds it.

    DuckDB allows one process per database file once a writer has it open; the server
    holds it only while it ingests, so a query or an ingest usually gets in quickly.
    The wait ends with StoppedWaiting once ``stop`` is set: a server told to stop must
    not wait an hour for a notebook to let go.
    """
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            return Store(path, read_only=read_only, checkpoint_on_close=checkpoint_on_close)
        except duckdb.IOException as error:
            if not held_by_another(error) or time.monotonic() >= deadline:
                raise
            if on_wait is not None and not told:
                on_wait(str(error).splitlines()[0])
                told = True
            if stop is None:
                time.sleep(0.05)
            elif stop.wait(0.05):
                raise StoppedWaiting(str(error).splitlines()[0]) from None


class Store:
    """One open meterdrop database; a single writer, as DuckDB requires."""

    def __init__(
        self, path: Path | str, *, read_only: bool = False, checkpoint_on_close: bool = True
    ) -> None:
        """``checkpoint_on_close=False`` leaves the write-ahead log for the next writer.

        ``meterdrop serve`` closes the database every second so that readers get in, and
        each close checkpointed (0.35 s for a group of 1 MB deliveries, about 15% of its
        ingest rate). The log is replayed by whoever opens the file next, read-only
        included, and DuckDB still checkpoints on its own once the log passes 16 MB.
        """
        self.path = Path(path)
        refuse_other_files(path)
        self.con = duckdb.connect(str(path), read_only=read_only)
        self.con.execute("SET TimeZone = 'UTC'")
        if not checkpoint_on_close and not read_only:
            self.con.execute("PRAGMA disable_checkpoint_on_shutdown")
        self._depth = 0  # open transaction() blocks; only the outermost one begins and commits
        row = self.con.execute(
            "SELECT current_setting('memory_limit'), current_setting('threads')"
        ).fetchone()
        assert row is not None
        # DuckDB's budget outside frugal(), as DuckDB spells it ("18.8 GiB"), set once as
        # spelled so that setting the same words back gives the same limit again (the
        # spelling rounds: re-reading and setting it would lower it a little each time).
        self._budget = (str(row[0]), str(row[1]))
        self._frugal = False  # inside frugal()
        self._owed: tuple[str, str] | None = None  # a budget an aborted transaction refused
        if not read_only:
            self.con.execute(f"SET memory_limit = '{self._budget[0]}'")
            self._create()

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -----------------------------------------------------------------
    def _create(self) -> None:
        self._drop_leftover_staging()
        with self.transaction():
            self.con.execute(_LEDGER_DDL)
            for fmt in MEASUREMENT_FORMATS:
                columns = ", ".join(f"{c.name} {_SQL_TYPES[c.kind]}" for c in fmt.columns)
                self.con.execute(f"CREATE TABLE IF NOT EXISTS {fmt.table} ({columns}, {_PROVENANCE_DDL})")
            self.con.execute(_CATALOG_DDL)
            self.con.execute(_GREENBUTTON_DDL)
            self.con.execute(_energy_readings_sql())
            self.con.execute(
                "INSERT OR REPLACE INTO meterdrop_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All of it or none of it: a file's rows and its ledger entry commit together.

        Blocks nest: inside another one (a group of files sharing a transaction) a block
        only joins it, and the outermost block commits or rolls back everything.
        """
        self._depth += 1
        if self._depth > 1:
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            if self._owed is not None:
                self._budgeted(*self._owed)
            raise
        finally:
            self._depth -= 1
        self.con.execute("COMMIT")

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    # -- ledger -----------------------------------------------------------------
    def _entries(self, where: str, params: Sequence[Any]) -> list[LedgerEntry]:
        rows = self.con.execute(
            "SELECT id, path, sha256, status, format, rows, error, delivered_at, first_seen_at "
            f"FROM files WHERE {where} ORDER BY id",
            list(params),
        ).fetchall()
        return [LedgerEntry(*row) for row in rows]

    def known(self, path: str, sha256: str) -> LedgerEntry | None:
        """The ledger entry for this exact content at this path, if any."""
        entries = self._entries("path = ? AND sha256 = ?", [path, sha256])
        return entries[-1] if entries else None

    def known_unchanged(self, path: str, size: int, delivered_at: datetime) -> LedgerEntry | None:
        """The entry for a file still as it was when seen (same size and time), without hashing it.

        Two lookups that each name what they want, not one that fetches every entry at the path:
        an export job that writes the same name every 15 minutes has 35,000 of them a year.
        """
        entries = self._entries(
            "path = ? AND size = ? AND delivered_at = ? AND status <> 'rejected'", [path, size, delivered_at]
        )
        return entries[-1] if entries else None

    def ingested_copy(self, sha256: str) -> LedgerEntry | None:
        """An entry whose identical content was already ingested, under any path."""
        entries = self._entries("sha256 = ? AND status = 'ingested'", [sha256])
        return entries[0] if entries else None

    def next_file_id(self) -> int:
        """The id the next ledger entry will get; call it inside the file's transaction.

        Not a DuckDB sequence: a sequence's position is not rolled back with the
        transaction, and after a kill -9 it could hand out an id already in use.
        """
        row = self.con.execute("SELECT coalesce(max(id), 0) + 1 FROM files").fetchone()
        assert row is not None
        return int(row[0])

    def record(
        self,
        delivery: Delivery,
        *,
        file_id: int,
        status: str,
        format_name: str | None,
        rows: int | None,
        error: str | None,
        note: str | None,
        timezone: str | None = None,
        retried: bool = True,
    ) -> None:
        """Write one ledger entry; a retried reject's entry is replaced under the same id.

        ``retried=False`` says the id is new (``next_file_id``): nothing to replace, and the
        DELETE that would look is skipped (a millisecond a file in a burst of small ones).
        """
        if retried:
            self.con.execute("DELETE FROM files WHERE id = ? AND status = 'rejected'", [file_id])
        self.con.execute(
            "INSERT INTO files (id, path, size, sha256, delivered_at, first_seen_at, format, status, rows, "
            "error, note, ingested_at, timezone) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "CASE WHEN ? = 'rejected' THEN NULL ELSE now() END, ?)",
            [
                file_id,
                delivery.path,
                delivery.size,
                delivery.sha256,
                delivery.delivered_at,
                delivery.first_seen_at,
                format_name,
                status,
                rows,
                error,
                note,
                status,
                timezone,
            ],
        )

    # -- readings ---------------------------------------------------------------
    def merge(
        self, table: str, rows: pl.DataFrame, key: Sequence[str], version: Sequence[str] = DELIVERY_VERSION
    ) -> None:
        """Upsert rows whose version is newer than the stored one; rows carry provenance.

        ``rows`` must hold one row per key (the caller keeps the newest within a delivery).
        """
        if rows.height == 0:  # nothing to merge (a download with a header and no readings)
            return
        _delivery_rows = _batches(rows)  # read by name: DuckDB's replacement scan
        quoted = [f'"{c}"' for c in rows.columns]
        keys = [f'"{k}"' for k in key]
        on = " AND ".join(f"t.{k} = s.{k}" for k in keys)
        newer = f"({', '.join('s.' + v for v in version)}) > ({', '.join('t.' + v for v in version)})"
        assignments = ", ".join(f"{c} = s.{c}" for c in quoted if c not in keys)
        self.con.execute(
            f"MERGE INTO {table} AS t USING {_DELIVERY_SCAN} AS s ON {on} "
            f"WHEN MATCHED AND {newer} THEN UPDATE SET {assignments} "
            f"WHEN NOT MATCHED THEN INSERT ({', '.join(quoted)}) "
            f"VALUES ({', '.join('s.' + c for c in quoted)})"
        )

    def append(self, table: str, rows: pl.DataFrame) -> None:
        """Add rows as they are, for ``settle`` to sort out before COMMIT."""
        _append(self.con, table, rows)

    @contextlib.contextmanager
    def appending(
        self, table: str, prepare: Callable[[pl.DataFrame], pl.DataFrame], *, background: bool = True
    ) -> Iterator[Callable[[pl.DataFrame], None]]:
        """``put(frame)`` appends to ``table``, on a thread of its own (``background``) or in line.

        A large Green Button feed kept one core busy: the parser waited while DuckDB
        appended each frame (2 of 9 s per million readings). DuckDB and polars release
        the GIL, so the appends can run beside the parser. The thread uses the store's own
        connection, so its appends belong to the caller's transaction, and the caller must
        not use the store until the block ends. At most ``_APPEND_QUEUE`` frames wait; an
        append's error is raised by the next ``put`` or when the block ends. The thread
        costs about 20 MB more at the peak, which the largest feeds cannot afford
        (bench/README.md): they append in line.
        """
        if not background:
            yield lambda frame: _append(self.con, table, prepare(frame))
            return
        waiting: queue.Queue[pl.DataFrame | None] = queue.Queue(maxsize=_APPEND_QUEUE)
        failures: list[BaseException] = []

        def work() -> None:
            while (frame := waiting.get()) is not None:
                if not failures:  # after a failure the rest is only drained
                    try:
                        _append(self.con, table, prepare(frame))
                    except BaseException as error:
                        failures.append(error)

        def put(frame: pl.DataFrame) -> None:
            if failures:
                raise failures[0]
            waiting.put(frame)

        worker = threading.Thread(target=work, name=f"append-{table}", daemon=True)
        worker.start()
        try:
            yield put
        finally:
            waiting.put(None)
            worker.join()
        if failures:
            raise failures[0]

    def settle(
        self,
        table: str,
        key: Sequence[str],
        file_id: int,
        *,
        order: str,
        version: Sequence[str],
        slice_by: str,
        slice_rows: int | None = None,
    ) -> None:
        """Newest wins between the rows file ``file_id`` has just appended to ``table`` and the rest.

        A large feed is appended to its table as it is parsed, inside the file's
        transaction, and settled here before COMMIT: its rows are written once, where a
        scratch table wrote them twice (a fifth of a large Green Button feed's time). Per
        slice of ``slice_by`` (to stay within ``frugal``'s budget), the file's repeated
        keys keep only their row first in ``order``; where other files' rows share the
        slice, of two rows with one key the older goes, the stored one only when the
        file's is newer (as MERGE, which replaces only with a newer version). A delete
        keeps a mark per row until COMMIT, not the row.
        """
        mine = f"file_id = {int(file_id)}"
        others = f"file_id IS DISTINCT FROM {int(file_id)}"
        row = self.con.execute(
            f'SELECT count(*), min("{slice_by}"), max("{slice_by}") FROM {table} WHERE {mine}'
        ).fetchone()
        assert row is not None
        count, low, high = row
        if not count:
            return
        row = self.con.execute(
            f'SELECT count(*) FROM {table} WHERE "{slice_by}" BETWEEN ? AND ? AND {others}', [low, high]
        ).fetchone()
        stored = row[0] if row else 0
        with self._room_to_replace(stored):
            self._settle_slices(
                table, key, mine, others, order, version, slice_by, count, low, high, slice_rows, stored
            )

    def _settle_slices(
        self,
        table: str,
        key: Sequence[str],
        mine: str,
        others: str,
        order: str,
        version: Sequence[str],
        slice_by: str,
        count: int,
        low: Any,
        high: Any,
        slice_rows: int | None,
        stored: int,
    ) -> None:
        keys = ", ".join(f'"{k}"' for k in key)
        same = " AND ".join(f't."{k}" = o."{k}"' for k in key)
        versions = ", ".join(f'"{v}"' for v in version)
        t_version = ", ".join(f't."{v}"' for v in version)
        o_version = ", ".join(f'o."{v}"' for v in version)
        for within, params in _slices(slice_by, count, low, high, slice_rows or MERGE_SLICE_ROWS):
            if self._repeats_within(table, mine, keys, within(""), params):  # its newest row per key stays
                self.con.execute(
                    f"DELETE FROM {table} AS t USING (SELECT rowid AS r FROM {table} WHERE {mine} "
                    f"AND {within('')} QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {order}) > 1) "
                    "AS o WHERE t.rowid = o.r",
                    params,
                )
            if not stored or not self._others_within(table, others, within(""), params):
                continue  # a first delivery of this range: nothing to settle
            ours = f"(SELECT {keys}, {versions} FROM {table} WHERE {mine} AND {within('')})"
            theirs = f"(SELECT {keys}, {versions} FROM {table} WHERE {others} AND {within('')})"
            self.con.execute(  # the stored rows this file outdates
                f"DELETE FROM {table} AS t USING {ours} AS o "
                f"WHERE t.{others} AND {within('t.')} AND {same} AND ({o_version}) > ({t_version})",
                params * 2,
            )
            self.con.execute(  # and the file's rows that MERGE would not have let in
                f"DELETE FROM {table} AS t USING {theirs} AS o "
                f"WHERE t.{mine} AND {within('t.')} AND {same} AND (({t_version}) > ({o_version})) IS NOT TRUE",
                params * 2,
            )

    def _repeats_within(
        self, table: str, mine: str, keys: str, within: str, params: Sequence[object]
    ) -> bool:
        """A key the file holds twice in a slice (a slice at a time: over a whole 10M-reading
        file, the DISTINCT ran out of the small budget inside the file's transaction)."""
        found = self.con.execute(
            f"SELECT 1 FROM {table} WHERE {mine} AND {within} GROUP BY {keys} HAVING count(*) > 1 LIMIT 1",
            params,
        )
        return found.fetchone() is not None

    def _others_within(self, table: str, others: str, within: str, params: Sequence[object]) -> bool:
        """Rows of other files in a slice (row groups outside it are skipped)."""
        found = self.con.execute(f"SELECT 1 FROM {table} WHERE {within} AND {others} LIMIT 1", params)
        return found.fetchone() is not None

    @contextlib.contextmanager
    def frugal(self) -> Iterator[None]:
        """DuckDB on a small memory budget and one thread, for as long as the block runs.

        A large Green Button feed is appended and settled under it: DuckDB's default
        budget (80% of RAM) let a 1M-reading feed take 520 MB; with 40 MB, one thread and
        settling in slices, deliveries of up to 10M readings stayed under 260 MiB at a
        small cost in speed (bench/README.md). What does not fit spills to DuckDB's
        temporary directory; what cannot spill raises ``duckdb.OutOfMemoryException``
        (the caller retries without this budget). ``_room_to_replace`` adds room for a
        settle's delete marks.
        """
        self._budgeted(FRUGAL_MEMORY, "1")
        self._frugal = True
        try:
            yield
            if self._depth == 0:  # the checkpoint of what was committed, on the same budget
                self.con.execute("CHECKPOINT")
        finally:
            self._frugal = False
            self._budgeted(*self._budget)

    def _budgeted(self, memory: str, threads: str) -> None:
        # Set back, not RESET: in DuckDB 1.5 `RESET memory_limit` reports the default
        # again but leaves the buffer pool at the small limit, for every later ingest.
        try:
            self.con.execute(f"SET memory_limit = '{memory}'")
            self.con.execute(f"SET threads = {threads}")
            self._owed = None
        except duckdb.TransactionException:
            if not self.in_transaction:
                raise
            # A failed statement (out of memory, say) aborted the transaction, which now
            # takes nothing but ROLLBACK; raising here would hide that statement's error,
            # which callers act on. ``transaction`` sets the budget after its ROLLBACK.
            self._owed = (memory, threads)

    @contextlib.contextmanager
    def _room_to_replace(self, replaceable: int) -> Iterator[None]:
        """More budget for a settle that may replace ``replaceable`` stored rows.

        DuckDB keeps a mark per deleted row until COMMIT, and counts it against the budget:
        re-delivering 3M stored readings needed between 32 and 40 MB, 10M between 52 and
        58 (bench/README.md), about 28 MB plus 2.7 bytes a row. Out of budget, the file is
        rolled back and parsed again on DuckDB's full budget (twice the time, 500 MiB). So
        the settle gets ``_REPLACE_BYTES`` a row more from the start: room for the marks,
        not more, as DuckDB fills what it is given with cached blocks of the table (16
        bytes a row took the 10M re-delivery to 377 MiB).
        """
        if not self._frugal or not replaceable:
            yield
            return
        budget = _megabytes(FRUGAL_MEMORY) + -(-replaceable * _REPLACE_BYTES // 1_000_000)
        log.info(
            "replacing up to %s stored rows: DuckDB's budget raised to %s MB", f"{replaceable:,}", budget
        )
        self._budgeted(f"{budget}MB", "1")
        try:
            yield
        finally:
            self._budgeted(FRUGAL_MEMORY, "1")

    def _drop_leftover_staging(self) -> None:
        """Scratch tables that earlier versions staged large files in, left by a crash.

        Their files were not recorded, so they are ingested again; the tables only take space.
        """
        for (name,) in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE starts_with(table_name, ?)",
            [STAGING_PREFIX],
        ).fetchall():
            self.con.execute(f"DROP TABLE IF EXISTS {name}")

    def add_catalog_columns(self, names: Sequence[str]) -> list[str]:
        """Make room for vendor columns first seen now; return all catalog columns in order."""
        existing = self.table_columns("panoramic_catalog")
        for name in names:
            if name not in existing:
                self.con.execute(f'ALTER TABLE panoramic_catalog ADD COLUMN "{name}" VARCHAR')
        return self.table_columns("panoramic_catalog")

    def table_columns(self, table: str) -> list[str]:
        rows = self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
            "ORDER BY ordinal_position",
            [table],
        ).fetchall()
        return [r[0] for r in rows]


def _megabytes(setting: str) -> int:
    """``"40MB"`` as 40: the form ``FRUGAL_MEMORY`` is written in."""
    return int(setting.removesuffix("MB"))


def _slices(
    column: str, count: int, low: Any, high: Any, rows: int
) -> list[tuple[Callable[[str], str], list[object]]]:
    """Conditions (given a table alias) cutting [low, high] of ``column`` into slices of about ``rows`` rows.

    Equal steps of the column, not equal row counts: feeds are about evenly spread in time.
    NULLs go with the first slice, so no row is left out.
    """
    slices = max(1, -(-count // rows))
    cuts = [low + (high - low) * i / slices for i in range(1, slices)]
    pieces: list[tuple[Callable[[str], str], list[object]]] = []
    for number, (start, stop) in enumerate(zip([low, *cuts], [*cuts, high], strict=True)):
        below = "<=" if number == slices - 1 else "<"

        def within(alias: str, below: str = below, first: bool = number == 0) -> str:
            value = f'{alias}"{column}"'
            between = f"{value} >= ? AND {value} {below} ?"
            return f"({value} IS NULL OR ({between}))" if first else f"({between})"

        pieces.append((within, [start, stop]))
    return pieces


def _batches(rows: pl.DataFrame) -> pa.Table:
    """``rows`` for DuckDB to scan: Arrow batches of a row group each, scanned on every core.

    The statement names them by a local variable of the function that runs it (DuckDB's
    replacement scan), not by ``con.register``: a registered table is a catalog entry, and
    inside a transaction DuckDB keeps a dropped entry, and so the whole Arrow table, until
    COMMIT. A 187 MB file merged block by block in one transaction held every block's rows.
    (A frame handed over as an Arrow C stream, without pyarrow, would save pyarrow's 28 MB,
    but DuckDB scans a stream on one thread: a 1M-row MERGE took 1.9 s instead of 1.1.)
    """
    arrow = rows.to_arrow(compat_level=_ARROW_LEVEL)
    return pa.Table.from_batches(arrow.to_batches(max_chunksize=_BATCH_ROWS))


def _append(con: duckdb.DuckDBPyConnection, table: str, rows: pl.DataFrame) -> None:
    if rows.height == 0:
        return
    _delivery_rows = _batches(rows)  # read by name: DuckDB's replacement scan
    columns = ", ".join(f'"{c}"' for c in rows.columns)
    con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {_DELIVERY_SCAN}")
