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

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from processor.ingest import Ingester, Outcome  # noqa: E402
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
REPEATS = 3  # fresh-database runs per figure (median reported)
CORRECTION_REPEATS = 5  # correction files per table (cheap; median reported)


# -- data ------------------------------------------------------------------------------------------
def readings(steps: Sequence[int], variant: int) -> pl.DataFrame:
    """Rows for all devices at the given 15-minute steps, step-major; ``variant`` changes values only.

    Row g = step * 1000 + device; ``fill_sql`` uses the same formulas (variant 0), so a table
    filled in SQL holds exactly what ingesting such files would give.
    """
    grid = pl.DataFrame({"step": pl.Series(list(steps), dtype=pl.Int64)}).join(
        pl.DataFrame({"dev": pl.int_range(0, DEVICES, dtype=pl.Int64, eager=True)}), how="cross"
    )
    g = pl.col("step") * DEVICES + pl.col("dev")
    dev = pl.col("dev")
    current = ((g * 7 + variant * 31) % 1000) / 100
    voltage = 220 + ((g + variant * 3) % 200) / 10
    return grid.select(
        (dev + 100001).cast(pl.String).alias("device_id"),
        pl.format("Sensor {}", dev + 1).alias("device_name"),
        (pl.lit(EPOCH) + pl.duration(minutes=pl.col("step") * STEP_MINUTES)).alias("measurement_time"),
        pl.lit(STEP_MINUTES).alias("resolution"),
        (dev // 100 + 77).cast(pl.String).alias("site_id"),
        pl.format("Main, Plant {}", dev // 100).alias("site_name"),
        current.alias("current"),
        voltage.alias("voltage"),
        (current * voltage).round(2).alias("power"),
        (0.8 + ((g + variant) % 20) / 100).round(2).alias("power_factor"),
        (current * voltage * 0.25).round(3).alias("energy"),
    )


def write_measurements(path: Path, steps: Sequence[int], variant: int = 0, chunk_steps: int = 1000) -> int:
    """Write a Panoramic Measurements CSV (a space after each comma of the header); return its rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as out:
        out.write((HEADER + "\n").encode())
        for start in range(0, len(steps), chunk_steps):
            readings(steps[start : start + chunk_steps], variant).write_csv(
                out, include_header=False, datetime_format="%Y-%m-%dT%H:%M:%SZ"
            )
    tmp.replace(path)
    return len(steps) * DEVICES


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
    """A fresh database whose Measurements table already holds ``n_rows`` readings; returns seconds.

    The schema comes from ``Store``; the rows and their ledger entry are written in plain SQL so
    that this does not depend on the Store's Python API, which is still moving.
    """
    remove_db(db)
    started = time.perf_counter()
    with Store(db) as store:
        con = store.con
        con.execute("BEGIN TRANSACTION")
        row = con.execute("SELECT coalesce(max(id), 0) + 1 FROM files").fetchone()
        file_id = int(row[0]) if row else 1
        source = f"/history/synthetic-{n_rows}.csv"
        con.execute(fill_sql(n_rows, file_id, source))
        try:
            con.execute(
                "INSERT INTO files (id, path, size, sha256, delivered_at, first_seen_at, format, status, "
                "rows, error, note, ingested_at) VALUES (?, ?, 0, ?, ?, ?, ?, 'ingested', ?, NULL, "
                "'bench fill', now())",
                [file_id, source, f"synthetic-{n_rows}", HISTORY_DELIVERED, HISTORY_DELIVERED, TABLE, n_rows],
            )
        except duckdb.Error as error:  # the ledger is only for coherence; the rows are what matters
            say(f"  (note: no ledger entry for the synthetic history: {error})")
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    return time.perf_counter() - started


def remove_db(db: Path) -> None:
    for p in (db, db.with_name(db.name + ".wal")):
        p.unlink(missing_ok=True)


def set_mtime(path: Path, when: float) -> None:
    os.utime(path, (when, when))


# -- measuring -------------------------------------------------------------------------------------
@dataclass
class Result:
    """One line of the final table."""

    case: str
    figure: str
    value: str
    baseline: str = "-"
    ratio: str = "-"
    goal: str = "-"
    met: bool | None = None


@dataclass
class Config:
    quick: bool
    ingest_rows: int
    correction_table: int
    correction_rows: int
    growth_tables: tuple[int, ...]
    memory_steps: int


FULL = Config(False, 1_000_000, 10_000_000, 100_000, (1_000_000, 10_000_000, 50_000_000), 11_000)
QUICK = Config(True, 200_000, 2_000_000, 100_000, (1_000_000, 5_000_000, 10_000_000), 2_000)

GIB = 1024**3


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f} rows/s"


def human(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def say(text: str = "") -> None:
    print(text, flush=True)


def loud(text: str) -> None:
    bar = "!" * 100
    say(f"{bar}\n!!! {text}\n{bar}")


@dataclass
class CliRun:
    wall: float
    returncode: int
    max_rss: int  # bytes
    output: str


def meterdrop_command() -> list[str]:
    script = Path(sys.executable).with_name("meterdrop")
    return [str(script)] if script.exists() else [sys.executable, "-m", "meterdrop"]


GNU_TIME = Path("/usr/bin/time")


def rss_method() -> str:
    if GNU_TIME.exists():
        return "/usr/bin/time -f %M (kernel ru_maxrss of the command, forked from `time` itself)"
    return "psutil polling of the child's RSS every 50 ms"


def run_child(command: list[str], env: dict[str, str] | None = None) -> CliRun:
    """Run a command; return its wall time, exit status, output and peak RSS.

    Peak RSS comes from GNU time when present.  Not from os.wait4()/RUSAGE_CHILDREN here:
    Linux carries the parent's RSS high-water mark into a forked child across exec, so a
    child of this (large) benchmark process would report at least our own peak.
    """
    with tempfile.TemporaryDirectory() as tmp:
        sink_path = Path(tmp) / "output"
        rss_path = Path(tmp) / "rss"
        if GNU_TIME.exists():
            command = [str(GNU_TIME), "-f", "%M", "-o", str(rss_path), *command]
        with sink_path.open("wb") as sink:
            started = time.perf_counter()
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
            peak = 0
            if not GNU_TIME.exists():
                import psutil  # in meterdrop's [test] extras

                watched = psutil.Process(proc.pid)
                while proc.poll() is None:
                    try:
                        tree = [watched, *watched.children(recursive=True)]
                        peak = max(peak, sum(p.memory_info().rss for p in tree))
                    except psutil.Error:
                        pass
                    time.sleep(0.05)
            proc.wait()
            wall = time.perf_counter() - started
        output = sink_path.read_text(errors="replace")
        if GNU_TIME.exists():
            lines = rss_path.read_text().strip().splitlines() if rss_path.exists() else []
            peak = int(lines[-1]) * 1024 if lines and lines[-1].isdigit() else -1
    return CliRun(wall, proc.returncode, peak, output)


def run_cli_ingest(db: Path, path: Path) -> CliRun:
    """``meterdrop ingest`` as on a user's machine, where Python caches compiled modules.

    A machine that sets PYTHONDONTWRITEBYTECODE (this one does) makes every start compile
    meterdrop's own modules again, 50 ms that no installed copy pays: pip compiles a
    package when it installs it, and Python caches what it compiles on first use.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return run_child([*meterdrop_command(), "ingest", "--db", str(db), str(path)], env=env)


def run_read_csv_child(db: Path, path: Path) -> CliRun:
    """DuckDB's own CSV load in a fresh process, so its peak RSS can be compared too."""
    code = (
        "import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
        "con.execute('CREATE TABLE m AS SELECT * FROM read_csv(?)', [sys.argv[2]]); con.close()"
    )
    return run_child([sys.executable, "-c", code, str(db), str(path)])


def count_rows(db: Path, table: str) -> int:
    with duckdb.connect(str(db), read_only=True) as con:
        row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else -1


class ProfilingStore(Store):
    """The real Store; when ``profiling`` is set, the profile of each MERGE is kept (untimed runs only)."""

    profiling = False

    def __init__(self, path: Path | str) -> None:
        super().__init__(path)
        self.profiles: list[dict[str, Any]] = []

    def merge(self, *args: Any, **kwargs: Any) -> None:
        """One MERGE statement: its profile is kept."""
        if not self.profiling:
            super().merge(*args, **kwargs)
            return
        self.con.execute("SET enable_profiling = 'no_output'")
        try:
            super().merge(*args, **kwargs)
            self.profiles.append(json.loads(self.con.get_profiling_information(format="json")))
        finally:
            self.con.execute("RESET enable_profiling")


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("children", []):
        yield from _nodes(child)


def target_scan_rows(profiles: list[dict[str, Any]], table: str) -> int:
    """Rows the MERGE statements read from the stored table (after zone-map / row-group pruning)."""
    total = 0
    for profile in profiles:
        for node in _nodes(profile):
            info = node.get("extra_info") or {}
            if node.get("operator_type") == "TABLE_SCAN" and str(info.get("Table", "")).endswith(f".{table}"):
                total += int(node.get("operator_rows_scanned") or node.get("operator_cardinality") or 0)
    return total


def read_expected(path: Path) -> pl.DataFrame:
    """The rows of a generated Measurements file, parsed independently of the processor."""
    names = [
        "device_id", "device_name", "measurement_time", "resolution_minutes", "site_id", "site_name",
        "current_a", "voltage_v", "power_w", "power_factor", "energy_wh",
    ]  # fmt: skip
    frame = pl.read_csv(path, has_header=True, new_columns=names, infer_schema=False)
    floats = names[6:]
    return frame.select(
        "device_id",
        "device_name",
        pl.col("measurement_time")
        .str.strip_chars_end("Z")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S", time_unit="us")
        .dt.replace_time_zone("UTC"),
        pl.col("resolution_minutes").cast(pl.Int32),
        "site_id",
        "site_name",
        *(pl.col(c).cast(pl.Float64) for c in floats),
    )


def verify_correction(store: Store, path: Path, outcome: Outcome, table_rows: int) -> bool:
    """Print whether every corrected reading now carries the file's values; True when it does."""
    expected = read_expected(path)
    store.con.register("bench_expected", expected.to_arrow())
    try:
        n, found, from_file, same = store.con.execute(
            f"""
SELECT count(*), count(t.device_id), count(*) FILTER (WHERE t.file_id = ?),
       count(*) FILTER (WHERE t.current_a = e.current_a AND t.voltage_v = e.voltage_v
                         AND t.power_w = e.power_w AND t.power_factor = e.power_factor
                         AND t.energy_wh = e.energy_wh AND t.device_name = e.device_name
                         AND t.site_id = e.site_id AND t.site_name = e.site_name)
FROM bench_expected e LEFT JOIN {TABLE} t USING (device_id, measurement_time, resolution_minutes)
""",
            [outcome.file_id],
        ).fetchone()  # type: ignore[misc]
    finally:
        store.con.unregister("bench_expected")
    total, total_from_file = store.con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE file_id = ?) FROM {TABLE}", [outcome.file_id]
    ).fetchone()  # type: ignore[misc]
    ok = (
        outcome.status == "ingested"
        and n == found == from_file == same == total_from_file == expected.height
        and total == table_rows
    )
    line = (
        f"check {path.name}: status={outcome.status}, {same:,}/{n:,} corrected readings carry the new values, "
        f"{from_file:,} attributed to file #{outcome.file_id}, table has {total:,} rows (expected {table_rows:,})"
    )
    if ok:
        say(f"    CHECK OK   {line}")
    else:
        loud(f"CHECK FAILED {line} (outcome detail: {outcome.detail})")
    return ok


def latest_steps(table_rows: int, correction_rows: int) -> range:
    last = table_rows // DEVICES
    return range(last - correction_rows // DEVICES, last)


def spread_steps(table_rows: int, correction_rows: int) -> list[int]:
    """Steps spaced evenly over the whole history: the worst case for key-range pruning."""
    count = correction_rows // DEVICES
    last = table_rows // DEVICES
    return [i * (last - 1) // (count - 1) for i in range(count)]


def timed_corrections(
    store: ProfilingStore,
    out: Path,
    label: str,
    steps: Sequence[int],
    table_rows: int,
    variants: Sequence[int],
    mtime_base: float,
) -> tuple[list[float], int, bool]:
    """Ingest one correction file per variant (timed), then one more with profiling (untimed).

    Returns the times, the rows the profiled MERGE read from the table, and whether all checks passed.
    """
    times: list[float] = []
    ok = True
    ingester = Ingester(store)
    for i, variant in enumerate([*variants, max(variants) + 1]):
        path = out / f"{label}_v{variant}.csv"
        rows = write_measurements(path, steps, variant)
        os.utime(path, (mtime_base + variant, mtime_base + variant))  # newer than the stored rows
        profiled = i == len(variants)
        store.profiling = profiled
        store.profiles.clear()
        started = time.perf_counter()
        outcome = ingester.ingest(path)
        elapsed = time.perf_counter() - started
        store.profiling = False
        if profiled:
            scanned = target_scan_rows(store.profiles, TABLE)
            say(
                f"    profiled run (untimed): {elapsed:.3f}s; the MERGE read {scanned:,} of "
                f"{table_rows:,} stored rows"
            )
        else:
            times.append(elapsed)
            say(f"    run {i + 1}: {rows:,} rows in {elapsed:.3f}s = {rate(rows, elapsed)}")
        ok = verify_correction(store, path, outcome, table_rows) and ok
        path.unlink(missing_ok=True)
    return times, scanned, ok


# -- cases -----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, cfg: Config, out: Path, keep: bool) -> None:
        self.cfg = cfg
        self.out = out
        self.keep = keep
        self.results: list[Result] = []
        self.templates: dict[int, Path] = {}
        self.mtime_base = time.time()

    def template(self, rows: int) -> Path:
        """A database holding ``rows`` readings, built once per run and copied for each use."""
        if rows not in self.templates:
            path = self.out / f"table_{human(rows)}.template.duckdb"
            seconds = build_table(path, rows)
            say(
                f"  built a {rows:,}-row table in {seconds:.1f}s "
                f"({path.stat().st_size / 1e6:,.0f} MB, INSERT ... SELECT FROM range)"
            )
            self.templates[rows] = path
        return self.templates[rows]

    def working_copy(self, rows: int, name: str) -> Path:
        db = self.out / name
        remove_db(db)
        shutil.copyfile(self.template(rows), db)
        return db

    def drop_template(self, rows: int) -> None:
        path = self.templates.pop(rows, None)
        if path is not None:
            remove_db(path)

    # 1 ------------------------------------------------------------------------------------------
    def ingest_1m(self) -> None:
        n = self.cfg.ingest_rows
        csv = self.out / f"measurements_{human(n)}.csv"
        started = time.perf_counter()
        write_measurements(csv, range(n // DEVICES))
        say(
            f"  generated {csv.name}: {n:,} rows, {csv.stat().st_size / 1e6:,.1f} MB "
            f"in {time.perf_counter() - started:.1f}s"
        )
        db = self.out / "ingest.duckdb"
        base, ours, ours_call, cli = [], [], [], []
        failed = {"in-process": 0, "CLI": 0}
        for run in range(1, REPEATS + 1):
            remove_db(db)
            started = time.perf_counter()
            con = duckdb.connect(str(db))
            con.execute("CREATE TABLE m AS SELECT * FROM read_csv(?)", [str(csv)])
            con.close()
            base.append(time.perf_counter() - started)
            got = count_rows(db, "m")

            remove_db(db)
            started = time.perf_counter()
            store = Store(db)
            call_started = time.perf_counter()
            outcome = Ingester(store).ingest(csv)
            ours_call.append(time.perf_counter() - call_started)
            store.close()
            ours.append(time.perf_counter() - started)
            ours_rows = count_rows(db, TABLE)
            if outcome.status != "ingested" or outcome.rows != n or ours_rows != n:
                failed["in-process"] += 1
                loud(f"in-process ingest stored {ours_rows:,} rows: {outcome}")

            remove_db(db)
            result = run_cli_ingest(db, csv)
            cli.append(result.wall)
            cli_rows = count_rows(db, TABLE) if db.exists() else -1
            if result.returncode != 0 or cli_rows != n:
                failed["CLI"] += 1
                loud(
                    f"meterdrop ingest exited {result.returncode}, {cli_rows:,} rows stored:\n{result.output}"
                )
            say(
                f"  run {run}: read_csv {base[-1]:.2f}s ({got:,} rows) | Store+ingest+close {ours[-1]:.2f}s "
                f"(ingest() {ours_call[-1]:.2f}s, {ours_rows:,} rows) | CLI {cli[-1]:.2f}s "
                f"({cli_rows:,} rows, peak RSS {result.max_rss / GIB:.2f} GiB)"
            )
            if got != n:
                loud(f"read_csv stored {got:,} rows, not {n:,}")
        remove_db(db)
        if not self.keep:
            csv.unlink(missing_ok=True)
        b, o, oc, c = (statistics.median(x) for x in (base, ours, ours_call, cli))
        case = f"ingest_{human(n).lower()}"
        self.results.append(Result(case, "DuckDB read_csv -> CREATE TABLE (baseline)", rate(n, b)))
        if failed["in-process"]:
            self.results.append(
                Result(
                    case, f"in-process ingest FAILED in {failed['in-process']}/{REPEATS} runs", "-", met=False
                )
            )
        else:
            self.results += [
                Result(case, "Store()+ingest()+close(), in-process", rate(n, o), rate(n, b), f"{b / o:.2f}x",
                       ">= 0.5x", b / o >= 0.5),
                Result(case, "ingest() call alone", rate(n, oc), rate(n, b), f"{b / oc:.2f}x", "(info)"),
            ]  # fmt: skip
        if failed["CLI"]:
            self.results.append(
                Result(
                    case, f"`meterdrop ingest` CLI FAILED in {failed['CLI']}/{REPEATS} runs", "-", met=False
                )
            )
        else:
            self.results.append(
                Result(case, "`meterdrop ingest` CLI wall time", rate(n, c), rate(n, b), f"{b / c:.2f}x",
                       ">= 0.5x", b / c >= 0.5)
            )  # fmt: skip

    # 2 ------------------------------------------------------------------------------------------
    def correction_10m(self) -> None:
        table_rows, rows = self.cfg.correction_table, self.cfg.correction_rows
        case = f"correction_{human(table_rows).lower()}"
        db = self.working_copy(table_rows, "correction.duckdb")
        ok = True
        with ProfilingStore(db) as store:
            say(f"  latest {rows:,} readings corrected ({CORRECTION_REPEATS} successive correction files):")
            times, scanned, good = timed_corrections(
                store, self.out, "correction_latest", latest_steps(table_rows, rows), table_rows,
                range(1, CORRECTION_REPEATS + 1), self.mtime_base,
            )  # fmt: skip
            ok &= good
            say(f"  worst case: {rows:,} readings spread evenly over the whole history:")
            worst, worst_scanned, good = timed_corrections(
                store, self.out, "correction_spread", spread_steps(table_rows, rows), table_rows,
                range(11, 11 + CORRECTION_REPEATS), self.mtime_base,
            )  # fmt: skip
            ok &= good
        remove_db(db)
        reference = self.read_csv_small(rows)
        t, w = statistics.median(times), statistics.median(worst)
        self.results += [
            Result(case, f"{human(rows)} latest readings corrected", rate(rows, t), goal=">= 1M rows/s",
                   met=rows / t >= 1_000_000),
            Result(case, f"  (reference: DuckDB read_csv of such a {human(rows)} file, database open)",
                   rate(rows, reference), goal="(info)"),
            Result(case, f"  (MERGE read {scanned:,} of {table_rows:,} stored rows)", f"{t:.3f}s"),
            Result(case, f"worst case: {human(rows)} spread over all history", rate(rows, w), goal="(info)"),
            Result(case, f"  (MERGE read {worst_scanned:,} of {table_rows:,} stored rows)", f"{w:.3f}s"),
            Result(case, "corrected values verified in the table", "yes" if ok else "NO", met=ok),
        ]  # fmt: skip

    def read_csv_small(self, rows: int) -> float:
        """Median seconds of DuckDB's own load of a correction-sized file into a new table.

        Not a goal: it shows what a file of this size costs DuckDB by itself (the database
        open already, as the store is while corrections are timed), against the 1M rows/s
        the correction goal asks of us.
        """
        csv = self.out / f"reference_{human(rows)}.csv"
        write_measurements(csv, latest_steps(self.cfg.correction_table, rows), 1)
        db = self.out / "reference.duckdb"
        remove_db(db)
        seconds = []
        with duckdb.connect(str(db)) as con:  # open already, as the store is for the corrections
            for n in range(CORRECTION_REPEATS):
                started = time.perf_counter()
                con.execute(f"CREATE TABLE m{n} AS SELECT * FROM read_csv(?)", [str(csv)])
                seconds.append(time.perf_counter() - started)
        remove_db(db)
        csv.unlink(missing_ok=True)
        say(f"  reference: read_csv of a {rows:,}-row file into a new table of an open database: "
            f"{' / '.join(f'{x:.3f}' for x in seconds)} s")  # fmt: skip
        return statistics.median(seconds)

    # 3 ------------------------------------------------------------------------------------------
    def growth(self) -> None:
        rows = self.cfg.correction_rows
        sizes = self.cfg.growth_tables
        if self.cfg.quick:
            say(f"  --quick: tables of {', '.join(human(s) for s in sizes)} rows instead of 1M, 10M, 50M")
        medians: list[tuple[int, float, int]] = []
        ok = True
        for size in sizes:
            say(f"  table of {size:,} rows; latest {rows:,} readings corrected {CORRECTION_REPEATS} times:")
            if size in self.templates:
                db = self.working_copy(size, "growth.duckdb")
            else:
                db = self.out / "growth.duckdb"
                seconds = build_table(db, size)
                say(f"  built a {size:,}-row table in {seconds:.1f}s ({db.stat().st_size / 1e6:,.0f} MB)")
            with ProfilingStore(db) as store:
                times, scanned, good = timed_corrections(
                    store, self.out, f"growth_{human(size)}", latest_steps(size, rows), size,
                    range(1, CORRECTION_REPEATS + 1), self.mtime_base,
                )  # fmt: skip
            ok &= good
            remove_db(db)
            medians.append((size, statistics.median(times), scanned))
        small, large = medians[0], medians[-1]
        case = "growth"
        for size, seconds, scanned in medians:
            self.results.append(
                Result(case, f"{human(rows)} correction into {human(size)} rows (read {scanned:,})",
                       f"{seconds:.3f}s", f"{small[1]:.3f}s", f"{seconds / small[1]:.2f}x")
            )  # fmt: skip
        ratio = large[1] / small[1]
        self.results += [
            Result(case, f"time ratio {human(large[0])}/{human(small[0])}", f"{ratio:.2f}x", goal="<= 1.5x",
                   met=ratio <= 1.5),
            Result(case, "corrected values verified in the table", "yes" if ok else "NO", met=ok),
        ]  # fmt: skip

    # 4 ------------------------------------------------------------------------------------------
    def memory_1gb(self) -> None:
        steps = self.cfg.memory_steps
        csv = self.out / "measurements_big.csv"
        started = time.perf_counter()
        n = write_measurements(csv, range(steps))
        size = csv.stat().st_size
        say(
            f"  generated {csv.name}: {n:,} rows, {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f}s"
        )
        db = self.out / "memory.duckdb"
        remove_db(db)
        base = run_read_csv_child(db, csv)
        if base.returncode != 0:
            loud(f"read_csv baseline failed:\n{base.output}")
        say(f"  peak RSS measured with {rss_method()}")
        say(f"  read_csv baseline (child process): {base.wall:.1f}s, peak RSS {base.max_rss / GIB:.2f} GiB")
        remove_db(db)
        ours = run_cli_ingest(db, csv)
        stored = count_rows(db, TABLE) if db.exists() else -1
        say(
            f"  meterdrop ingest: exit {ours.returncode}, {ours.wall:.1f}s, peak RSS {ours.max_rss / GIB:.2f} GiB, "
            f"{stored:,} rows stored; its output:"
        )
        for line in ours.output.strip().splitlines():
            say(f"    | {line}")
        if ours.returncode != 0 or stored != n:
            loud(f"meterdrop ingest of {csv.name} did not store all {n:,} rows (exit {ours.returncode})")
        # The same readings delivered again, later and with another site name: each replaces a stored one.
        again = self.out / "measurements_big_again.csv"
        with again.open("wb") as out:
            subprocess.run(["sed", "s/Main, Plant /Main, Plant B/", str(csv)], stdout=out, check=True)
        later = csv.stat().st_mtime + 3600
        os.utime(again, (later, later))
        redelivered = run_cli_ingest(db, again)
        replaced = -1
        if db.exists():
            with duckdb.connect(str(db), read_only=True) as con:
                row = con.execute(
                    f"SELECT count(*), count(*) FILTER (site_name LIKE 'Main, Plant B%') FROM {TABLE}"
                ).fetchone()
            replaced = int(row[1]) if row and row[0] == n else -1
        say(f"  re-delivered ({again.name}, every row newer): exit {redelivered.returncode}, {redelivered.wall:.1f}s, "
            f"peak RSS {redelivered.max_rss / GIB:.2f} GiB, {replaced:,} of {n:,} rows replaced")  # fmt: skip
        again.unlink(missing_ok=True)
        remove_db(db)
        if not self.keep:
            csv.unlink(missing_ok=True)
        case = "memory_1gb" if not self.cfg.quick else f"memory_1gb (quick: {size / 1e6:.0f} MB)"
        if ours.returncode != 0 or stored != n:
            self.results.append(
                Result(case, f"`meterdrop ingest` FAILED (exit {ours.returncode}, {stored:,} rows stored)",
                       f"{ours.max_rss / GIB:.2f} GiB", met=False)
            )  # fmt: skip
            return
        self.results += [
            Result(case, f"`meterdrop ingest` peak RSS, {size / 1e9:.2f} GB file", f"{ours.max_rss / GIB:.2f} GiB",
                   f"{base.max_rss / GIB:.2f} GiB", f"{ours.max_rss / base.max_rss:.2f}x", "< 2 GiB",
                   ours.max_rss < 2 * GIB),
            Result(case, f"`meterdrop ingest` throughput, {n / 1e6:.0f}M rows", rate(n, ours.wall),
                   rate(n, base.wall), f"{base.wall / ours.wall:.2f}x", "(info)"),
            Result(case, "the same rows re-delivered: peak RSS; rows replaced", f"{redelivered.max_rss / GIB:.2f} GiB; "
                   f"{replaced:,} of {n:,}", "", "", "< 2 GiB, all", redelivered.max_rss < 2 * GIB and replaced == n),
        ]  # fmt: skip


CASES: dict[str, Callable[[Bench], None]] = {
    "ingest_1m": Bench.ingest_1m,
    "correction_10m": Bench.correction_10m,
    "growth": Bench.growth,
    "memory_1gb": Bench.memory_1gb,
}


# -- report ----------------------------------------------------------------------------------------
def environment() -> list[str]:
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(os.cpu_count())
    cpu = "?"
    mem = "?"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        kib = int(
            next(
                x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
            ).split()[1]
        )
        mem = f"{kib / 1024**2:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    with duckdb.connect() as con:
        threads, limit = con.execute(
            "SELECT current_setting('threads'), current_setting('memory_limit')"
        ).fetchone()  # type: ignore[misc]
    return [
        f"nproc: {nproc}   cpu: {cpu}   memory: {mem}",
        f"platform: {platform.platform()}",
        f"python {platform.python_version()}   duckdb {duckdb.__version__}   polars {pl.__version__}   "
        f"pyarrow {pyarrow.__version__}",
        f"duckdb defaults: threads={threads}, memory_limit={limit}",
    ]


def loadavg() -> str:
    """Other work on this 2-core machine (tests, builds) shows up in the timings; say so."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def table(results: list[Result]) -> str:
    head = ("case", "figure", "value", "baseline", "ratio", "goal", "met?")
    rows = [
        (r.case, r.figure, r.value, r.baseline, r.ratio, r.goal,
         "-" if r.met is None else ("yes" if r.met else "NO"))
        for r in results
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = [
        "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |"
        for row in (head, *rows)
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes (a smoke test, not the README figures)"
    )
    parser.add_argument("--only", choices=sorted(CASES), help="run one case")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="scratch folder [default: bench/out]")
    parser.add_argument("--keep", action="store_true", help="keep the generated CSV files")
    args = parser.parse_args(argv)

    cfg = QUICK if args.quick else FULL
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say(
        f"meterdrop ingest benchmark ({'--quick' if cfg.quick else 'full'}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    for line in environment():
        say(f"  {line}")
    say(f"  command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    load = float(loadavg().split()[0]) if loadavg() != "?" else 0.0
    if load > 0.5:
        loud(
            f"load average is {loadavg()} before we start: other work shares these cores, timings will be noisy"
        )
    bench = Bench(cfg, out, args.keep)
    names = [args.only] if args.only else list(CASES)
    for name in names:
        say(f"\n== {name} " + "=" * (90 - len(name)))
        say(f"  (load average before: {loadavg()})")
        case_started = time.perf_counter()
        try:
            CASES[name](bench)
        except Exception:
            loud(f"{name} FAILED with an exception:\n{traceback.format_exc()}")
            bench.results.append(Result(name, "FAILED (exception, see above)", "-", met=False))
        say(f"  ({name} took {time.perf_counter() - case_started:.0f}s; load average now {loadavg()})")
    for rows in list(bench.templates):
        bench.drop_template(rows)
    say(
        f"\n== results ({'--quick' if cfg.quick else 'full run'}, {time.perf_counter() - started:.0f}s in all) "
    )
    say(table(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
