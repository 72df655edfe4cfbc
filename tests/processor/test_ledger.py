"""The ``files`` ledger: every file accounted for, exactly once, even across kill -9."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import duckdb

from processor.errors import Rejected
from processor.ingest import Ingester
from processor.store import Store
from tests.conftest import MEASUREMENTS_HEADER, at, write_delivery

ROW = "{d},dev,2024-01-01T{h:02d}:{m:02d}:00Z,15,1,s,1,230,2,1,{e}"


def test_ledger_columns_for_an_ingested_file(tmp_path: Path, store: Store, ingest) -> None:
    path = write_delivery(tmp_path / "m.csv", [MEASUREMENTS_HEADER, ROW.format(d=1, h=0, m=0, e=1)],
                          at("2024-01-01 01:00"))  # fmt: skip
    outcome = ingest(path)
    row = store.con.execute(
        "SELECT path, size, sha256, delivered_at, format, status, rows, error, first_seen_at IS NOT NULL, "
        "ingested_at >= first_seen_at FROM files"
    ).fetchone()
    import hashlib

    assert row == (
        str(path), path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest(), at("2024-01-01 01:00"),
        "panoramic_measurements", "ingested", 1, None, True, True,
    )  # fmt: skip
    assert outcome.file_id == store.con.execute("SELECT id FROM files").fetchone()[0]


def test_same_content_elsewhere_is_a_duplicate_and_changes_nothing(
    tmp_path: Path, store: Store, ingest
) -> None:
    lines = [MEASUREMENTS_HEADER, ROW.format(d=1, h=0, m=0, e=1)]
    first = write_delivery(tmp_path / "a" / "m.csv", lines, at("2024-01-01 01:00"))
    copy = write_delivery(tmp_path / "b" / "m.csv", lines, at("2024-01-01 05:00"))
    ingest(first)
    before = store.con.execute("SELECT * FROM panoramic_measurements").fetchall()
    outcome = ingest(copy)
    assert outcome.status == "duplicate"
    assert outcome.detail == f"same content as file #1 {first}"
    assert store.con.execute("SELECT * FROM panoramic_measurements").fetchall() == before
    assert store.con.execute("SELECT status, count(*) FROM files GROUP BY ALL ORDER BY 1").fetchall() == [
        ("duplicate", 1), ("ingested", 1)]  # fmt: skip


def test_seeing_the_same_file_again_adds_no_ledger_row(tmp_path: Path, store: Store, ingest) -> None:
    path = write_delivery(tmp_path / "m.csv", [MEASUREMENTS_HEADER, ROW.format(d=1, h=0, m=0, e=1)])
    assert ingest(path).status == "ingested"
    again = ingest(path)
    assert (again.status, again.detail) == ("unchanged", "already ingested as file #1")
    assert store.con.execute("SELECT count(*) FROM files").fetchone() == (1,)


def test_a_rejected_file_is_retried_and_keeps_its_first_delivery_time(tmp_path: Path, store: Store) -> None:
    path = write_delivery(tmp_path / "m.csv", [MEASUREMENTS_HEADER, ROW.format(d=1, h=0, m=0, e=1)],
                          at("2024-01-01 01:00"))  # fmt: skip
    failing = Ingester(store)
    failing._load = lambda *a: (_ for _ in ()).throw(Rejected("line 2: simulated"))  # type: ignore[method-assign]
    outcome = failing.ingest(path)
    assert (outcome.status, outcome.detail) == ("rejected", "line 2: simulated")
    os.utime(path, (at("2024-02-02 00:00").timestamp(),) * 2)
    retried = Ingester(store).ingest(path)
    assert (retried.status, retried.file_id) == ("ingested", outcome.file_id)
    assert store.con.execute("SELECT status, delivered_at, error FROM files").fetchall() == [
        ("ingested", at("2024-01-01 01:00"), None)]  # fmt: skip


def test_changed_content_at_the_same_path_is_a_new_delivery(tmp_path: Path, store: Store, ingest) -> None:
    path = tmp_path / "m.csv"
    write_delivery(path, [MEASUREMENTS_HEADER, ROW.format(d=1, h=0, m=0, e=1)], at("2024-01-01 01:00"))
    ingest(path)
    write_delivery(path, [MEASUREMENTS_HEADER, ROW.format(d=1, h=0, m=0, e=2)], at("2024-01-01 02:00"))
    assert ingest(path).status == "ingested"
    assert store.con.execute("SELECT energy_wh, file_id FROM panoramic_measurements").fetchall() == [(2.0, 2)]
    assert store.con.execute("SELECT count(*) FROM files").fetchone() == (2,)


def _deliveries(folder: Path, count: int, rows: int) -> dict[tuple[int, str], float]:
    """Overlapping deliveries; returns the expected final energy per (device, time)."""
    expected: dict[tuple[int, str], float] = {}
    for f in range(count):
        lines = [MEASUREMENTS_HEADER]
        for r in range(rows):
            device, minute = r % 50, (f * rows + r) // 50 % 240
            stamp = f"{minute // 60:02d}:{minute % 60:02d}"
            lines.append(ROW.format(d=device, h=minute // 60, m=minute % 60, e=f * 100000 + r))
            expected[(device, stamp)] = float(f * 100000 + r)
        write_delivery(folder / f"d{f:03d}.csv", lines, at("2024-01-02 00:00").replace(minute=f))
    return expected


def test_kill_9_at_any_moment_then_run_again_holds_every_row_exactly_once(tmp_path: Path) -> None:
    """The real CLI is killed while it works; a second run finishes, and nothing is doubled or lost."""
    drops = tmp_path / "drop"
    drops.mkdir()
    expected = _deliveries(drops, count=40, rows=3000)
    db = tmp_path / "meterdrop.duckdb"
    command = [sys.executable, "-m", "meterdrop", "ingest", "--db", str(db), str(drops)]
    rng = random.Random(20261121)
    kills = 0
    for _ in range(6):
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
            assert proc.stdout is not None
            # Wait for a random number of outcome lines (real progress), then kill mid-work.
            for _ in range(rng.randint(0, 4)):
                if not proc.stdout.readline():
                    break
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
    assert kills >= 3
    final = subprocess.run(command, capture_output=True, text=True, check=False)
    assert final.returncode == 0, final.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        got = {
            (int(d), t): e
            for d, t, e in con.execute(
                "SELECT device_id, strftime(measurement_time, '%H:%M'), energy_wh FROM panoramic_measurements"
            ).fetchall()
        }
        assert got == expected
        assert con.execute("SELECT count(*), count(DISTINCT path), sum(rows) FROM files").fetchone() == (
            40, 40, 40 * 3000)  # fmt: skip
        assert con.execute("SELECT DISTINCT status FROM files").fetchall() == [("ingested",)]
        # Rows and ledger agree: every stored row points at an ingested file.
        assert con.execute(
            "SELECT count(*) FROM panoramic_measurements m ANTI JOIN files f ON f.id = m.file_id"
        ).fetchone() == (0,)


def test_a_name_that_is_not_utf8_is_ledgered_with_its_bytes_escaped(tmp_path: Path, store: Store) -> None:
    """DuckDB stores text only: ``caf\xe9.csv`` from a Latin-1 system is ingested under that name."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9 [1].csv"
    with open(raw, "w") as f:
        f.write(f"{MEASUREMENTS_HEADER}\n{ROW.format(d=1, h=0, m=0, e=1)}\n")
    path = Path(os.fsdecode(raw))
    escaped = f"{tmp_path}/caf\\xe9 [1].csv"
    ingester = Ingester(store)
    assert (ingester.ingest(path).status, ingester.ingest_group([path])[0].status) == (
        "ingested",
        "unchanged",
    )
    assert store.con.execute("SELECT path, status FROM files").fetchall() == [(escaped, "ingested")]
    assert store.con.execute("SELECT source_path FROM panoramic_measurements").fetchall() == [(escaped,)]


def test_rows_carry_the_ledgers_delivery_time_to_the_microsecond(tmp_path: Path, store: Store) -> None:
    """The rows' version is the ledger's delivered_at exactly, fractions of a second included."""
    path = write_delivery(tmp_path / "m.csv", [MEASUREMENTS_HEADER, ROW.format(d=1, h=0, m=0, e=1)])
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    assert Ingester(store).ingest(path).status == "ingested"
    (ledger,) = store.con.execute("SELECT delivered_at FROM files").fetchone()
    (row,) = store.con.execute("SELECT delivered_at FROM panoramic_measurements").fetchone()
    assert row == ledger
    assert (ledger.timestamp(), ledger.microsecond) == (1_700_000_000.123456, 123456)


def _replacing_before_the_parse(monkeypatch, path: Path, new_lines: list[str], times: int) -> list[int]:
    """Make ``read_blocks`` replace ``path`` (a new file, as an upload of the same name) before it reads."""
    import processor.ingest as ingest_module

    read_blocks, calls = ingest_module.read_blocks, []

    def replacing(real, header, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) <= times:
            fresh = path.with_name(f".fresh-{len(calls)}")
            write_delivery(fresh, [new_lines[0], new_lines[1].replace(",9", f",{len(calls)}9")],
                           at(f"2024-01-01 10:0{len(calls)}"))  # fmt: skip
            os.replace(fresh, path)
        return read_blocks(real, header, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "read_blocks", replacing)
    return calls


def test_a_file_replaced_between_its_hash_and_its_parse_is_read_again(
    tmp_path: Path, store: Store, monkeypatch
) -> None:
    """The ledger's hash and the stored rows must come from the same content."""
    lines = [MEASUREMENTS_HEADER, "1,dev,2024-01-01T08:00:00Z,15,1,site,1,230,2,1,9"]
    path = write_delivery(tmp_path / "report.csv", lines, at("2024-01-01 10:00"))
    calls = _replacing_before_the_parse(monkeypatch, path, lines, times=1)
    outcome = Ingester(store).ingest(path)
    assert (outcome.status, len(calls)) == ("ingested", 2)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.con.execute("SELECT sha256, rows FROM files").fetchall() == [(sha, 1)]
    assert store.con.execute("SELECT energy_wh FROM panoramic_measurements").fetchall() == [(19.0,)]


def test_a_file_that_keeps_changing_is_rejected_saying_so(tmp_path: Path, store: Store, monkeypatch) -> None:
    lines = [MEASUREMENTS_HEADER, "1,dev,2024-01-01T08:00:00Z,15,1,site,1,230,2,1,9"]
    path = write_delivery(tmp_path / "report.csv", lines, at("2024-01-01 10:00"))
    _replacing_before_the_parse(monkeypatch, path, lines, times=99)
    outcome = Ingester(store).ingest(path)
    assert outcome.status == "rejected" and "kept changing while it was read" in (outcome.detail or "")
    assert store.con.execute("SELECT count(*) FROM panoramic_measurements").fetchone() == (0,)
    assert store.con.execute("SELECT path, status FROM files").fetchall() == [(str(path), "rejected")]
