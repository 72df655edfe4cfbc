"""Ingest benchmarks for meterdrop: throughput, corrections into large tables, growth, memory.

Standalone and print-only: it measures and reports, it never asserts a timing.

    ./run python bench/bench_ingest.py              # full run (what bench/README.md shows)
    ./run python bench/bench_ingest.py --quick      # smaller sizes, for a smoke test
    ./run python bench/bench_ingest.py --only growth

Cases (see bench/README.md):
  ingest_1m       1M-row Measurements CSV into a fresh database, against DuckDB's own read_csv
  correction_10m  100k-row correction of the latest readings into a 10M-row table
  growth          the same kind of correction into tables of 1M, 10M and 50M rows
  memory_1gb      peak RSS of `meterdrop ingest` on a ~1 GB Measurements CSV

Generated files and databases go to bench/out/ (git-ignored) unless --out says otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from processor.store import Store  # noqa: E402

HEADER = (
    "device_id, device_name, measurement_time(UTC), resolution(minutes), site_id, site_name, "
    "current(A), voltage(V), power(W), power_factor, energy(Wh)"
)
DEVICES = 1000
STEP_MINUTES = 15
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
HISTORY_DELIVERED = "2020-01-01 00:00:00+00"  # stored rows are older than any correction file
TABLE = "panoramic_measurements"
REPEATS = 3


# -- data ------------------------------------------------------------------------------------------
def readings(first_step: int, n_steps: int, variant: int) -> pl.DataFrame:
    """Rows for ``n_steps`` 15-minute steps of all devices, time-major; ``variant`` changes values only.

    Row g (global index) is device g % 1000 at step g // 1000; the same formulas are used by
    ``fill_sql`` so a table filled in SQL holds exactly what ingesting these files would give.
    """
    n = n_steps * DEVICES
    g = pl.int_range(first_step * DEVICES, first_step * DEVICES + n, dtype=pl.Int64, eager=True)
    frame = pl.DataFrame({"g": g})
    dev = pl.col("g") % DEVICES
    step = pl.col("g") // DEVICES
    current = ((pl.col("g") * 7 + variant * 31) % 1000) / 100
    voltage = 220 + ((pl.col("g") + variant * 3) % 200) / 10
    return frame.select(
        (dev + 100001).cast(pl.String).alias("device_id"),
        pl.format("Sensor {}", dev + 1).alias("device_name"),
        (pl.lit(EPOCH) + pl.duration(minutes=step * STEP_MINUTES)).alias("measurement_time"),
        pl.lit(STEP_MINUTES).alias("resolution"),
        (dev // 100 + 77).cast(pl.String).alias("site_id"),
        pl.format("Main, Plant {}", dev // 100).alias("site_name"),
        current.alias("current"),
        voltage.alias("voltage"),
        (current * voltage).round(2).alias("power"),
        (0.8 + ((pl.col("g") + variant) % 20) / 100).round(2).alias("power_factor"),
        (current * voltage * 0.25).round(3).alias("energy"),
    )


def write_measurements(
    path: Path, first_step: int, n_steps: int, variant: int = 0, chunk_steps: int = 1000
) -> int:
    """Write a Panoramic Measurements CSV (header with a space after each comma); return its rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as out:
        out.write((HEADER + "\n").encode())
        for start in range(first_step, first_step + n_steps, chunk_steps):
            steps = min(chunk_steps, first_step + n_steps - start)
            readings(start, steps, variant).write_csv(
                out, include_header=False, datetime_format="%Y-%m-%dT%H:%M:%SZ"
            )
    tmp.replace(path)
    return n_steps * DEVICES


def fill_sql(n_rows: int, file_id: int, source_path: str) -> str:
    """INSERT the first ``n_rows`` readings (variant 0) straight into the table, with provenance."""
    return f"""
INSERT INTO {TABLE} (device_id, device_name, measurement_time, resolution_minutes, site_id, site_name,
                     current_a, voltage_v, power_w, power_factor, energy_wh,
                     file_id, delivered_at, source_path, source_line)
SELECT (100001 + g % {DEVICES})::VARCHAR,
       'Sensor ' || (g % {DEVICES} + 1),
       TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_minutes((g // {DEVICES}) * {STEP_MINUTES}),
       {STEP_MINUTES},
       (g % {DEVICES} // 100 + 77)::VARCHAR,
       'Main, Plant ' || (g % {DEVICES} // 100),
       ((g * 7) % 1000) / 100,
       220 + (g % 200) / 10,
       round(((g * 7) % 1000) / 100 * (220 + (g % 200) / 10), 2),
       round(0.8 + (g % 20) / 100, 2),
       round(((g * 7) % 1000) / 100 * (220 + (g % 200) / 10) * 0.25, 3),
       {file_id}, TIMESTAMPTZ '{HISTORY_DELIVERED}', '{source_path}', g + 2
FROM range({n_rows}) AS r(g)
"""


def build_table(db: Path, n_rows: int) -> float:
    """A fresh database whose Measurements table already holds ``n_rows`` readings; returns seconds."""
    remove_db(db)
    started = time.perf_counter()
    with Store(db) as store:
        file_id = store.next_file_id()
        source = f"/history/synthetic-{n_rows}.csv"
        with store.transaction():
            store.con.execute(fill_sql(n_rows, file_id, source))
            store.record(
                file_id=file_id, path=source, size=0, sha256=f"synthetic-{n_rows}",
                delivered_at=datetime(2020, 1, 1, tzinfo=UTC), first_seen_at=datetime(2020, 1, 1, tzinfo=UTC),
                status="ingested", format_name=TABLE, rows=n_rows, error=None, note="bench fill",
            )  # fmt: skip
        store.con.execute("CHECKPOINT")
    return time.perf_counter() - started


def remove_db(db: Path) -> None:
    for p in (db, db.with_name(db.name + ".wal")):
        p.unlink(missing_ok=True)


def set_mtime(path: Path, when: float) -> None:
    os.utime(path, (when, when))
