"""`meterdrop check`: a healthy database passes, and each kind of damage is named.

The faults suite (kill -9, full disk, locked database) trusts this command to say the
ledger and the tables agree, so each check is shown here to fail on the damage it is for.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import duckdb
import pytest

from tests.conftest import MEASUREMENTS_HEADER, SHARED, at, write_delivery


def meterdrop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterdrop", *args], capture_output=True, text=True,
                          check=False, timeout=120)  # fmt: skip


def row(device: str, hour: int, energy: float) -> str:
    return f"{device},Dev {device},2024-03-01T{hour:02d}:00:00Z,60,1,HQ,1,230,230,1,{energy}"


@pytest.fixture
def healthy(tmp_path: Path) -> Path:
    """A database with what a real one has: overlapping deliveries, a duplicate, a reject, a ZIP, Green Button."""
    drops = tmp_path / "drops"
    write_delivery(drops / "a.csv", [MEASUREMENTS_HEADER, row("1", 0, 1), row("1", 1, 2), row("2", 0, 3)],
                   at("2024-03-01 02:00"))  # fmt: skip
    # newer: replaces two of a.csv's three rows, and repeats a key within the file (last wins)
    write_delivery(drops / "b.csv", [MEASUREMENTS_HEADER, row("1", 0, 10), row("1", 1, 20), row("1", 1, 21)],
                   at("2024-03-01 03:00"))  # fmt: skip
    (drops / "copy-of-a.csv").write_bytes((drops / "a.csv").read_bytes())
    write_delivery(drops / "bad.csv", [MEASUREMENTS_HEADER, "1,x,not a time,60,1,HQ,1,230,230,1,1"])
    with zipfile.ZipFile(drops / "c.zip", "w") as archive:
        archive.writestr("inner.csv", "\n".join([MEASUREMENTS_HEADER, row("3", 0, 5)]) + "\n")
    gas = SHARED / "samples" / "greenbutton" / "ngma_gas_provider_2024-07-16.xml"
    db = tmp_path / "m.duckdb"
    result = meterdrop("ingest", "--db", str(db), str(drops), str(gas))
    assert result.returncode == 1, result.stdout + result.stderr  # bad.csv is rejected
    return db


def damage(db: Path, *statements: str) -> None:
    with duckdb.connect(str(db)) as con:
        for statement in statements:
            con.execute(statement)


def test_a_healthy_database_passes_with_a_summary(healthy: Path) -> None:
    result = meterdrop("check", "--db", str(healthy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: 7 file(s) (1 duplicate, 5 ingested, 1 rejected), ")
    with duckdb.connect(str(healthy), read_only=True) as con:
        rows = sum(
            con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
            for t in ("panoramic_measurements", "greenbutton_intervals", "greenbutton_usage_points",
                      "greenbutton_reading_types", "greenbutton_usage_summaries")
        )  # fmt: skip
    assert f"{rows:,} row(s) in " in result.stdout


def test_data_dir_is_used_like_the_other_commands(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_delivery(tmp_path / "a.csv", [MEASUREMENTS_HEADER, row("1", 0, 1)])
    assert meterdrop("ingest", "--data-dir", str(data), str(tmp_path / "a.csv")).returncode == 0
    result = meterdrop("check", "--data-dir", str(data))
    assert result.returncode == 0 and result.stdout == "ok: 1 file(s) (1 ingested), 1 row(s) in 1 table(s)\n"
    missing = meterdrop("check", "--db", str(tmp_path / "none.duckdb"))
    assert missing.returncode == 2 and "no database at" in missing.stderr


@pytest.mark.parametrize(
    ("statements", "expected"),
    [
        pytest.param(
            ["INSERT INTO panoramic_measurements (device_id, measurement_time, resolution_minutes, file_id) "
             "VALUES ('9', '2024-03-01 00:00:00+00', 60, 999)"],
            "panoramic_measurements: rows whose file_id is not in the ledger (file_id, rows): 999, 1",
            id="row-of-a-file-not-in-the-ledger",
        ),
        pytest.param(
            ["INSERT INTO panoramic_measurements SELECT * FROM panoramic_measurements WHERE device_id = '2'"],
            "panoramic_measurements: duplicate keys (device_id, measurement_time, resolution_minutes, copies): "
            "2, 2024-03-01 00:00:00+00:00, 60, 2",
            id="duplicate-key-inserted-by-hand",
        ),
        pytest.param(
            ["UPDATE files SET status = 'rejected', error = 'x' WHERE path LIKE '%/b.csv'"],
            "panoramic_measurements: rows of files the ledger does not call ingested (file_id, status, rows): "
            "2, rejected, 2",
            id="rejected-file-with-rows",
        ),
        pytest.param(
            ["UPDATE files SET status = 'duplicate' WHERE path LIKE '%/a.csv'"],
            "panoramic_measurements: rows of files the ledger does not call ingested (file_id, status, rows): "
            "1, duplicate, 1\n  - duplicate entries whose content was never ingested (file_id, path): 1, ",
            id="duplicate-file-with-rows",
        ),
        pytest.param(
            ["CREATE TABLE _meterdrop_staging_panoramic_measurements_1 AS "
             "SELECT * FROM panoramic_measurements LIMIT 0"],
            "1 scratch table(s) left over (a crashed run; dropped at the next write): "
            "_meterdrop_staging_panoramic_measurements_1",
            id="leftover-scratch-table",
        ),
        pytest.param(
            ["UPDATE files SET status = 'ingested', rows = 0, note = NULL WHERE status = 'duplicate'"],
            "content (sha256) ingested more than once (sha256, file ids): ",
            id="same-content-ingested-twice",
        ),
        pytest.param(
            ["UPDATE files SET rows = 1 WHERE path LIKE '%/b.csv'"],
            "files holding more rows than they delivered (file_id, path, rows, held): 2, ",
            id="more-rows-than-delivered",
        ),
        pytest.param(
            ["UPDATE panoramic_measurements SET delivered_at = delivered_at + INTERVAL 1 HOUR "
             "WHERE device_id = '2'"],
            "panoramic_measurements: rows whose provenance differs from their ledger entry (file_id, rows): 1, 1",
            id="provenance-differs",
        ),
        pytest.param(
            ["UPDATE files SET format = 'pulse_meter_measurements' WHERE path LIKE '%/b.csv'"],
            "panoramic_measurements: rows of files of another format (file_id, format, rows): "
            "2, pulse_meter_measurements, 2",
            id="rows-in-another-formats-table",
        ),
        pytest.param(
            ["DELETE FROM greenbutton_intervals", "DELETE FROM greenbutton_usage_points",
             "DELETE FROM greenbutton_reading_types", "DELETE FROM greenbutton_usage_summaries",
             "DELETE FROM files WHERE format = 'greenbutton_xml'",
             "DELETE FROM files WHERE path LIKE '%/a.csv'", "DELETE FROM panoramic_measurements WHERE file_id = 1"],
            "duplicate entries whose content was never ingested (file_id, path): 6, ",
            id="duplicate-of-nothing",
        ),
    ],
)  # fmt: skip
def test_damage_is_reported_and_exits_1(healthy: Path, statements: list[str], expected: str) -> None:
    damage(healthy, *statements)
    result = meterdrop("check", "--db", str(healthy))
    assert result.returncode == 1, result.stdout + result.stderr
    head, _, problems = result.stdout.partition("\n")
    assert head.startswith(f"{expected.count('  - ') + 1} problem(s) in "), result.stdout
    assert problems.startswith(f"  - {expected}"), result.stdout


def test_several_problems_are_all_listed(healthy: Path) -> None:
    damage(
        healthy,
        "INSERT INTO panoramic_measurements (device_id, measurement_time, resolution_minutes, file_id) "
        "VALUES ('9', '2024-03-01 00:00:00+00', 60, NULL)",
        "INSERT INTO greenbutton_usage_points SELECT * FROM greenbutton_usage_points",
    )
    result = meterdrop("check", "--db", str(healthy))
    assert result.returncode == 1
    assert "2 problem(s)" in result.stdout
    assert "rows whose file_id is not in the ledger (file_id, rows): None, 1" in result.stdout
    assert "greenbutton_usage_points: duplicate keys (usage_point, copies): " in result.stdout
