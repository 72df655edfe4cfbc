"""Green Button ESPI ingest: readings per second and peak memory, against bare XML parsing.

Generates an ESPI feed of N hourly readings (one IntervalBlock per day, with cost and
quality, as utilities write them), one with all readings in a single block (the
worst case for memory), and one of daily blocks whose readings hold only a time period
and a value (144 MB per 1M readings, nearer the "about 100 MB" issue #3 states), then
measures in the same run:

- baseline: lxml iterparse over the file counting IntervalReadings (parsing only);
- ours: `meterdrop ingest` of the file into a fresh database, as a subprocess, with its
  peak RSS from getrusage.

Usage: ./run python bench/bench_greenbutton.py [--readings 1000000] [--redeliver]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import polars as pl
from lxml import etree

ESPI = "http://naesb.org/espi"


def generate(
    path: Path,
    readings: int,
    per_block: int,
    updated: str = "2024-01-02",
    offset: int = 0,
    *,
    lean: bool = False,
) -> None:
    """``lean``: readings of a time period and a value only, as PG&E's sample writes them
    (without its indentation): 144 MB per 1M readings, nearer issue #3's "about 100 MB".
    Otherwise each reading also has a cost and a ReadingQuality: 214 MB."""
    start = 1_577_836_800
    extra = (
        (lambda i: "")
        if lean
        else (lambda i: f"<cost>{i % 1000 * 10}</cost><ReadingQuality><quality>0</quality></ReadingQuality>")
    )
    with path.open("w") as out:
        out.write('<?xml version="1.0"?>\n<feed xmlns="http://www.w3.org/2005/Atom">\n')
        out.write(
            '<entry><link rel="self" href="/UsagePoint/1"/><link rel="related" href="/UsagePoint/1/MeterReading"/>'
            f'<content><UsagePoint xmlns="{ESPI}"><ServiceCategory><kind>0</kind></ServiceCategory></UsagePoint>'
            "</content></entry>\n"
            '<entry><link rel="self" href="/UsagePoint/1/MeterReading/1"/><link rel="up" href="/UsagePoint/1/MeterReading"/>'
            '<link rel="related" href="/ReadingType/1"/><content><MeterReading xmlns="http://naesb.org/espi"/></content></entry>\n'
            f'<entry><link rel="self" href="/ReadingType/1"/><content><ReadingType xmlns="{ESPI}"><currency>840</currency>'
            "<flowDirection>1</flowDirection><intervalLength>3600</intervalLength><powerOfTenMultiplier>0"
            "</powerOfTenMultiplier><uom>72</uom></ReadingType></content></entry>\n"
        )
        for block in range(0, readings, per_block):
            out.write(
                f'<entry><link rel="self" href="/UsagePoint/1/MeterReading/1/IntervalBlock/{block}"/>'
                f'<link rel="up" href="/UsagePoint/1/MeterReading/1/IntervalBlock"/><updated>{updated}T00:00:00Z</updated>'
                f'<content><IntervalBlock xmlns="{ESPI}"><interval><duration>{3600 * per_block}</duration>'
                f"<start>{start + block * 3600}</start></interval>\n"
            )
            out.writelines(
                f"<IntervalReading>{extra(i)}"
                f"<timePeriod><duration>3600</duration><start>{start + i * 3600}</start></timePeriod>"
                f"<value>{i % 5000 + offset}</value></IntervalReading>\n"
                for i in range(block, min(readings, block + per_block))
            )
            out.write("</IntervalBlock></content></entry>\n")
        out.write("</feed>\n")


def baseline(path: Path) -> float:
    started = time.perf_counter()
    for _, element in etree.iterparse(str(path), events=("end",), tag=f"{{{ESPI}}}IntervalReading"):
        element.clear()
    return time.perf_counter() - started


def ours(path: Path, workdir: Path, database: Path | None = None) -> tuple[float, float, int]:
    """Time and peak RSS of `meterdrop ingest`; into ``database`` (kept) or a fresh one (deleted)."""
    keep = database is not None
    database = database or workdir / f"gb-{time.monotonic_ns()}.duckdb"
    # A wrapper process per run, so the peak RSS (RUSAGE_CHILDREN) is this run's alone.
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
        "sys.stderr.write(r.stdout + r.stderr)"
    )
    command = [sys.executable, "-m", "meterdrop", "ingest", "-q", "--db", str(database), str(path)]
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=False
    )
    elapsed_text, peak_text, code = result.stdout.split()
    if code != "0":
        raise RuntimeError(f"ingest failed: {result.stderr.strip().splitlines()[0]}")
    elapsed, peak = float(elapsed_text), int(peak_text)
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM greenbutton_intervals").fetchone()[0]  # type: ignore[index]
    if not keep:
        database.unlink()
    return elapsed, peak / 1024, rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--redeliver", action="store_true",
                        help="also deliver the daily-blocks feed twice into one database, the second time "
                             "later and with other values, so that every reading replaces a stored one")  # fmt: skip
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, duckdb {duckdb.__version__}, "
          f"polars {pl.__version__}, lxml {'.'.join(map(str, etree.LXML_VERSION))}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="meterdrop-bench-") as tmp:
        workdir = Path(tmp)
        print(
            "| file | readings | MB | lxml iterparse s | meterdrop ingest s | readings/s | ratio to parse | peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        cases = (
            ("daily blocks", 24, False),
            ("one block", args.readings, False),
            ("daily blocks, time and value only", 24, True),
        )
        for label, per_block, lean in cases:
            path = workdir / f"feed-{per_block}.xml"
            generate(path, args.readings, per_block, lean=lean)
            parse_s = baseline(path)
            try:
                ingest_s, rss_mb, rows = ours(path, workdir)
            except RuntimeError as error:  # one block of 3M hours spans 342 years: refused, rightly
                print(
                    f"| {label} | {args.readings:,} | {path.stat().st_size / 1e6:.0f} | {parse_s:.2f} | {error} |"
                )
                path.unlink()
                continue
            assert rows == args.readings, rows
            print(f"| {label} | {args.readings:,} | {path.stat().st_size / 1e6:.0f} | {parse_s:.2f} | {ingest_s:.2f} | "
                  f"{args.readings / ingest_s:,.0f} | {parse_s / ingest_s:.2f}x | {rss_mb:.0f} |")  # fmt: skip
            path.unlink()
        if args.redeliver:
            # The same readings again, later and with other values: every one replaces a stored one.
            database = workdir / "redelivered.duckdb"
            for updated, offset in (("2024-01-02", 0), ("2024-01-03", 1)):
                path = workdir / f"feed-{updated}.xml"
                generate(path, args.readings, 24, updated, offset)
                parse_s = baseline(path)
                ingest_s, rss_mb, rows = ours(path, workdir, database)
                assert rows == args.readings, rows
                label = (
                    "daily blocks, re-delivered" if offset else "daily blocks, first (for the re-delivery)"
                )
                print(f"| {label} | {args.readings:,} | {path.stat().st_size / 1e6:.0f} | {parse_s:.2f} | "
                      f"{ingest_s:.2f} | {args.readings / ingest_s:,.0f} | {parse_s / ingest_s:.2f}x | {rss_mb:.0f} |")  # fmt: skip
                path.unlink()


if __name__ == "__main__":
    main()
